"""The denoising stage's own caches: a kNN graph and an eigenbasis saved as .npz (--precomputed-graph,
--precomputed-eigenbasis), each tagged with a fingerprint of its cells and settings so that it is
never reused for others."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from src.utils.io import UserInputError, atomic_path


def cells_fingerprint(image_ids: np.ndarray, cell_indices: np.ndarray, settings: str = "") -> str:
    """Short hash of the ordered (image_id, cell_i) list and the graph settings, so a saved graph or
    eigenbasis is never reused for other cells or other settings."""
    digest = hashlib.sha1()
    digest.update(np.asarray(image_ids).astype("S64").tobytes())
    digest.update(np.asarray(cell_indices, dtype=np.int64).tobytes())
    digest.update(settings.encode())
    return digest.hexdigest()[:16]


def save_graph(path: str | os.PathLike, adjacency: sp.csr_matrix, fingerprint: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, indptr=adjacency.indptr, indices=adjacency.indices, shape=np.array(adjacency.shape),
                 fingerprint=np.array(fingerprint))


def load_graph(path: str | os.PathLike, fingerprint: str) -> sp.csr_matrix:
    """Load a graph saved by save_graph; UserInputError if it was built for other cells or settings."""
    with np.load(Path(path)) as saved:
        if str(saved["fingerprint"]) != fingerprint:
            raise UserInputError(f"{path} was built for other cells or other graph settings; delete it or "
                                 "point --precomputed-graph elsewhere")
        indices = saved["indices"]
        return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, saved["indptr"]),
                             shape=tuple(saved["shape"]))


def save_eigenbasis(path: str | os.PathLike, eigenvalues: np.ndarray, vectors: np.ndarray, fingerprint: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, eigenvalues=eigenvalues, vectors=vectors, fingerprint=np.array(fingerprint))


def load_eigenbasis(path: str | os.PathLike, fingerprint: str, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Load (eigenvalues, V) saved by save_eigenbasis, keeping the first m; UserInputError on a mismatch."""
    with np.load(Path(path)) as saved:
        if str(saved["fingerprint"]) != fingerprint:
            raise UserInputError(f"{path} was computed for other cells or other graph settings; delete it or "
                                 "point --precomputed-eigenbasis elsewhere")
        if saved["eigenvalues"].shape[0] < m:
            raise UserInputError(f"{path} holds {saved['eigenvalues'].shape[0]} eigenpairs, fewer than m = {m}")
        return (saved["eigenvalues"][:m].astype(np.float32),
                np.ascontiguousarray(saved["vectors"][:, :m], dtype=np.float32))
