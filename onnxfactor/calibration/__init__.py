"""The calibration stage: statistics of real inputs, data-aware factors, sequential correction.

* :mod:`~onnxfactor.calibration.statistics` -- one streamed ONNX Runtime pass: per Conv, input and
  response moments (float64) and a bounded sample of input tiles with their original outputs;
* :mod:`~onnxfactor.calibration.fit` -- :class:`LayerFit` / :class:`DataFit`: factors fitted to the
  layer's output on those inputs (input whitening, response-covariance output basis, bias
  correction) and output errors measured on the tiles;
* :mod:`~onnxfactor.calibration.correct` -- sequential least-squares correction of each chain's
  last conv on inputs from the already compressed network;
* :mod:`~onnxfactor.calibration.reconstruct` -- layer-wise reconstruction with PyTorch
  (``[finetune]`` extra, imported only there).

Nothing here imports torch or the CLI; :mod:`onnxfactor.pipeline` wires the stages.
"""

from onnxfactor.calibration.fit import DataFit, LayerFit
from onnxfactor.calibration.statistics import CalibrationData, LayerStatistics, collect_statistics

__all__ = ["CalibrationData", "DataFit", "LayerFit", "LayerStatistics", "collect_statistics"]
