"""Spectra of weight unfoldings, computed once and shared by rank selection and decomposition.

A full SVD of every unfolding dominates compression time on real models. We only ever need the
singular values of an unfolding and its leading left singular vectors, so we eigendecompose the
Gram matrix of the mode side instead: for ``A`` of shape ``L x M``, ``A A^T = U diag(s^2) U^T``.
The Gram product and the small ``L x L`` eigendecomposition run in float64, which keeps ``U``
orthonormal to float64 precision, so a decomposition at full rank stays exact. A float32 product
would be cheaper (the eigendecomposition dominates anyway) but its rounding, about
``sqrt(eps_32) s_1 ~ 2.4e-4 s_1`` in the singular values, lifts the noise tail of a nearly
low-rank unfolding and inflates its VBMF rank (e.g. 16 instead of 10 at a noise level of 4e-4 s_1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModeSpectrum:
    """Singular values and left singular vectors of one ``L x M`` unfolding (``L`` = mode size).

    ``singular_values`` holds the ``min(L, M)`` non-trivial values, descending; ``vectors`` is the
    complete ``L x L`` orthonormal basis ordered the same way (columns beyond ``min(L, M)`` span the
    null space of ``A^T``).
    """

    singular_values: np.ndarray
    vectors: np.ndarray
    shape: tuple[int, int]

    @property
    def full_rank(self) -> int:
        """The largest rank that can matter: ``min(L, M)``."""
        return min(self.shape)


def mode_spectrum(matrix: np.ndarray) -> ModeSpectrum:
    """Eigendecompose ``A A^T`` of an ``L x M`` matrix; see the module docstring."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"mode_spectrum needs a 2-D matrix, got shape {a.shape}")
    return gram_spectrum(a @ a.T, a.shape)


def gram_spectrum(gram: np.ndarray, shape: tuple[int, int]) -> ModeSpectrum:
    """The :class:`ModeSpectrum` of an ``L x M`` matrix (``shape``) from its ``L x L`` Gram matrix ``A A^T``
    (float64), for callers that form the Gram matrix without the matrix (e.g. from activation moments)."""
    gram = np.asarray(gram, dtype=np.float64)
    if gram.shape != (shape[0], shape[0]):
        raise ValueError(f"a Gram matrix of a {shape[0]} x {shape[1]} matrix is {shape[0]} x {shape[0]}, got {gram.shape}")
    eigvals, eigvecs = np.linalg.eigh(gram)
    order = np.argsort(eigvals)[::-1]
    eigvals = np.clip(eigvals[order], 0.0, None)
    vectors = eigvecs[:, order]
    k = min(shape)
    return ModeSpectrum(singular_values=np.sqrt(eigvals[:k]), vectors=vectors, shape=tuple(shape))


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: move axis ``mode`` first and flatten the rest (row-major)."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def tail_energy(sq_singular_values: np.ndarray) -> np.ndarray:
    """``tail[r] = sum_{k >= r} s_k^2`` for ``r = 0 .. n`` (``tail[n] = 0``): by Eckart-Young the
    squared error of the best rank-``r`` approximation."""
    sq = np.asarray(sq_singular_values, dtype=np.float64)
    return np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])


@dataclass(frozen=True)
class WeightSpectra:
    """Per-group spectra of a weight's unfoldings, computed once for rank choice and factors.

    For a k x k conv, ``out`` / ``in_`` hold the mode-0 / mode-1 unfolding spectra of each group
    (``in_`` is ``None`` when the input mode is not considered) and ``spatial`` the spectra of the
    ``prod(kernel) x C_out C_in`` unfolding (only for the methods that decompose the spatial mode,
    CP and spatial Tucker). For a pointwise conv ``matrix`` holds the spectrum of each group's
    ``C_out x C_in`` matrix, of its transpose when ``transposed`` (we always eigendecompose the
    smaller Gram matrix).
    """

    out: tuple[ModeSpectrum, ...] | None = None
    in_: tuple[ModeSpectrum, ...] | None = None
    matrix: tuple[ModeSpectrum, ...] | None = None
    transposed: bool = False
    spatial: tuple[ModeSpectrum, ...] | None = None
