"""The one place that calls tensorly (its return types changed across versions).

``partial_tucker`` returned ``(core, factors)`` before tensorly 0.8 and ``((core, factors),
rec_errors)`` from 0.8 on; this adapter accepts both. Tested with tensorly 0.8 - 0.10.
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
