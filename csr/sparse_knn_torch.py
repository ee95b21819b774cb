"""The torch sparse kNN engine (GPU, or CPU): normalised database codes as a torch sparse CSR tensor, scored
against dense query blocks with `D @ Q^T` (cuSPARSE SpMM on CUDA), exact top-K with lowest-index ties.

Same contract as the numba engine (csr/sparse_knn.py); `sparse_topk_torch` is the entry point.
"""
from __future__ import annotations

import warnings

import numpy as np

from csr.codes import SparseCodes, validate_codes
from csr.progress import progress_bar
from csr.sparse_rows import normalized_csr, row_slice
from csr.topk import check_pair, require_codes, topk_lowest_index


class TorchSparseIndex:
    """Normalised database codes as a torch sparse CSR tensor on `device`; `search` scores one dense query batch
    at a time with `D @ Q^T` (cuSPARSE SpMM on CUDA) and selects the exact top-K with lowest-index ties."""

    def __init__(self, database: SparseCodes, device: str | None = None):
        import torch
        require_codes(database, "database")
        validate_codes(database.indices, database.values, database.hidden_size, "database codes")
        self.n, self.hidden_size = database.n, database.hidden_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        crow, col, val = normalized_csr(database)
        self.matrix = _torch_csr(crow, col, val, (database.n, database.hidden_size)).to(self.device)

    def query_tensor(self, queries: SparseCodes):
        """Normalised query codes as a dense `[B, hidden]` float32 tensor on the device."""
        qcrow, qcol, qval = normalized_csr(queries)
        return _torch_csr(qcrow, qcol, qval, (queries.n, queries.hidden_size)).to_dense().to(self.device)

    def search_tensor(self, Q, K: int):
        """Top-K for a dense normalised query block on the device: `(indices [B, K], scores [B, K])` tensors."""
        return topk_lowest_index((self.matrix @ Q.T.contiguous()).T, K)

    def search_batch(self, queries: SparseCodes, K: int):
        return self.search_tensor(self.query_tensor(queries), K)

    def search(self, queries: SparseCodes, K: int, *, batch_size: int = 512,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        check_pair(queries, self.hidden_size, self.n, K)
        out_i = np.empty((queries.n, K), dtype=np.int64)
        out_s = np.empty((queries.n, K), dtype=np.float32)
        for b0 in progress_bar(range(0, queries.n, batch_size), desc="sparse kNN (torch)", unit="batch",
                       disable=not progress, mininterval=1.0):
            b1 = min(queries.n, b0 + batch_size)
            ind, sc = self.search_batch(row_slice(queries, b0, b1), K)
            out_i[b0:b1] = ind.cpu().numpy()
            out_s[b0:b1] = sc.cpu().numpy()
        return out_i, out_s


def sparse_topk_torch(queries: SparseCodes, database: SparseCodes, K: int, *, batch_size: int = 512,
                      device: str | None = None, threads: int | None = None,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as `sparse_topk`, computed with torch (see `TorchSparseIndex`). Default device: CUDA if
    available, else CPU (which holds a dense [batch, N] score block: keep batch_size small there)."""
    import torch
    require_codes(database, "database")
    check_pair(queries, database.hidden_size, database.n, K)
    if threads is not None:
        torch.set_num_threads(threads)
    return TorchSparseIndex(database, device).search(queries, K, batch_size=batch_size, progress=progress)


def _torch_csr(crow: np.ndarray, col: np.ndarray, val: np.ndarray, shape: tuple[int, int]):
    import torch
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(val),
                                       size=shape, check_invariants=False)
