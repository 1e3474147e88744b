"""The one place that calls tensorly (its return types changed across versions).

``partial_tucker`` returned ``(core, factors)`` before tensorly 0.8 and ``((core, factors),
rec_errors)`` from 0.8 on; ``parafac`` returns a ``CPTensor`` (or ``(CPTensor, errors)`` with
``return_errors``). This adapter accepts all of them. Tested with tensorly 0.8 - 0.10.
"""

from __future__ import annotations

import numpy as np


def hooi_channel_factors(weight: np.ndarray, ranks: tuple[int, int], n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Refine the two channel-mode factors of a conv weight with HOOI (tensorly ``partial_tucker``).

    Returns ``(U, V)``: ``C_out x R_out`` and ``C_in x R_in`` with orthonormal columns.
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("numpy")
    result = partial_tucker(
        np.asarray(weight, dtype=np.float64), rank=list(ranks), modes=[0, 1], n_iter_max=n_iter, init="svd", tol=1e-7
    )
    if isinstance(result[0], (tuple, list)) and len(result[0]) == 2 and not isinstance(result[0], np.ndarray):
        result = result[0]
    _core, factors = result
    u, v = (np.asarray(f, dtype=np.float64) for f in factors)
    if u.shape != (weight.shape[0], ranks[0]) or v.shape != (weight.shape[1], ranks[1]):
        raise RuntimeError(f"tensorly partial_tucker returned factors of shapes {u.shape}, {v.shape}; expected "
                           f"{(weight.shape[0], ranks[0])}, {(weight.shape[1], ranks[1])}")
    return u, v


def hooi_factors(tensor: np.ndarray, ranks: dict[int, int], n_iter: int) -> dict[int, np.ndarray]:
    """HOOI (tensorly ``partial_tucker``) on the modes in ``ranks`` (``mode -> rank``).

    Returns ``mode -> factor`` (``size x rank``, orthonormal columns) for those modes.
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("numpy")
    modes = sorted(ranks)
    result = partial_tucker(
        np.asarray(tensor, dtype=np.float64), rank=[ranks[m] for m in modes], modes=modes,
        n_iter_max=n_iter, init="svd", tol=1e-7,
    )
    if isinstance(result[0], (tuple, list)) and len(result[0]) == 2 and not isinstance(result[0], np.ndarray):
        result = result[0]
    _core, factors = result
    out = {m: np.asarray(f, dtype=np.float64) for m, f in zip(modes, factors)}
    for m, f in out.items():
        if f.shape != (tensor.shape[m], ranks[m]):
            raise RuntimeError(f"tensorly partial_tucker returned a mode-{m} factor of shape {f.shape}; "
                               f"expected {(tensor.shape[m], ranks[m])}")
    return out


def parafac(
    tensor: np.ndarray,
    rank: int,
    *,
    init="svd",
    n_iter_max: int = 100,
    tol: float = 1e-8,
    random_state: int | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """CP-ALS (tensorly ``parafac``) with normalised factors: returns ``(weights, factors)``.

    ``init`` is ``"svd"``, ``"random"`` or a ``(weights, factors)`` pair to continue from.
    ``tol`` stops when the relative reconstruction error changes by less than it between sweeps;
    ``tol=0`` runs exactly ``n_iter_max`` sweeps without computing the error.

    tensorly returns a ``CPTensor`` (0.8 - 0.10; ``(weights, factors)`` when unpacked) or, with
    ``return_errors`` (not used here), ``(CPTensor, errors)``; ``weights`` may be ``None``. Its
    warnings about SVD initialisation beyond a mode's size (padded with random columns) and about
    normalising a given initialisation are expected here and silenced.
    """
    import warnings

    import tensorly as tl
    from tensorly.decomposition import parafac as _parafac

    tl.set_backend("numpy")
    t = np.asarray(tensor, dtype=np.float64)
    if isinstance(init, (tuple, list)):
        weights, factors = init
        init = (np.asarray(weights, dtype=np.float64), [np.asarray(f, dtype=np.float64) for f in factors])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = _parafac(
            t, rank, n_iter_max=n_iter_max, init=init, tol=tol, random_state=random_state, normalize_factors=True
        )
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list) and result[1] and np.isscalar(result[1][0]):
        result = result[0]  # (CPTensor, errors)
    weights, factors = result
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    weights = np.ones(rank) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    expected = [(n, rank) for n in t.shape]
    if [f.shape for f in factors] != expected or weights.shape != (rank,):
        raise RuntimeError(f"tensorly parafac returned weights {weights.shape} and factors "
                           f"{[f.shape for f in factors]}; expected ({rank},) and {expected}")
    return weights, factors
