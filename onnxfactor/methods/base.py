"""Plain data shared by all decomposition methods: Conv geometry in, a chain of Conv specs out.

A method never builds graph nodes. It returns a :class:`ChainSpec`: numpy weights plus which conv
of the chain carries the original geometry (strides, pads, dilations, auto_pad) and which one
takes the original bias. :mod:`onnxfactor.rewrite` turns it into ONNX nodes, with
:func:`geometry_attrs` giving each conv's geometry attributes.
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
        unpadded convs (pointwise, or per-axis, see ``axis``).
    takes_bias:
        This conv (always the last of the chain) gets the original bias input.
    at_input_resolution:
        It computes at the input's spatial size (before the geometry conv), for MAC counting.
    axis:
        This conv carries only spatial axis ``axis``'s geometry (stride, begin/end pads, dilation,
        auto_pad): its kernel is 1 on every other axis. A chain of such convs, one per axis, in
        axis order, replaces one geometry conv (CP-4's separable depthwise convs). ``None`` for
        all other convs; never set together with ``carries_geometry``.
    """

    role: str
    weight: np.ndarray
    group: int
    carries_geometry: bool
    takes_bias: bool
    at_input_resolution: bool
    axis: int | None = None

    def __post_init__(self):
        if self.axis is not None:
            nd = self.weight.ndim - 2
            if self.carries_geometry:
                raise ValueError(f"ConvSpec {self.role!r}: axis={self.axis} and carries_geometry=True are exclusive")
            if not 0 <= self.axis < nd:
                raise ValueError(f"ConvSpec {self.role!r}: axis={self.axis} but the weight has {nd} spatial dims")
            other = [k for j, k in enumerate(self.weight.shape[2:]) if j != self.axis]
            if any(k != 1 for k in other):
                raise ValueError(f"ConvSpec {self.role!r}: a per-axis conv needs kernel 1 off axis {self.axis}, "
                                 f"got kernel {tuple(self.weight.shape[2:])}")

    @property
    def is_spatial(self) -> bool:
        """It carries (part of) the original geometry: ``carries_geometry`` or a per-axis conv."""
        return self.carries_geometry or self.axis is not None

    @property
    def params(self) -> int:
        return int(self.weight.size)

    def macs(self, in_spatial: int, out_spatial: int) -> int:
        """Multiply-accumulates per sample: ``C_out * (C_in / group) * prod(kernel) * spatial``.

        A per-axis conv (``axis = j`` of ``d``) computes at a size between input and output; we
        estimate it as ``in * (out / in) ** ((j + 1) / d)``, exact when every axis changes size by
        the same factor (same stride and padding on all axes, the usual case).
        """
        if self.axis is not None and in_spatial > 0:
            nd = self.weight.ndim - 2
            spatial = in_spatial * (out_spatial / in_spatial) ** ((self.axis + 1) / nd)
            return int(round(self.weight.size * spatial))
        spatial = in_spatial if self.at_input_resolution else out_spatial
        return int(self.weight.size) * spatial


@dataclass(frozen=True)
class ChainSpec:
    """The replacement of one Conv: an ordered chain of convs plus what it approximates."""

    method: str
    ranks: dict
    convs: tuple[ConvSpec, ...]
    #: the relative error the fit minimised, filled in by the method (cheaply, from its factors), or
    #: None: ``||W - W_chain|| / ||W||`` for ``fit="weights"``; for ``fit="data"`` the same norm of the
    #: input-whitened weight ``W x_1 L^T`` (the layer's output error on calibration inputs, taking
    #: kernel offsets as independent; see :mod:`onnxfactor.calibration.fit`)
    rel_error: float | None = None
    #: a new bias for the last conv (data-aware bias correction, sequential correction), or None:
    #: the last conv takes the original Conv's bias input
    bias: np.ndarray | None = None
    #: ``"weights"`` (factors fitted to the weight) or ``"data"`` (to the layer's output on calibration data)
    fit: str = "weights"
    #: relative L2 error of the layer's output on calibration data (measured on input tiles), or None
    output_error: float | None = None

    @property
    def loss(self) -> float:
        """The squared error the latency budget trades against time: the fit's own error."""
        return (self.rel_error or 0.0) ** 2

    @property
    def params(self) -> int:
        """Weight parameters of the chain (the bias is unchanged and not counted on either side)."""
        return sum(c.params for c in self.convs)

    def macs(self, in_spatial: int, out_spatial: int) -> int:
        return sum(c.macs(in_spatial, out_spatial) for c in self.convs)

    def reconstruct(self) -> np.ndarray | None:
        """The dense weight the chain computes (pointwise factors folded into the geometry conv).

        Exact for every chain whose non-geometry convs are pointwise, which holds for all
        methods here; used for reconstruction errors and tests. Consecutive per-axis convs
        (``axis`` set) act on different axes, so they compose into one conv whose kernel is their
        outer product over the axes (channels contracted): their zero padding and strides are
        per axis, exactly as in the original conv.
        """
        spatial = [i for i, c in enumerate(self.convs) if c.is_spatial]
        first, last = spatial[0], spatial[-1]
        if spatial != list(range(first, last + 1)):
            raise ValueError(f"the spatial convs of a chain must be consecutive, got positions {spatial}")
        dense = _grouped_to_dense(self.convs[first].weight, self.convs[first].group)  # (C_out, C_in, *k)
        for conv in self.convs[first + 1 : last + 1]:
            dense = _compose_axes(_grouped_to_dense(conv.weight, conv.group), dense)
        for conv in reversed(self.convs[:first]):
            dense = np.einsum("oi...,ic->oc...", dense, _pointwise_matrix(conv), optimize=True)
        for conv in self.convs[last + 1 :]:
            dense = np.einsum("co,oi...->ci...", _pointwise_matrix(conv), dense, optimize=True)
        return dense


def _compose_axes(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Dense weight of conv ``before`` followed by conv ``after`` when no spatial axis has a
    kernel longer than 1 in both: ``W[o, i, ...] = sum_c after[o, c, ...] before[c, i, ...]``,
    broadcasting the size-1 kernel axes."""
    clash = [j for j, (a, b) in enumerate(zip(after.shape[2:], before.shape[2:])) if a > 1 and b > 1]
    if clash:
        raise ValueError(f"per-axis convs overlap on spatial axes {clash}: kernels {after.shape[2:]} and {before.shape[2:]}")
    a = np.moveaxis(after, (0, 1), (-2, -1))   # (*k, O, C)
    b = np.moveaxis(before, (0, 1), (-2, -1))  # (*k, C, I)
    return np.moveaxis(a @ b, (-2, -1), (0, 1))


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


#: Attributes that describe the geometry of a Conv (everything but kernel_shape and group).
GEOMETRY_ATTRS = ("auto_pad", "dilations", "pads", "strides")
_AUTO_PADS = ("SAME_UPPER", "SAME_LOWER", "VALID")


def geometry_attrs(conv: ConvSpec, original_attrs: dict) -> dict:
    """The geometry attributes (strides, pads, dilations, auto_pad) of one conv of a chain.

    ``original_attrs`` are the replaced Conv's attributes as written. The caller adds
    ``kernel_shape`` (the weight's spatial shape) and ``group``.

    * pointwise (neither ``carries_geometry`` nor ``axis``): ``{}`` (stride 1, no padding);
    * ``carries_geometry``: the original geometry attributes verbatim;
    * ``axis = j``: only axis ``j``'s share. ``strides`` / ``dilations`` are 1 except on axis ``j``;
      with ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID that ``auto_pad`` and no ``pads`` (on the
      other axes kernel 1 and stride 1 need no padding under any of them); otherwise ONNX's
      ``pads = [b_0 .. b_{d-1}, e_0 .. e_{d-1}]`` keeps only ``b_j`` and ``e_j``. An attribute
      missing from the original stays missing (its ONNX default: strides and dilations 1, pads 0,
      auto_pad NOTSET, is also right for the per-axis conv).

    Chained over ``j = 0 .. d-1`` these convs compute exactly the original conv with a separable
    kernel: zero padding, strides and dilations act on each axis independently.
    """
    if conv.carries_geometry:
        return {k: v for k, v in original_attrs.items() if k in GEOMETRY_ATTRS}
    if conv.axis is None:
        return {}
    nd, j = conv.weight.ndim - 2, conv.axis

    def per_axis(name: str, neutral: int) -> list[int]:
        values = [int(v) for v in original_attrs[name]]
        if len(values) != nd:
            raise ValueError(f"Conv attribute {name}={values} has {len(values)} values; the weight has {nd} spatial dims")
        out = [neutral] * nd
        out[j] = values[j]
        return out

    attrs: dict = {}
    for name in ("strides", "dilations"):
        if name in original_attrs:
            attrs[name] = per_axis(name, 1)
    auto_pad = original_attrs.get("auto_pad")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad is not None:
        attrs["auto_pad"] = str(auto_pad)
    if auto_pad not in _AUTO_PADS and "pads" in original_attrs:
        pads = [int(p) for p in original_attrs["pads"]]
        if len(pads) != 2 * nd:
            raise ValueError(f"Conv attribute pads={pads} has {len(pads)} values; {nd} spatial dims need {2 * nd}")
        split = [0] * (2 * nd)
        split[j], split[nd + j] = pads[j], pads[nd + j]
        attrs["pads"] = split
    return attrs
