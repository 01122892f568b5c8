"""IRN's random walk on a sparse transition matrix (Ahn, Cho and Kwak, CVPR 2019, Sec. 4).

Input: the affinities of one stride-4 map (``wsss.models.irn.edge_to_affinity``: entry k at
pixel i is a(i, i + d_k) for the directions d_k of ``offsets(radius)``) and the maps to
propagate (the stride-4 CAMs times 1 - boundary). The walk:

    A_ij = a_ij^beta for j = i ± d_k inside the map, A_ii = 1 (symmetric),
    T = A D^-1, D = diag(column sums of A)   (column-normalised),
    v <- v T, applied 2^exp_times times       (v: one row per class over the N pixels).

The official code (misc/indexing.py ``propagate_to_edge``, ``to_transition_matrix``) builds
T as a dense N x N matrix and squares it exp_times times: O(N^2) memory and O(N^3) time per
squaring (a 500x375 image: N = 125 x 94 = 11,750, 550 MB in float32, 1.3e13 multiply-adds
for the 8 squarings). T has at most 2K + 1 non-zeros per column (K = len(offsets(radius)),
about (2r+1)^2 / 2), so applying it 2^exp_times times to v gives the same v T^(2^exp_times)
with O(N K) memory and 2^exp_times N K (classes) work: :func:`random_walk`. The dense
reference (:func:`random_walk_dense`) is kept for the parity test and the benchmark only.

Pure numpy / scipy, float64 throughout (the official code runs float32 on the GPU).
"""

from __future__ import annotations

import numpy as np

from .models.irn import offsets


def _pairs(aff: np.ndarray, radius: int, beta: float):
    """(rows, cols, values) of the off-diagonal entries of A, one direction of each pair."""
    k, h, w = aff.shape
    dirs = offsets(radius)
    if k != len(dirs):
        raise ValueError(f"aff has {k} directions, radius {radius} has {len(dirs)}")
    idx = np.arange(h * w).reshape(h, w)
    rows, cols, vals = [], [], []
    for a, (dy, dx) in zip(aff, dirs):
        y0, y1 = 0, h - dy  # sources whose partner (y + dy, x + dx) lies in the map
        x0, x1 = max(0, -dx), min(w, w - dx)
        if y1 <= y0 or x1 <= x0:
            continue
        rows.append(idx[y0:y1, x0:x1].ravel())
        cols.append(idx[y0 + dy:y1 + dy, x0 + dx:x1 + dx].ravel())
        vals.append(np.power(a[y0:y1, x0:x1].astype(np.float64).ravel(), beta))
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def affinity_matrix(aff: np.ndarray, radius: int, beta: float):
    """A (scipy CSR, N x N, symmetric, ones on the diagonal) of affinities ``aff`` (K, h, w)."""
    import scipy.sparse as sp

    n = aff.shape[1] * aff.shape[2]
    r, c, v = _pairs(aff, radius, beta)
    diag = np.arange(n)
    rows = np.concatenate([r, c, diag])
    cols = np.concatenate([c, r, diag])
    vals = np.concatenate([v, v, np.ones(n)])
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


def random_walk(x: np.ndarray, aff: np.ndarray, radius: int, beta: float, exp_times: int) -> np.ndarray:
    """v T^(2^exp_times) for every map of ``x`` (C, h, w) (module docstring), sparse: returns
    float64 (C, h, w)."""
    c, h, w = x.shape
    a = affinity_matrix(aff, radius, beta)
    inv_col = 1.0 / np.asarray(a.sum(axis=0)).ravel()
    z = x.reshape(c, h * w).astype(np.float64).T.copy()  # (N, C): v^T
    for _ in range(2 ** exp_times):
        z = (a @ z) * inv_col[:, None]  # (v A D^-1)^T = D^-1 A z, A symmetric
    return z.T.reshape(c, h, w)


def random_walk_dense(x: np.ndarray, aff: np.ndarray, radius: int, beta: float, exp_times: int) -> np.ndarray:
    """The official algorithm, for tests and the benchmark: dense T, squared ``exp_times``
    times, then v T. O(N^2) memory."""
    c, h, w = x.shape
    n = h * w
    a = np.eye(n)
    r, cc, v = _pairs(aff, radius, beta)
    a[r, cc] = v
    a[cc, r] = v
    t = a / a.sum(axis=0, keepdims=True)
    for _ in range(exp_times):
        t = t @ t
    return (x.reshape(c, n).astype(np.float64) @ t).reshape(c, h, w)


def transition_nnz(aff_shape: tuple[int, int, int], radius: int) -> int:
    """Non-zeros of the sparse A for maps of ``aff_shape`` (K, h, w) (for the benchmark)."""
    _, h, w = aff_shape
    return int(affinity_matrix(np.ones(aff_shape, np.float32), radius, 1.0).nnz)
