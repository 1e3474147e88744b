"""Decomposition methods, registered by name (the CLI's ``--method`` choices come from here).

Each entry exposes ``weight_spectra(weight, geometry, *, in_mode)``, ``choose_ranks(spectra,
config, explicit)`` and ``decompose(weight, geometry, ranks, *, spectra, hooi_iters)`` returning
a :class:`~onnxfactor.methods.base.ChainSpec`, and ``chain_for_error(weight, geometry, target, *,
spectra, cost, max_cost, step)`` returning its cheapest chain meeting a relative error (or None;
see :mod:`onnxfactor.methods.search`). CP fits may raise
:class:`~onnxfactor.methods.cp.DegenerateFit` (fall back to Tucker-2).

``auto`` is not a method of its own: the pipeline asks every method for its cheapest chain.
"""

from __future__ import annotations

from onnxfactor.methods import cp, tucker2, tucker3

#: name -> object exposing ``weight_spectra``, ``choose_ranks`` and ``decompose``
METHODS = {"tucker2": tucker2, "cp3": cp.CP3, "cp4": cp.CP4, "tucker3": tucker3}
AUTO = "auto"
#: every ``--method`` choice
METHOD_CHOICES = (*METHODS, AUTO)
