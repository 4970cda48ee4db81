"""Benchmark loaders, answer extraction and metrics."""

from nesycd.benchmarks.answers import (
    ANSWER_MARKER,
    ANSWER_MARKERS,
    answers_match,
    extract_answer,
    normalize_choice,
)
from nesycd.benchmarks.bbh import (
    ANSWER_TYPES,
    TASKS,
    load_bbh,
    load_cot_demos,
    load_task,
    metric,
    split_task,
)

__all__ = [
    "ANSWER_MARKER",
    "ANSWER_MARKERS",
    "ANSWER_TYPES",
    "TASKS",
    "answers_match",
    "extract_answer",
    "load_bbh",
    "load_cot_demos",
    "load_task",
    "metric",
    "normalize_choice",
    "split_task",
]
