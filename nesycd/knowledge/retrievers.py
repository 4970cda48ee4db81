"""DSPy retriever modules that fetch knowledge-base entries for a query."""

from __future__ import annotations

import logging
from typing import Any

import dspy

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge.store import KnowledgeStore

logger = logging.getLogger(__name__)

RETRIEVER_KINDS = ("dense", "none")


class DenseRetriever(dspy.Module):
    """Retriever that returns the `k` entries whose key embedding is closest to the query.

    The text of the best `insert` hits goes into the prompt, and the ids and
    scores of all hits are returned for tracing. The store is kept in a plain
    attribute: dspy's `named_parameters` and `dump_state` skip it, and
    `KnowledgeStore.__deepcopy__` makes program copies share it.
    """

    nesycd_retriever = True

    def __init__(self, k: int = 3, insert: int = 1, min_score: float | None = None, task_filter: bool = False) -> None:
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise KnowledgeBaseError(f"DenseRetriever k must be a positive integer, got {k!r}.")
        if not isinstance(insert, int) or isinstance(insert, bool) or not 0 <= insert <= k:
            raise KnowledgeBaseError(
                f"DenseRetriever insert must be an integer from 0 to k={k}, got {insert!r}. "
                "Insert is how many of the k hits go into the prompt."
            )
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))):
            raise KnowledgeBaseError(f"DenseRetriever min_score must be a number or None, got {min_score!r}.")
        if not isinstance(task_filter, bool):
            raise KnowledgeBaseError(f"DenseRetriever task_filter must be True or False, got {task_filter!r}.")
        self.k = k
        self.insert = insert
        self.min_score = None if min_score is None else float(min_score)
        self.task_filter = task_filter
        self._store: KnowledgeStore | None = None

    @property
    def store(self) -> KnowledgeStore | None:
        """Bound knowledge store, or None before `bind`."""
        return self._store

    def bind(self, store: KnowledgeStore) -> DenseRetriever:
        """Attach the knowledge store to search and return self."""
        if not isinstance(store, KnowledgeStore):
            raise KnowledgeBaseError(
                f"DenseRetriever.bind expects a KnowledgeStore, got {type(store).__name__}. "
                "Open one with nesycd.knowledge.KnowledgeStore(folder)."
            )
        self._store = store
        return self

    def config(self) -> dict[str, Any]:
        """Return the settings as a dict that `make_retriever` accepts."""
        return {
            "kind": "dense",
            "k": self.k,
            "insert": self.insert,
            "min_score": self.min_score,
            "task_filter": self.task_filter,
        }

    def forward(self, query: str, task: str | None = None) -> dspy.Prediction:
        if self._store is None:
            raise KnowledgeBaseError(
                "DenseRetriever has no knowledge base. Call retriever.bind(KnowledgeStore(folder)) before use, "
                "or use NoRetriever() to run without one."
            )
        if self.task_filter and task is None:
            raise KnowledgeBaseError(
                "DenseRetriever was created with task_filter=True but was called without a task. "
                "Pass task=... or create it with task_filter=False."
            )
        hits = self._store.search(
            query,
            k=self.k,
            task=task if self.task_filter else None,
            min_score=self.min_score,
        )
        inserted = hits[: self.insert]
        return dspy.Prediction(
            passages=[hit.entry.text for hit in inserted],
            ids=[hit.entry.id for hit in hits],
            scores=[hit.score for hit in hits],
            inserted_ids=[hit.entry.id for hit in inserted],
            k=self.k,
            query=query,
            task=task,
        )


class NoRetriever(dspy.Module):
    """Retriever that returns no passages, for programs run without a knowledge base."""

    nesycd_retriever = True

    def __init__(self) -> None:
        super().__init__()

    def bind(self, store: KnowledgeStore | None) -> NoRetriever:
        """Accept and ignore a store so that both retrievers bind the same way, and return self."""
        return self

    def config(self) -> dict[str, Any]:
        """Return the settings as a dict that `make_retriever` accepts."""
        return {"kind": "none"}

    def forward(self, query: str, task: str | None = None) -> dspy.Prediction:
        return dspy.Prediction(passages=[], ids=[], scores=[], inserted_ids=[], k=0, query=query, task=task)


def make_retriever(config: dict[str, Any]) -> dspy.Module:
    """Build an unbound retriever from a dict returned by a retriever's `config()`."""
    if not isinstance(config, dict):
        raise KnowledgeBaseError(
            f"Retriever config must be a dict such as {{'kind': 'dense', 'k': 3}}, got {type(config).__name__}."
        )
    kind = config.get("kind")
    options = {name: value for name, value in config.items() if name != "kind"}

    if kind == "dense":
        allowed = {"k", "insert", "min_score", "task_filter"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise KnowledgeBaseError(
                f"Dense retriever config has unknown keys {unknown}. The allowed keys are {sorted(allowed)}."
            )
        return DenseRetriever(**options)
    if kind == "none":
        if options:
            raise KnowledgeBaseError(
                f"Retriever config of kind 'none' takes no options, got {sorted(options)}. Remove them."
            )
        return NoRetriever()
    raise KnowledgeBaseError(
        f"Unknown retriever kind {kind!r}. The kinds are {list(RETRIEVER_KINDS)}."
    )
