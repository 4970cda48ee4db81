"""DSPy retriever modules that fetch knowledge-base entries for a query: dense, BM25, hybrid and none."""

from __future__ import annotations

import logging
import threading
from typing import Any

import dspy

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge.entry import KnowledgeEntry
from nesycd.knowledge.store import Hit, KnowledgeStore

logger = logging.getLogger(__name__)

RETRIEVER_KINDS = ("dense", "bm25", "hybrid", "adaptive", "none")

# Constant of reciprocal rank fusion: a document at rank r in one ranking adds 1 / (RRF_K + r).
# 60 is the value proposed by Cormack, Clarke and Buettcher (SIGIR 2009).
DEFAULT_RRF_K = 60
DEFAULT_HYBRID_CANDIDATES = 20

_COMMON_OPTIONS = ("k", "insert", "min_score", "task_filter")
_OPTIONS = {
    "dense": set(_COMMON_OPTIONS),
    "bm25": set(_COMMON_OPTIONS),
    "hybrid": {*_COMMON_OPTIONS, "candidates", "rrf_k"},
    "adaptive": {"threshold", "max_new_tokens", "inner"},
}


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KnowledgeBaseError(f"{owner} {name} must be a positive integer, got {value!r}.")


def _prediction(query: str, task: str | None, hits: list[Hit], k: int, insert: int) -> dspy.Prediction:
    """Build the output every retriever returns; the trace callback reads ids, scores, k and inserted_ids."""
    inserted = hits[:insert]
    return dspy.Prediction(
        passages=[hit.entry.text for hit in inserted],
        ids=[hit.entry.id for hit in hits],
        scores=[hit.score for hit in hits],
        inserted_ids=[hit.entry.id for hit in inserted],
        k=k,
        query=query,
        task=task,
    )


class _StoreRetriever(dspy.Module):
    """Shared options and output of the retrievers that search a bound KnowledgeStore.

    The `k` best hits are returned with their ids and scores for tracing, and the text
    of the best `insert` hits goes into the prompt. `min_score` drops hits whose score
    (on the retriever's own scale) is lower. With `task_filter`, only entries of the
    call's task are searched. The store is kept in a plain attribute: dspy's
    `named_parameters` and `dump_state` skip it, and `KnowledgeStore.__deepcopy__`
    makes program copies share it.
    """

    nesycd_retriever = True
    kind = ""

    def __init__(self, k: int = 3, insert: int = 1, min_score: float | None = None, task_filter: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        _check_positive_int(name, "k", k)
        if not isinstance(insert, int) or isinstance(insert, bool) or not 0 <= insert <= k:
            raise KnowledgeBaseError(
                f"{name} insert must be an integer from 0 to k={k}, got {insert!r}. "
                "Insert is how many of the k hits go into the prompt."
            )
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))):
            raise KnowledgeBaseError(f"{name} min_score must be a number or None, got {min_score!r}.")
        if not isinstance(task_filter, bool):
            raise KnowledgeBaseError(f"{name} task_filter must be True or False, got {task_filter!r}.")
        self.k = k
        self.insert = insert
        self.min_score = None if min_score is None else float(min_score)
        self.task_filter = task_filter
        self._store: KnowledgeStore | None = None

    @property
    def store(self) -> KnowledgeStore | None:
        """Bound knowledge store, or None before `bind`."""
        return self._store

    def bind(self, store: KnowledgeStore) -> _StoreRetriever:
        """Attach the knowledge store to search and return self."""
        if not isinstance(store, KnowledgeStore):
            raise KnowledgeBaseError(
                f"{type(self).__name__}.bind expects a KnowledgeStore, got {type(store).__name__}. "
                "Open one with nesycd.knowledge.KnowledgeStore(folder)."
            )
        self._store = store
        return self

    def config(self) -> dict[str, Any]:
        """Return the settings as a dict that `make_retriever` accepts."""
        return {
            "kind": self.kind,
            "k": self.k,
            "insert": self.insert,
            "min_score": self.min_score,
            "task_filter": self.task_filter,
        }

    def forward(self, query: str, task: str | None = None) -> dspy.Prediction:
        return self.retrieve(query, task)

    def retrieve(self, query: str, task: str | None = None) -> dspy.Prediction:
        """Search without going through dspy's module call, so a wrapping retriever is traced only once."""
        store = self._require_store()
        if self.task_filter and task is None:
            raise KnowledgeBaseError(
                f"{type(self).__name__} was created with task_filter=True but was called without a task. "
                "Pass task=... or create it with task_filter=False."
            )
        if not isinstance(query, str):
            raise KnowledgeBaseError(f"{type(self).__name__} query must be a string, got {type(query).__name__}.")
        hits = self._search(store, query, task if self.task_filter else None)
        if self.min_score is not None:
            hits = [hit for hit in hits if hit.score >= self.min_score]
        hits = [Hit(entry=hit.entry, score=hit.score, rank=rank) for rank, hit in enumerate(hits[: self.k], start=1)]
        return _prediction(query, task, hits, self.k, self.insert)

    def _require_store(self) -> KnowledgeStore:
        if self._store is None:
            raise KnowledgeBaseError(
                f"{type(self).__name__} has no knowledge base. Call retriever.bind(KnowledgeStore(folder)) before "
                "use, or use NoRetriever() to run without one."
            )
        return self._store

    def _search(self, store: KnowledgeStore, query: str, task: str | None) -> list[Hit]:
        raise NotImplementedError


class DenseRetriever(_StoreRetriever):
    """Retriever that returns the `k` entries whose key embedding is closest to the query (cosine scores)."""

    kind = "dense"

    def _search(self, store: KnowledgeStore, query: str, task: str | None) -> list[Hit]:
        return store.search(query, k=self.k, task=task)


class _BM25Index:
    """A bm25s index over the `key` text of a store's active entries, rebuilt when the store changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._store_id: int | None = None
        self._generation: int | None = None
        self._model: Any = None
        self._entries: list[KnowledgeEntry] = []
        self._tasks: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _BM25Index:
        # Program copies get an empty index and build their own on first use.
        return _BM25Index()

    def search(self, store: KnowledgeStore, query: str, k: int, task: str | None) -> list[Hit]:
        """Return up to `k` entries with a positive BM25 score for `query`, best first; ties are ordered by id."""
        import numpy as np

        model, entries, tasks = self._current(store)
        if model is None:
            return []
        tokens = _tokenize([query])[0]
        if not tokens:
            return []
        scores = np.asarray(model.get_scores(tokens), dtype=np.float64)
        candidates = np.flatnonzero(scores > 0)
        if task is not None:
            candidates = candidates[tasks[candidates] == task]
        ranked = sorted(candidates.tolist(), key=lambda row: (-scores[row], entries[row].id))[:k]
        return [
            Hit(entry=entries[row], score=float(scores[row]), rank=rank) for rank, row in enumerate(ranked, start=1)
        ]

    def _current(self, store: KnowledgeStore) -> tuple[Any, list[KnowledgeEntry], Any]:
        with self._lock:
            if self._store_id != id(store) or self._generation != store.generation:
                self._build(store)
            return self._model, self._entries, self._tasks

    def _build(self, store: KnowledgeStore) -> None:
        import bm25s
        import numpy as np

        generation = store.generation
        entries = [entry for entry in store.entries() if entry.status == "active"]
        model = None
        if entries:
            model = bm25s.BM25()
            model.index(_tokenize([entry.key for entry in entries]), show_progress=False)
        self._model = model
        self._entries = entries
        self._tasks = np.array([entry.task for entry in entries], dtype=object)
        self._store_id = id(store)
        self._generation = generation
        logger.debug("Built a BM25 index over %d entries of %s", len(entries), store.location)


def _tokenize(texts: list[str]) -> list[list[str]]:
    """Split texts into lower-case word tokens without English stop words, with bm25s's tokenizer."""
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Retriever(_StoreRetriever):
    """Retriever that ranks entries by BM25 over their `key` text (scores are BM25 scores, not cosines).

    The index is built with the bm25s package from the bound store's active entries on
    first use, and rebuilt after the store adds or deletes entries. Entries that share
    no word with the query are not returned.
    """

    kind = "bm25"

    def __init__(self, k: int = 3, insert: int = 1, min_score: float | None = None, task_filter: bool = False) -> None:
        super().__init__(k=k, insert=insert, min_score=min_score, task_filter=task_filter)
        self._index = _BM25Index()

    def _search(self, store: KnowledgeStore, query: str, task: str | None) -> list[Hit]:
        return self._index.search(store, query, self.k, task)


class HybridRetriever(_StoreRetriever):
    """Retriever that fuses the dense and BM25 rankings with reciprocal rank fusion.

    Each ranking contributes its best `candidates` entries, and an entry scores
    sum(1 / (rrf_k + rank)) over the rankings that contain it, so scores lie in
    (0, 2 / (rrf_k + 1)]. `min_score` applies to this fused score.
    """

    kind = "hybrid"

    def __init__(
        self,
        k: int = 3,
        insert: int = 1,
        min_score: float | None = None,
        task_filter: bool = False,
        candidates: int = DEFAULT_HYBRID_CANDIDATES,
        rrf_k: int = DEFAULT_RRF_K,
    ) -> None:
        super().__init__(k=k, insert=insert, min_score=min_score, task_filter=task_filter)
        _check_positive_int("HybridRetriever", "candidates", candidates)
        _check_positive_int("HybridRetriever", "rrf_k", rrf_k)
        if candidates < k:
            raise KnowledgeBaseError(
                f"HybridRetriever candidates ({candidates}) must be at least k ({k}), because each ranking "
                "contributes its best `candidates` entries to the fusion."
            )
        self.candidates = candidates
        self.rrf_k = rrf_k
        self._index = _BM25Index()

    def config(self) -> dict[str, Any]:
        """Return the settings as a dict that `make_retriever` accepts."""
        return {**super().config(), "candidates": self.candidates, "rrf_k": self.rrf_k}

    def _search(self, store: KnowledgeStore, query: str, task: str | None) -> list[Hit]:
        dense = store.search(query, k=self.candidates, task=task)
        lexical = self._index.search(store, query, self.candidates, task)
        fused: dict[str, float] = {}
        entries: dict[str, KnowledgeEntry] = {}
        for ranking in (dense, lexical):
            for hit in ranking:
                fused[hit.entry.id] = fused.get(hit.entry.id, 0.0) + 1.0 / (self.rrf_k + hit.rank)
                entries[hit.entry.id] = hit.entry
        ordered = sorted(fused, key=lambda entry_id: (-fused[entry_id], entry_id))
        return [
            Hit(entry=entries[entry_id], score=fused[entry_id], rank=rank)
            for rank, entry_id in enumerate(ordered, start=1)
        ]


class NoRetriever(dspy.Module):
    """Retriever that returns no passages, for programs run without a knowledge base."""

    nesycd_retriever = True
    kind = "none"

    def __init__(self) -> None:
        super().__init__()

    @property
    def store(self) -> None:
        """Always None: this retriever uses no store."""
        return None

    def bind(self, store: KnowledgeStore | None) -> NoRetriever:
        """Accept and ignore a store so that all retrievers bind the same way, and return self."""
        return self

    def config(self) -> dict[str, Any]:
        """Return the settings as a dict that `make_retriever` accepts."""
        return {"kind": "none"}

    def forward(self, query: str, task: str | None = None) -> dspy.Prediction:
        return self.retrieve(query, task)

    def retrieve(self, query: str, task: str | None = None) -> dspy.Prediction:
        """Return an empty result without going through dspy's module call."""
        return dspy.Prediction(passages=[], ids=[], scores=[], inserted_ids=[], k=0, query=query, task=task)


_CLASSES = {"dense": DenseRetriever, "bm25": BM25Retriever, "hybrid": HybridRetriever}


def make_retriever(config: dict[str, Any]) -> dspy.Module:
    """Build an unbound retriever from a dict returned by a retriever's `config()`.

    Options that belong to another retriever kind are ignored, so that a config can
    switch kinds by changing only "kind" (for example `nesycd compile --retriever bm25`
    on a hybrid program). Options that no kind defines raise KnowledgeBaseError.
    An "adaptive" config without "inner" wraps a dense retriever built from the
    remaining k, insert, min_score and task_filter options.
    """
    if not isinstance(config, dict):
        raise KnowledgeBaseError(
            f"Retriever config must be a dict such as {{'kind': 'dense', 'k': 3}}, got {type(config).__name__}."
        )
    kind = config.get("kind")
    if kind not in RETRIEVER_KINDS:
        raise KnowledgeBaseError(f"Unknown retriever kind {kind!r}. The kinds are {list(RETRIEVER_KINDS)}.")
    options = {name: value for name, value in config.items() if name != "kind"}
    every_option = set().union(*_OPTIONS.values())
    unknown = sorted(set(options) - every_option)
    if unknown:
        raise KnowledgeBaseError(
            f"Retriever config of kind {kind!r} has unknown keys {unknown}. "
            f"The allowed keys are {sorted(_OPTIONS.get(kind, set()))}."
        )

    if kind == "none":
        if options:
            logger.info("Retriever kind 'none' ignores the options %s", sorted(options))
        return NoRetriever()
    if kind == "adaptive":
        from nesycd.knowledge.adaptive import AdaptiveRetriever

        inner_config = options.pop("inner", None)
        if inner_config is None:
            inner_config = {"kind": "dense", **{name: options.pop(name) for name in list(options) if name in _COMMON_OPTIONS}}
        if not isinstance(inner_config, dict) or inner_config.get("kind") == "adaptive":
            raise KnowledgeBaseError(
                f"Adaptive retriever config needs 'inner' to be the config of a dense, bm25, hybrid or none "
                f"retriever, got {inner_config!r}."
            )
        chosen = {name: value for name, value in options.items() if name in _OPTIONS["adaptive"]}
        _log_ignored(kind, options, chosen)
        return AdaptiveRetriever(make_retriever(inner_config), **chosen)

    chosen = {name: value for name, value in options.items() if name in _OPTIONS[kind]}
    _log_ignored(kind, options, chosen)
    return _CLASSES[kind](**chosen)


def _log_ignored(kind: str, options: dict[str, Any], chosen: dict[str, Any]) -> None:
    ignored = sorted(set(options) - set(chosen))
    if ignored:
        logger.info("Retriever kind %r ignores the options %s of other kinds", kind, ignored)
