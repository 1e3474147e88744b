"""Tiles: small windows of a Conv's input that reproduce a block of its output exactly.

The least-squares steps of the calibration stage (measured output error, sequential correction,
layer-wise reconstruction) need the layer's input at a few thousand output positions, paired
with the original output there. Storing im2col patches costs ``C_in * prod(k)`` values per output
position; a tile of ``t`` output positions per axis needs only the input window
``(t - 1) * s + (k - 1) * d + 1`` per axis (stride ``s``, dilation ``d``), taken from the
zero-padded input, e.g. 36 input pixels for 16 outputs of a 3x3 stride-1 conv: 2.25 input
vectors per output position instead of 9.

A window is cut from the input *after* padding, so every conv of a chain runs on it as a
"valid" convolution (no padding): the chain's first convs are pointwise without bias, so they map
the padded zeros to zeros, exactly as the ONNX chain does, and CP-4's per-axis convs pad each
axis with zeros too (see :func:`onnxfactor.methods.base.geometry_attrs`). Hence
:func:`apply_chain` on a tile equals the ONNX chain's output on that output block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxfactor.methods.base import ChainSpec, ConvGeometry, ConvSpec

#: Output positions per tile, per number of spatial dims (about 16 per tile).
TILE_EXTENT = {1: 16, 2: 4, 3: 3}


def explicit_pads(geometry: ConvGeometry, in_dims: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """``(begin, end)`` zero padding per spatial axis, with ``auto_pad`` resolved for input ``in_dims``.

    ONNX: ``SAME_UPPER`` / ``SAME_LOWER`` pad so that ``out = ceil(in / s)``, the odd pixel at the
    end (UPPER) or the beginning (LOWER); ``VALID`` pads nothing; ``NOTSET`` uses ``pads``.
    """
    nd = geometry.spatial_dims
    if geometry.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_dims, geometry.kernel_shape, geometry.strides, geometry.dilations):
            out = math.ceil(size / s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if geometry.auto_pad == "SAME_UPPER" else large)
            end.append(large if geometry.auto_pad == "SAME_UPPER" else small)
        return begin, end
    if geometry.auto_pad == "VALID":
        return [0] * nd, [0] * nd
    return list(geometry.pads[:nd]), list(geometry.pads[nd:])


def output_dims(geometry: ConvGeometry, in_dims: tuple[int, ...]) -> tuple[int, ...]:
    """The Conv's output spatial size for input ``in_dims``."""
    begin, end = explicit_pads(geometry, in_dims)
    return tuple(
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, b, e, k, s, d in zip(in_dims, begin, end, geometry.kernel_shape, geometry.strides, geometry.dilations)
    )


@dataclass(frozen=True)
class TileGeometry:
    """Where a tile of ``extent`` output positions per axis reads the input of one Conv."""

    geometry: ConvGeometry
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    extent: tuple[int, ...]       # output positions per axis (clipped to the output size)
    window: tuple[int, ...]       # input positions per axis
    pad_begin: tuple[int, ...]

    @classmethod
    def of(cls, geometry: ConvGeometry, in_dims: tuple[int, ...], extent: tuple[int, ...] | None = None) -> "TileGeometry":
        """The tiles of a Conv on inputs of ``in_dims``; ``extent`` (default :data:`TILE_EXTENT`,
        clipped to the output) fixes their size, so that tiles of inputs of other sizes stack."""
        out = output_dims(geometry, in_dims)
        if extent is None:
            t = TILE_EXTENT.get(geometry.spatial_dims, 2)
            extent = tuple(max(1, min(t, o)) for o in out)
        window = tuple((e - 1) * s + (k - 1) * d + 1
                       for e, k, s, d in zip(extent, geometry.kernel_shape, geometry.strides, geometry.dilations))
        begin, _ = explicit_pads(geometry, in_dims)
        return cls(geometry, tuple(in_dims), out, extent, window, tuple(begin))

    @property
    def positions(self) -> int:
        """Output positions per tile."""
        return math.prod(self.extent)

    @property
    def fits(self) -> bool:
        """Whether a whole tile fits in the output."""
        return all(o >= e for o, e in zip(self.out_dims, self.extent))

    def origins(self) -> tuple[int, ...]:
        """Number of possible tile origins per axis (output positions where a whole tile fits)."""
        return tuple(o - e + 1 for o, e in zip(self.out_dims, self.extent))

    def cut_inputs(self, x: np.ndarray, samples: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """Input windows ``(n, C, *window)`` of ``x`` (``N x C x *in_dims``) for tiles at output ``origins``.

        ``samples`` indexes axis 0 of ``x``; ``origins`` is ``n x d``. Positions outside the input
        are the Conv's zero padding.
        """
        origins = np.asarray(origins, dtype=np.intp).reshape(len(samples), -1)
        starts = origins * np.asarray(self.geometry.strides, dtype=np.intp) - np.asarray(self.pad_begin, dtype=np.intp)
        return gather_blocks(x, samples, starts, self.window)

    def cut_outputs(self, y: np.ndarray, samples: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """Output blocks ``(n, C, *extent)`` of ``y`` (``N x C x *out_dims``) at ``origins``."""
        return gather_blocks(y, samples, np.asarray(origins, dtype=np.intp).reshape(len(samples), -1), self.extent)


def gather_blocks(a: np.ndarray, samples: np.ndarray, starts: np.ndarray, extent: tuple[int, ...]) -> np.ndarray:
    """``(n, C, *extent)``: block ``j`` is ``a[samples[j], :, starts[j, 0] : starts[j, 0] + extent[0], ...]``,
    zero where it lies outside ``a`` (``N x C x *S``).

    One indexing of a sliding-window view of the sampled rows (zero-padded only as far as some
    block reaches out) instead of a Python loop over the 100-500 tiles of a layer and run (NudeNet
    320n's statistics pass, numpy-bound: 11 -> 9 s for 256 inputs).
    """
    d = len(extent)
    starts = np.asarray(starts, dtype=np.intp).reshape(len(samples), d)
    sizes = np.asarray(a.shape[2:], dtype=np.intp)
    before = np.maximum(0, -starts.min(axis=0, initial=0))
    after = np.maximum(0, (starts + np.asarray(extent)).max(axis=0, initial=0) - sizes)
    rows, where = np.unique(np.asarray(samples, dtype=np.intp), return_inverse=True)
    source = a if len(rows) == a.shape[0] else a[rows]  # rows = arange(N) when all are sampled
    if before.any() or after.any():
        source = np.pad(source, [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(before, after)])
    view = np.lib.stride_tricks.sliding_window_view(source, tuple(extent), axis=tuple(range(2, 2 + d)))
    return view[(where.reshape(-1), slice(None), *(starts[:, k] + before[k] for k in range(d)))]


def valid_conv(x: np.ndarray, weight: np.ndarray, group: int, strides, dilations) -> np.ndarray:
    """Unpadded ND convolution of ``x`` (``N x C x *S``) with ``weight`` (``O x C/g x *k``), float64.

    One matrix product per kernel offset and group; the tiles are small, the kernels short.
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    n, c = x.shape[:2]
    o, cg = w.shape[:2]
    kernel = w.shape[2:]
    out_dims = tuple((size - (k - 1) * d - 1) // s + 1 for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations))
    if any(dim < 1 for dim in out_dims):
        raise ValueError(f"valid_conv: input {x.shape[2:]} is smaller than the kernel {kernel} (dilations {dilations})")
    og = o // group
    out = np.zeros((n, o, *out_dims))
    for offset in np.ndindex(*kernel):
        window = tuple(slice(t * d, t * d + (size - 1) * s + 1, s) for t, d, s, size in zip(offset, dilations, strides, out_dims))
        xs = x[(slice(None), slice(None), *window)]
        for g in range(group):
            xg = xs[:, g * cg : (g + 1) * cg]
            wg = w[(slice(g * og, (g + 1) * og), slice(None), *offset)]
            out[:, g * og : (g + 1) * og] += np.einsum("oc,nc...->no...", wg, xg, optimize=True)
    return out


def _conv_attrs(conv: ConvSpec, geometry: ConvGeometry) -> tuple[list[int], list[int]]:
    """Strides and dilations one conv of a chain runs with (see ``geometry_attrs``)."""
    nd = geometry.spatial_dims
    if conv.carries_geometry:
        return list(geometry.strides), list(geometry.dilations)
    if conv.axis is not None:
        strides, dilations = [1] * nd, [1] * nd
        strides[conv.axis] = geometry.strides[conv.axis]
        dilations[conv.axis] = geometry.dilations[conv.axis]
        return strides, dilations
    return [1] * nd, [1] * nd


def apply_convs(convs, geometry: ConvGeometry, windows: np.ndarray) -> np.ndarray:
    """Run the convs of a chain (or a prefix of it), without bias, on input windows (float64)."""
    h = np.asarray(windows, dtype=np.float64)
    for conv in convs:
        strides, dilations = _conv_attrs(conv, geometry)
        h = valid_conv(h, conv.weight, conv.group, strides, dilations)
    return h


def apply_chain(chain: ChainSpec, geometry: ConvGeometry, windows: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The chain's output on input windows, with ``chain.bias`` if set, else ``bias`` (the original's)."""
    out = apply_convs(chain.convs, geometry, windows)
    b = chain.bias if chain.bias is not None else bias
    if b is not None:
        out += np.asarray(b, dtype=np.float64).reshape(1, -1, *([1] * geometry.spatial_dims))
    return out
