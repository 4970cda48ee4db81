"""Knowledge base: teacher-written entries, their embedder, the Qdrant store and DSPy retrievers."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from nesycd.knowledge.embedder import PACKAGED_MODEL_ID, Embedder
from nesycd.knowledge.entry import ENTRY_STATUSES, KnowledgeEntry, merge_provenance, parse_teacher_entry
from nesycd.knowledge.store import DEFAULT_DEDUP_THRESHOLD, Hit, KnowledgeStore, is_server_url

if TYPE_CHECKING:
    from nesycd.knowledge.adaptive import AdaptiveRetriever, attach_lm, sweep_thresholds
    from nesycd.knowledge.files import read_entries, write_entries
    from nesycd.knowledge.retrievers import (
        RETRIEVER_KINDS,
        BM25Retriever,
        DenseRetriever,
        HybridRetriever,
        NoRetriever,
        make_retriever,
    )

logger = logging.getLogger(__name__)

# The retrievers import dspy, so they load on first access. The modules imported
# above import sentence_transformers, qdrant_client and numpy only inside functions.
_LAZY = {
    "DenseRetriever": "nesycd.knowledge.retrievers",
    "BM25Retriever": "nesycd.knowledge.retrievers",
    "HybridRetriever": "nesycd.knowledge.retrievers",
    "NoRetriever": "nesycd.knowledge.retrievers",
    "RETRIEVER_KINDS": "nesycd.knowledge.retrievers",
    "make_retriever": "nesycd.knowledge.retrievers",
    "AdaptiveRetriever": "nesycd.knowledge.adaptive",
    "attach_lm": "nesycd.knowledge.adaptive",
    "sweep_thresholds": "nesycd.knowledge.adaptive",
    "read_entries": "nesycd.knowledge.files",
    "write_entries": "nesycd.knowledge.files",
}

__all__ = [
    "DEFAULT_DEDUP_THRESHOLD",
    "ENTRY_STATUSES",
    "PACKAGED_MODEL_ID",
    "RETRIEVER_KINDS",
    "AdaptiveRetriever",
    "BM25Retriever",
    "DenseRetriever",
    "Embedder",
    "Hit",
    "HybridRetriever",
    "KnowledgeEntry",
    "KnowledgeStore",
    "NoRetriever",
    "attach_lm",
    "is_server_url",
    "make_retriever",
    "merge_provenance",
    "parse_teacher_entry",
    "read_entries",
    "sweep_thresholds",
    "write_entries",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
