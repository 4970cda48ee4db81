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

from nesycd.benchmarks.agieval import SUBSETS as AGIEVAL_SUBSETS
from nesycd.benchmarks.agieval import load_agieval
from nesycd.benchmarks.arc import SUBSETS as ARC_SUBSETS
from nesycd.benchmarks.arc import load_arc
from nesycd.benchmarks.gsm8k import load_gsm8k

__all__ += [
    "AGIEVAL_SUBSETS",
    "ARC_SUBSETS",
    "load_agieval",
    "load_arc",
    "load_gsm8k",
]
