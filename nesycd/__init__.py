"""nesycd: Neural-Symbolic Collaborative Distillation of LLM reasoning into small models, as DSPy programs.

Heavy libraries load on first use, so `import nesycd` and the CLI start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ReasonStep": "nesycd.adapter",
    "ReasoningAdapter": "nesycd.adapter",
    "DenseRetriever": "nesycd.knowledge.retrievers",
    "BM25Retriever": "nesycd.knowledge.retrievers",
    "HybridRetriever": "nesycd.knowledge.retrievers",
    "NoRetriever": "nesycd.knowledge.retrievers",
    "AdaptiveRetriever": "nesycd.knowledge.adaptive",
    "attach_lm": "nesycd.knowledge.adaptive",
    "load": "nesycd.artifact",
    "load_program": "nesycd.program",
    "make_lm": "nesycd.lm",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nesycd' has no attribute {name!r}")
