"""Plain data shared by all decomposition methods: Conv geometry in, a chain of Conv specs out.

A method never builds graph nodes. It returns a :class:`ChainSpec`: numpy weights plus which conv
of the chain carries the original geometry (strides, pads, dilations, auto_pad) and which one
takes the original bias. :mod:`onnxfactor.rewrite` turns it into ONNX nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """The attributes of one ONNX Conv, with the ONNX defaults filled in.

    ``attrs`` keeps the node's attributes exactly as written (so the rewrite can copy them
    verbatim onto the conv that carries the geometry); the other fields are normalised views.
    """

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str
    group: int
    attrs: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_attrs(cls, attrs: dict, weight_shape: tuple[int, ...]) -> "ConvGeometry":
        """Normalise a Conv's attribute dict (``kernel_shape`` defaults to the weight's spatial shape)."""
        nd = len(weight_shape) - 2
        kernel = tuple(int(k) for k in attrs.get("kernel_shape", weight_shape[2:]))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        return cls(
            kernel_shape=kernel,
            strides=tuple(int(s) for s in attrs.get("strides", [1] * nd)),
            pads=tuple(int(p) for p in attrs.get("pads", [0] * (2 * nd))),
            dilations=tuple(int(d) for d in attrs.get("dilations", [1] * nd)),
            auto_pad=str(auto_pad),
            group=int(attrs.get("group", 1)),
            attrs=dict(attrs),
        )

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_shape)

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_shape)


@dataclass(frozen=True)
class ConvSpec:
    """One Conv of a replacement chain.

    weight:
        ``(out_channels, in_channels // group, *kernel)``, float32.
    carries_geometry:
        This conv gets the original strides/pads/dilations/auto_pad; the others are stride-1,
        unpadded pointwise convs.
    takes_bias:
        This conv (always the last of the chain) gets the original bias input.
    at_input_resolution:
        It computes at the input's spatial size (before the geometry conv), for MAC counting.
    """

    role: str
    weight: np.ndarray
    group: int
    carries_geometry: bool
    takes_bias: bool
    at_input_resolution: bool

    @property
    def params(self) -> int:
        return int(self.weight.size)

    def macs(self, in_spatial: int, out_spatial: int) -> int:
        """Multiply-accumulates per sample: ``C_out * (C_in / group) * prod(kernel) * spatial``."""
        spatial = in_spatial if self.at_input_resolution else out_spatial
        return int(self.weight.size) * spatial


@dataclass(frozen=True)
class ChainSpec:
    """The replacement of one Conv: an ordered chain of convs plus what it approximates."""

    method: str
    ranks: dict
    convs: tuple[ConvSpec, ...]
    #: ||W - W_chain|| / ||W||, filled in by the method (cheaply, from its factors), or None
    rel_error: float | None = None

    @property
    def params(self) -> int:
        """Weight parameters of the chain (the bias is unchanged and not counted on either side)."""
        return sum(c.params for c in self.convs)

    def macs(self, in_spatial: int, out_spatial: int) -> int:
        return sum(c.macs(in_spatial, out_spatial) for c in self.convs)

    def reconstruct(self) -> np.ndarray | None:
        """The dense weight the chain computes (pointwise factors folded into the geometry conv).

        Exact for every chain whose non-geometry convs are pointwise, which holds for all
        methods here; used for reconstruction errors and tests.
        """
        geo_index = next(i for i, c in enumerate(self.convs) if c.carries_geometry)
        geo = self.convs[geo_index]
        dense = _grouped_to_dense(geo.weight, geo.group)  # (C_out, C_in, *k)
        for conv in reversed(self.convs[:geo_index]):
            dense = np.einsum("oi...,ic->oc...", dense, _pointwise_matrix(conv), optimize=True)
        for conv in self.convs[geo_index + 1 :]:
            dense = np.einsum("co,oi...->ci...", _pointwise_matrix(conv), dense, optimize=True)
        return dense


def _pointwise_matrix(conv: ConvSpec) -> np.ndarray:
    """The dense ``(C_out, C_in)`` matrix of a pointwise conv of the chain."""
    dense = _grouped_to_dense(conv.weight, conv.group)
    return dense.reshape(dense.shape[0], dense.shape[1])


def _grouped_to_dense(weight: np.ndarray, group: int) -> np.ndarray:
    """Expand a grouped weight ``(O, I/g, *k)`` to the block-diagonal dense ``(O, I, *k)``."""
    if group == 1:
        return np.asarray(weight, dtype=np.float64)
    out_ch, in_per_group = weight.shape[:2]
    o = out_ch // group
    dense = np.zeros((out_ch, in_per_group * group, *weight.shape[2:]), dtype=np.float64)
    for g in range(group):
        dense[g * o : (g + 1) * o, g * in_per_group : (g + 1) * in_per_group] = weight[g * o : (g + 1) * o]
    return dense


def dense_weight(weight: np.ndarray, group: int) -> np.ndarray:
    """Public view of :func:`_grouped_to_dense` for comparing a grouped weight with a chain."""
    return _grouped_to_dense(np.asarray(weight), group)


def conv_macs(weight_shape: tuple[int, ...], out_spatial: int) -> int:
    """MACs per sample of a Conv: every weight entry is used once per output position."""
    return int(math.prod(weight_shape)) * out_spatial
