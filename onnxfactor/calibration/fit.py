"""How one layer's factors are fitted: to its weight, or to its output on the calibration data.

A :class:`LayerFit` hands the decomposition methods the tensor and the spectra to decompose and
turns their chain back into one for the real layer. ``weight_fit`` is the plain weight fit; with
calibration statistics it can also *measure* any chain's output error on the layer's input tiles.
``data_fit`` fits the chain to what the layer computes on the calibration inputs:

**Input mode** (Tucker-2's and spatial Tucker's first 1x1, CP's first 1x1). With the
input-channel second moment ``C = E[x x^T] = L L^T`` (Cholesky of ``C + ridge tr(C)/n I``) and
the weight's per-offset slices ``W_k`` (``C_out x C_in``), the output error of a rank-``r``
input map ``M`` summed over offsets taken as independent is ``sum_k ||W_k (I - M) L||_F^2``. Its
minimiser is ``M = L Q Q^T L^-1`` with ``Q`` the top right singular vectors of ``A L``, ``A`` the
stacked ``W_k`` (the closed form of SVD-LLM, Wang et al. 2024, and DRONE, Chen et al. 2021,
applied per input channel). The first conv is ``Q^T L^-1`` and the core sees ``L Q``. Equivalently:
decompose the *whitened* weight ``W~ = W x_1 L^T`` (``W~_k = W_k L``) with the method as usual --
its factors are then chosen in the data metric -- and multiply the chain's first conv by ``L^-1``
on its input channels (:func:`unwhiten`). The same works for every method whose first conv mixes
the input channels of its group: Tucker-2, CP-3/CP-4 (ALS runs on the whitened weight), spatial
Tucker with an input rank.

**Output mode** (the last 1x1 of Tucker-2 and spatial Tucker; pointwise convs' SVD): the top
eigenvectors of the centred response covariance ``Cov(W * x)`` of the original conv (Zhang, Zou,
He, Sun, "Accelerating Very Deep Convolutional Networks for Classification and Detection",
TPAMI 2016), measured on the calibration data, so cross-offset correlations count too; the bias
absorbs what the projection drops of the mean.

**Bias correction** (every method): the chain's mean output moves by ``(sum_k W_k - sum_k W'_k)
E[x]``; adding that to the bias keeps the mean response (as in Nagel et al.'s "Data-free
quantization" bias correction, here with measured means).

**Ranks** come from the same spectra the factors do: the whitened weight's input-mode unfolding
and the response covariance's eigenvalues (scaled to the whitened weight's energy, with the
weight unfolding's shape for VBMF), i.e. the singular values of what the *output* loses. A
chain's ``rel_error`` is then the relative error of the whitened weight (for pointwise convs: the
share of centred response energy dropped), the layer's output error with kernel offsets taken
as independent; :meth:`LayerFit.measure` gives the real output error on the calibration tiles.

At full rank every data fit is exact: ``Q Q^T = I``, ``U U^T = I`` and the bias correction is 0.
The ``ridge`` bounds how far the fit trusts directions the calibration inputs never excite: the
first conv's ``L^-1`` amplifies them by at most ``1 / sqrt(ridge)`` relative to the mean input
scale, which matters for inputs unlike the calibration data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from onnxfactor.calibration.statistics import LayerStatistics
from onnxfactor.calibration.tiles import apply_chain
from onnxfactor.methods import METHODS, tucker2, tucker3
from onnxfactor.methods.base import ChainSpec, ConvGeometry, dense_weight
from onnxfactor.methods.tucker2 import group_slices
from onnxfactor.spectral import ModeSpectrum, WeightSpectra

#: Tiles used to measure a chain's output error (each ``TILE_EXTENT`` output positions).
MEASURE_TILES = 256
_CP = ("cp3", "cp4")


def cholesky_whitening(second: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(L, L^-1)`` with ``L L^T = C + ridge * tr(C) / n * I`` (identity for an all-zero ``C``)."""
    n = second.shape[0]
    scale = float(np.trace(second)) / n
    eye = np.eye(n)
    if not scale > 0:
        return eye, eye
    lower = np.linalg.cholesky(second + ridge * scale * eye)
    return lower, np.linalg.solve(lower, eye)


def whiten(weight: np.ndarray, group: int, factors: list[np.ndarray]) -> np.ndarray:
    """``W x_1 L^T`` per group: ``W~[o, j, ...] = sum_i W[o, i, ...] L_g[i, j]`` (float64)."""
    parts = [np.einsum("oi...,ij->oj...", wg.astype(np.float64), lg, optimize=True)
             for wg, lg in zip(group_slices(np.asarray(weight), group), factors)]
    return np.concatenate(parts, axis=0)


def unwhiten(chain: ChainSpec, group: int, inverses: list[np.ndarray]) -> ChainSpec:
    """The chain of ``W`` from the chain of ``W~``: its first conv times ``L^-1`` on its input channels."""
    first = chain.convs[0]
    if first.group != group:
        raise ValueError(f"the first conv of a {chain.method} chain has group {first.group}, not the layer's {group}: "
                         f"it does not mix the input channels and cannot be unwhitened")
    rows = first.weight.shape[0] // group
    parts = [np.einsum("rj...,ji->ri...", first.weight[g * rows : (g + 1) * rows].astype(np.float64), inv, optimize=True)
             for g, inv in enumerate(inverses)]
    weight = np.concatenate(parts, axis=0).astype(np.float32)
    return dataclasses.replace(chain, convs=(dataclasses.replace(first, weight=weight), *chain.convs[1:]))


def response_spectra(stats: LayerStatistics, energies: list[float], shape: tuple[int, int]) -> tuple[ModeSpectrum, ...]:
    """Per group: eigenvectors of the centred response covariance, eigenvalues as singular values
    scaled to ``energies[g]`` (the whitened weight's squared norm), for an unfolding of ``shape``."""
    out = []
    for g in range(stats.outputs.group):
        eigvals, eigvecs = np.linalg.eigh(stats.outputs.covariance(g))
        order = np.argsort(eigvals)[::-1]
        eigvals = np.clip(eigvals[order], 0.0, None)
        total = float(eigvals.sum())
        scale = math.sqrt(energies[g] / total) if total > 0 and energies[g] > 0 else 1.0
        k = min(shape)
        out.append(ModeSpectrum(singular_values=np.sqrt(eigvals[:k]) * scale, vectors=eigvecs[:, order], shape=shape))
    return tuple(out)


class LayerFit:
    """The weight (or whitened weight) and spectra one layer is decomposed from; see the module docstring.

    ``fit`` is ``"weights"`` or ``"data"``; ``note`` says why a layer with calibration data kept
    the weight fit. ``stats`` (optional) lets :meth:`measure` compute output errors on tiles.
    """

    def __init__(self, weight: np.ndarray, geometry: ConvGeometry, *, in_mode: bool, family: str,
                 stats: LayerStatistics | None = None, note: str | None = None):
        self.weight = np.asarray(weight, dtype=np.float32)
        self.geometry = geometry
        self.in_mode = in_mode
        self.family = family          # the configured method (``auto``: all of them)
        self.stats = stats
        self.note = note
        self.fit = "weights"
        self._spectra = None

    # --- what the methods decompose -----------------------------------------------------------

    def target(self, name: str, ranks: dict | None) -> np.ndarray:
        return self.weight

    def spectra(self, name: str) -> WeightSpectra:
        """The spectra method ``name`` expects (for ``auto``, views of one superset)."""
        if self._spectra is None:
            source = tucker3 if self.family == "auto" else METHODS[self.family]
            self._spectra = source.weight_spectra(self.weight, self.geometry, in_mode=self.in_mode)
        if name == "tucker2" and self._spectra.spatial is not None:
            return dataclasses.replace(self._spectra, spatial=None)
        return self._spectra

    def finish(self, name: str, chain: ChainSpec) -> ChainSpec:
        return chain

    # --- chains --------------------------------------------------------------------------------

    def decompose(self, name: str, ranks: dict, *, hooi_iters: int = 0) -> ChainSpec:
        """Method ``name``'s chain at ``ranks`` (may raise ``DegenerateFit`` for CP)."""
        chain = METHODS[name].decompose(self.target(name, ranks), self.geometry, ranks, spectra=self.spectra(name), hooi_iters=hooi_iters)
        return self.finish(name, chain)

    def chain_for_error(self, name: str, target: float, *, cost, max_cost=None, step: int = 1) -> ChainSpec | None:
        """Method ``name``'s cheapest chain whose ``rel_error`` is at most ``target`` (see methods.search)."""
        chain = METHODS[name].chain_for_error(self.target(name, None), self.geometry, target, spectra=self.spectra(name),
                                              cost=cost, max_cost=max_cost, step=step)
        return None if chain is None else self.finish(name, chain)

    def release(self) -> None:
        """Drop the cached spectra (C x C eigenvector matrices)."""
        self._spectra = None

    # --- measurements --------------------------------------------------------------------------

    @property
    def measures(self) -> bool:
        return self.stats is not None and self.stats.tiles.count > 0

    def measure(self, chain: ChainSpec) -> ChainSpec:
        """``chain`` with ``output_error``: the relative L2 error of the layer's output on the
        calibration tiles (the original output, bias included, as reference)."""
        if not self.measures:
            return chain
        tiles = self.stats.tiles
        windows, targets = tiles.windows[:MEASURE_TILES], tiles.targets[:MEASURE_TILES].astype(np.float64)
        out = apply_chain(chain, self.geometry, windows, self.stats.bias)
        norm = float(np.linalg.norm(targets))
        error = float(np.linalg.norm(out - targets) / norm) if norm > 0 else float(np.linalg.norm(out))
        return dataclasses.replace(chain, output_error=error)


class DataFit(LayerFit):
    """:class:`LayerFit` in the data metric (module docstring); needs the layer's statistics."""

    def __init__(self, weight: np.ndarray, geometry: ConvGeometry, stats: LayerStatistics, *, in_mode: bool, family: str, ridge: float):
        super().__init__(weight, geometry, in_mode=in_mode, family=family, stats=stats)
        self.fit = "data"
        g = geometry.group
        if in_mode and not geometry.is_pointwise:
            pairs = [cholesky_whitening(stats.inputs.second(k), ridge) for k in range(g)]
            self.factors, self.inverses = [p[0] for p in pairs], [p[1] for p in pairs]
            self.whitened = whiten(self.weight, g, self.factors)
        else:  # few input channels (no input factor) or pointwise (output-side SVD): nothing to whiten
            self.factors = self.inverses = None
            self.whitened = self.weight.astype(np.float64)
        self._cache: dict[str, WeightSpectra] = {}

    def target(self, name: str, ranks: dict | None) -> np.ndarray:
        if name == "tucker3" and ranks is not None and ranks.get("in") is None:
            return self.weight  # its first conv is depthwise: it cannot carry L^-1
        return self.whitened

    def spectra(self, name: str) -> WeightSpectra:
        key = "cp" if name in _CP else name
        if key not in self._cache:
            self._cache[key] = self._compute_spectra(key)
        return self._cache[key]

    def _compute_spectra(self, key: str) -> WeightSpectra:
        g, geometry = self.geometry.group, self.geometry
        groups = group_slices(self.whitened, g)
        energies = [float(np.sum(np.square(wg))) for wg in groups]
        o, i = groups[0].shape[:2]
        taps = math.prod(geometry.kernel_shape)
        if geometry.is_pointwise:  # output side: W ~= U (U^T W), U from the response covariance
            return WeightSpectra(matrix=response_spectra(self.stats, energies, (o, i)), transposed=False)
        if key == "cp":  # CP compresses and fits the whitened tensor with its own bases
            return tucker2.weight_spectra(self.whitened, geometry, in_mode=self.in_mode, spatial_mode=self.in_mode)
        own = tucker2.weight_spectra(self.whitened, geometry, in_mode=self.in_mode, spatial_mode=key == "tucker3")
        return dataclasses.replace(own, out=response_spectra(self.stats, energies, (o, i * taps)))

    def chain_for_error(self, name: str, target: float, *, cost, max_cost=None, step: int = 1) -> ChainSpec | None:
        chain = super().chain_for_error(name, target, cost=cost, max_cost=max_cost, step=step)
        if chain is not None and name == "tucker3" and chain.ranks.get("in") is None and self.inverses is not None:
            chain = self.decompose(name, dict(chain.ranks))  # found on W~; its depthwise first conv needs W
        return chain

    def finish(self, name: str, chain: ChainSpec) -> ChainSpec:
        whitened = self.inverses is not None and not (name == "tucker3" and chain.ranks.get("in") is None)
        if whitened:
            chain = unwhiten(chain, self.geometry.group, self.inverses)
        rel_error = chain.rel_error
        if self.geometry.is_pointwise:  # share of the centred response energy the projection drops
            rel_error = _dropped_energy(self.stats, int(chain.ranks["rank"]))
        return dataclasses.replace(chain, bias=self._corrected_bias(chain), fit="data", rel_error=rel_error)

    def _corrected_bias(self, chain: ChainSpec) -> np.ndarray:
        """``b + (sum_k W_k - sum_k W'_k) E[x]``: the chain keeps the layer's mean output."""
        axes = tuple(range(2, self.weight.ndim))
        original = dense_weight(self.weight, self.geometry.group).sum(axis=axes)
        approx = chain.reconstruct().sum(axis=axes)
        bias = self.stats.bias if self.stats.bias is not None else np.zeros(self.weight.shape[0])
        return (bias + (original - approx) @ self.stats.inputs.mean).astype(np.float32)

    def release(self) -> None:
        self._cache.clear()


def _dropped_energy(stats: LayerStatistics, rank: int) -> float:
    total = kept = 0.0
    for g in range(stats.outputs.group):
        eigvals = np.sort(np.clip(np.linalg.eigvalsh(stats.outputs.covariance(g)), 0.0, None))[::-1]
        total += float(eigvals.sum())
        kept += float(eigvals[:rank].sum())
    return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
