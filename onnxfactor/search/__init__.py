"""``onnxfactor search``: the fastest (or smallest) compressed model that meets a user's requirements.

* :mod:`~onnxfactor.search.constraints` -- requirements, violations, objectives;
* :mod:`~onnxfactor.search.space` -- per-layer sensitivity curves and the global grid;
* :mod:`~onnxfactor.search.allocate` -- the exact Pareto front of per-layer choices;
* :mod:`~onnxfactor.search.evaluate` -- one candidate built and measured (the unit of parallel work);
* :mod:`~onnxfactor.search.executor` -- serial, process pool or Ray, and the disk cache;
* :mod:`~onnxfactor.search.runner` -- the strategies (``allocate``, ``grid``) and the winner;
* :mod:`~onnxfactor.search.output` -- the command's files: model, report, plots;
* :mod:`~onnxfactor.search.plots` -- the figures (``[plot]`` extra).
"""

from onnxfactor.search.constraints import Constraints
from onnxfactor.search.runner import SearchConfig, SearchResult, search

__all__ = ["Constraints", "SearchConfig", "SearchResult", "search"]
