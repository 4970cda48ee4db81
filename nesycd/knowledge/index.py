"""In-process exact cosine index over a collection's vectors, with task and status filters."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

_INITIAL_CAPACITY = 64


class VectorIndex:
    """Unit vectors in one float32 matrix, searched by exact dot product with numpy.

    qdrant-client's local mode (1.20) scans every point in Python code, which took 88 to
    140 ms per query at 10k points on a shared 2-core machine (benchmarks/kb_latency.py,
    figures in benchmarks/README.md). This index computes the same ranking with one
    matrix-vector product. The store keeps it in sync with its collection on every add
    and delete, so it must own the collection alone (local folder or ":memory:" mode).
    Vectors must be L2-normalised, as the embedder returns them, so that the dot product
    is the cosine similarity that Qdrant reports.
    """

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self._vectors = np.zeros((_INITIAL_CAPACITY, dimension), dtype=np.float32)
        self._task_codes = np.zeros(_INITIAL_CAPACITY, dtype=np.int32)
        self._status_codes = np.zeros(_INITIAL_CAPACITY, dtype=np.int32)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._codes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._rows

    def _code(self, value: str) -> int:
        code = self._codes.get(value)
        if code is None:
            code = len(self._codes) + 1
            self._codes[value] = code
        return code

    def _grow(self, needed: int) -> None:
        capacity = self._vectors.shape[0]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        vectors = np.zeros((capacity, self.dimension), dtype=np.float32)
        vectors[: len(self._ids)] = self._vectors[: len(self._ids)]
        self._vectors = vectors
        for name in ("_task_codes", "_status_codes"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=np.int32)
            new[: len(self._ids)] = old[: len(self._ids)]
            setattr(self, name, new)

    def upsert(self, ids: list[str], vectors: np.ndarray | list, tasks: list[str], statuses: list[str]) -> None:
        """Insert rows, or replace the rows of ids that are already indexed."""
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dimension)
        self._grow(len(self._ids) + len(ids))
        for entry_id, vector, task, status in zip(ids, matrix, tasks, statuses):
            row = self._rows.get(entry_id)
            if row is None:
                row = len(self._ids)
                self._ids.append(entry_id)
                self._rows[entry_id] = row
            self._vectors[row] = vector
            self._task_codes[row] = self._code(task)
            self._status_codes[row] = self._code(status)

    def set_status(self, entry_id: str, status: str, task: str) -> None:
        """Change the filter fields of an indexed row without touching its vector."""
        row = self._rows[entry_id]
        self._task_codes[row] = self._code(task)
        self._status_codes[row] = self._code(status)

    def remove(self, entry_id: str) -> None:
        """Drop the row of `entry_id` (a no-op when it is not indexed) by moving the last row into its place."""
        row = self._rows.pop(entry_id, None)
        if row is None:
            return
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._vectors[row] = self._vectors[last]
            self._task_codes[row] = self._task_codes[last]
            self._status_codes[row] = self._status_codes[last]
            self._ids[row] = moved
            self._rows[moved] = row
        self._ids.pop()

    def search(
        self, vector: np.ndarray | list, k: int, *, task: str | None = None, status: str | None = None
    ) -> list[tuple[str, float]]:
        """Return up to `k` (id, cosine) pairs, best first; ties are ordered by id."""
        count = len(self._ids)
        if count == 0:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(self.dimension)

        mask = None
        for value, codes in ((task, self._task_codes), (status, self._status_codes)):
            if value is None:
                continue
            code = self._codes.get(value)
            if code is None:
                return []
            condition = codes[:count] == code
            mask = condition if mask is None else mask & condition

        # einsum computes the products in one thread without BLAS. On a shared 2-core machine it was
        # faster and steadier than `@`, whose OpenBLAS threads compete with torch's (numpy 2.4:
        # 0.7 ms instead of 8 ms for 5k of 100k rows, median of 50 calls).
        if mask is None:
            rows = None
            scores = np.einsum("ij,j->i", self._vectors[:count], query)
        else:
            rows = np.flatnonzero(mask)
            if rows.size == 0:
                return []
            scores = np.einsum("ij,j->i", self._vectors[rows], query)

        if k < scores.size:
            best = np.argpartition(-scores, k - 1)[:k]
        else:
            best = np.arange(scores.size)
        pairs = []
        for position in best:
            row = int(position) if rows is None else int(rows[position])
            pairs.append((self._ids[row], float(scores[position])))
        pairs.sort(key=lambda pair: (-pair[1], pair[0]))
        return pairs
