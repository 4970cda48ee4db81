"""Knowledge base: teacher-written entries, their embedder, the Qdrant store and DSPy retrievers."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from nesycd.knowledge.embedder import PACKAGED_MODEL_ID, Embedder
from nesycd.knowledge.entry import KnowledgeEntry, parse_teacher_entry
from nesycd.knowledge.store import Hit, KnowledgeStore

if TYPE_CHECKING:
    from nesycd.knowledge.retrievers import DenseRetriever, NoRetriever, make_retriever

logger = logging.getLogger(__name__)

# The retrievers import dspy, so they load on first access. The modules imported
# above import sentence_transformers and qdrant_client only inside functions.
_LAZY = {
    "DenseRetriever": "nesycd.knowledge.retrievers",
    "NoRetriever": "nesycd.knowledge.retrievers",
    "make_retriever": "nesycd.knowledge.retrievers",
}

__all__ = [
    "PACKAGED_MODEL_ID",
    "DenseRetriever",
    "Embedder",
    "Hit",
    "KnowledgeEntry",
    "KnowledgeStore",
    "NoRetriever",
    "make_retriever",
    "parse_teacher_entry",
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
