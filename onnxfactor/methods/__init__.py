"""Decomposition methods, registered by name (the CLI's ``--method`` choices come from here)."""

from __future__ import annotations

from onnxfactor.methods import tucker2

#: name -> module exposing ``weight_spectra`` and ``decompose``
METHODS = {"tucker2": tucker2}
