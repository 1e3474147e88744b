"""Result types of the pipeline and their JSON form. The library never prints; the CLI renders these."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class LayerReport:
    """Every figure about one candidate (decomposed or kept): a Conv, or with ``include_linear`` a
    ``Gemm`` / ``MatMul`` (``op_type``; ``kernel_shape`` and ``strides`` empty, ``weight_shape`` the
    B input as stored, MACs per sample, see :class:`onnxfactor.linear.LinearSite`)."""

    name: str
    graph_path: str
    status: str                         # "decomposed" or "kept"
    reason: str | None
    weight_shape: list[int]
    group: int
    kernel_shape: list[int]
    strides: list[int]
    input_shape: list | None
    output_shape: list | None
    params_before: int
    macs_before: int | None
    method: str | None = None
    ranks: dict | None = None
    modes: list[dict] = field(default_factory=list)
    params_after: int | None = None
    macs_after: int | None = None
    rel_reconstruction_error: float | None = None
    new_nodes: list[str] = field(default_factory=list)
    fallback: str | None = None         # e.g. a degenerate CP fit replaced by Tucker-2
    candidates: list[dict] = field(default_factory=list)  # methods tried by auto / the error policy
    latency: dict | None = None         # measured: original_ms, chain_ms, speedup, options tried
    fit: str | None = None              # "weights" or "data" (calibration.fit)
    fit_note: str | None = None         # why a layer with calibration data kept the weight fit
    output_error: float | None = None   # relative L2 error of the layer's output on calibration tiles
    correction: dict | None = None      # sequential correction: errors before/after at the output tensor
    reconstruction: dict | None = None  # layer-wise reconstruction (PyTorch): loss before/after, steps
    seconds: float = 0.0
    op_type: str = "Conv"

    @property
    def is_linear(self) -> bool:
        """A fully connected layer (``Gemm`` / ``MatMul``), counted in the ``linear_*`` totals."""
        return self.op_type != "Conv"

    def describe_chain(self, chain, in_spatial: int | None, out_spatial: int | None) -> None:
        """Fill this row's figures of ``chain`` (a ``ChainSpec``): method, ranks, parameter and MAC
        counts (MACs only when both spatial sizes are known), reconstruction error."""
        self.method, self.ranks = chain.method, dict(chain.ranks)
        self.params_after = chain.params
        if in_spatial is not None and out_spatial is not None:
            self.macs_after = chain.macs(in_spatial, out_spatial)
        self.rel_reconstruction_error = chain.rel_error
        self.output_error = chain.output_error

    @property
    def params_ratio(self) -> float | None:
        return _ratio(self.params_before, self.params_after)

    @property
    def macs_ratio(self) -> float | None:
        return _ratio(self.macs_before, self.macs_after)


def _ratio(before, after) -> float | None:
    if before is None or after is None or after == 0:
        return None
    return before / after


@dataclass
class Totals:
    """Model-wide counts before and after (MACs per sample at the analysed input shapes).

    ``conv_*`` count the Conv candidates only, with or without ``include_linear``, so the conv-MAC
    ratio means the same in every report. The fully connected candidates (``Gemm`` / ``MatMul``)
    have their own ``linear_*`` counts (0 without ``include_linear``): a VGG-style head holds most
    of the parameters but a few percent of the MACs, and mixed into the conv figures it would hide
    what the conv decomposition does. ``model_params_*`` count every initializer of the model, so
    the model parameter ratio includes the fully connected savings. ``macs_known`` /
    ``linear_macs_known`` are False when some layer's shapes are unknown (its MACs are left out).
    """

    conv_params_before: int = 0
    conv_params_after: int = 0
    conv_macs_before: int = 0
    conv_macs_after: int = 0
    macs_known: bool = True
    model_params_before: int = 0
    model_params_after: int = 0
    model_bytes_before: int | None = None
    model_bytes_after: int | None = None
    linear_params_before: int = 0
    linear_params_after: int = 0
    linear_macs_before: int = 0
    linear_macs_after: int = 0
    linear_macs_known: bool = True

    @property
    def conv_macs_ratio(self) -> float | None:
        return _ratio(self.conv_macs_before, self.conv_macs_after) if self.macs_known else None

    @property
    def linear_macs_ratio(self) -> float | None:
        return _ratio(self.linear_macs_before, self.linear_macs_after) if self.linear_macs_known else None

    @property
    def model_params_ratio(self) -> float | None:
        return _ratio(self.model_params_before, self.model_params_after)

    @classmethod
    def of(cls, layers: list["LayerReport"], params_before: int, params_after: int) -> "Totals":
        """Conv and (``include_linear``) linear totals of ``layers``, kept apart: the conv figures
        mean the same with linear layers; ``params_*`` are the whole model's."""
        t = cls(model_params_before=params_before, model_params_after=params_after)
        for layer in layers:
            decomposed = layer.status == "decomposed"
            kind = "linear" if layer.is_linear else "conv"
            t._add(f"{kind}_params", layer.params_before, layer.params_after if decomposed else layer.params_before)
            if layer.macs_before is None or (decomposed and layer.macs_after is None):
                setattr(t, "linear_macs_known" if layer.is_linear else "macs_known", False)
                continue
            t._add(f"{kind}_macs", layer.macs_before, layer.macs_after if decomposed else layer.macs_before)
        return t

    def _add(self, prefix: str, before: int, after: int) -> None:
        setattr(self, f"{prefix}_before", getattr(self, f"{prefix}_before") + before)
        setattr(self, f"{prefix}_after", getattr(self, f"{prefix}_after") + after)


@dataclass
class CompressReport:
    """What :func:`onnxfactor.compress` did, layer by layer, with totals, timings and validation."""

    config: dict
    input_shapes: dict
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    validation: dict | None = None
    speed: dict | None = None           # latency-aware selection: end-to-end rounds, budget
    calibration: dict | None = None     # calibration data, statistics, correction (onnxfactor.calibration)
    finetune: dict | None = None        # fine-tuning: steps, losses, time and memory per epoch (onnxfactor.finetune)
    #: the validation found the outputs far from the original's (thresholds in onnxfactor.validation.compare)
    accuracy_warning: str | None = None
    input_path: str | None = None
    output_path: str | None = None

    @property
    def decomposed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status == "decomposed"]

    @property
    def kept(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status != "decomposed"]

    def to_dict(self) -> dict:
        d = to_jsonable(self)
        d["summary"] = {
            "conv_candidates": sum(not layer.is_linear for layer in self.layers),
            "linear_candidates": sum(layer.is_linear for layer in self.layers),
            "decomposed": len(self.decomposed),
            "kept": len(self.kept),
            "skipped": len(self.skipped),
            "conv_macs_ratio": self.totals.conv_macs_ratio,
            "model_params_ratio": self.totals.model_params_ratio,
            "linear_macs_ratio": self.totals.linear_macs_ratio,
        }
        return d

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, paths and non-finite floats -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name in ("params_ratio", "macs_ratio", "conv_macs_ratio", "model_params_ratio", "linear_macs_ratio"):
            if hasattr(type(obj), name):
                out[name] = to_jsonable(getattr(obj, name))
        return out
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
