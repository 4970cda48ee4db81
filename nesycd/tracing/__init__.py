"""Trace store: every LM call, retrieval, prediction and stage of a compile run, in one DuckDB file."""

import logging

from nesycd.tracing.store import (
    SCHEMA_VERSION,
    StageHandle,
    TraceStore,
    export_file,
    format_table,
    query_file,
    query_file_many,
    redact_secrets,
)
from nesycd.tracing.usage import pop_usage, set_usage

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "StageHandle",
    "TraceCallback",
    "TraceStore",
    "export_file",
    "format_table",
    "pop_usage",
    "query_file",
    "query_file_many",
    "redact_secrets",
    "set_usage",
]


def __getattr__(name: str):
    # TraceCallback subclasses a DSPy class, so importing it loads dspy. Import it only on first use.
    if name == "TraceCallback":
        from nesycd.tracing.callback import TraceCallback

        return TraceCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
