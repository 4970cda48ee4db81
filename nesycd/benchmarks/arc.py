"""ARC (AI2 Reasoning Challenge): loading of the multiple-choice science questions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dspy

from nesycd.benchmarks import bbh
from nesycd.benchmarks.jsonl import (
    CHOICE_LETTERS,
    INPUT_FIELDS,
    check_choice,
    check_limit,
    read_jsonl,
    render_options,
)
from nesycd.errors import DataError

logger = logging.getLogger(__name__)

ARC_FOLDER = "arc"
SPLITS = ("Train", "Dev", "Test")

# Task name and description per subset folder.
SUBSETS: dict[str, tuple[str, str]] = {
    "ARC-Easy": (
        "arc_easy",
        "Answer the grade-school science question by choosing the correct option.",
    ),
    "ARC-Challenge": (
        "arc_challenge",
        "Answer the hard grade-school science question, which needs reasoning beyond fact lookup, "
        "by choosing the correct option.",
    ),
}

_EXPECTED = (
    'a JSON object {"id": str, "question": {"stem": str, "choices": [{"text": str, "label": str}, ...]}, '
    '"answerKey": str} with 2 to 5 choices and an answerKey equal to one of the choice labels'
)
_HINT = "Point the data directory at the folder that contains arc/ARC-Easy/ and arc/ARC-Challenge/."

# The gold answer is an option letter "(A)".."(E)".
metric = bbh.metric


def load_arc(
    data_dir: str | Path, subset: str = "ARC-Easy", split: str = "Train", limit: int | None = None
) -> list[dspy.Example]:
    """Load ARC questions from ``<data_dir>/arc/<subset>/<subset>-<split>.jsonl``, in file order.

    Each example has ``id`` (``"<task>/<AI2 question id>"``), ``task`` ("arc_easy" or
    ``"arc_challenge"``), ``task_description``, ``question`` (the stem, then "Options:" and
    one "(A) text" line per choice), ``answer`` (the letter "(A)".."(E)" of the correct
    choice) and ``answer_type`` ("choice"). The inputs are ``question``, ``task`` and
    ``task_description``. Some questions label their choices "1".."4", and these labels are
    mapped to letters by position. ``limit`` keeps the first N examples, and None keeps them all.

    Raises:
        ConfigError: ``subset`` or ``split`` is unknown, or ``limit`` is negative.
        DataError: the file is missing, or a line is not valid JSON or not in AI2's ARC format.
    """
    check_choice(subset, tuple(SUBSETS), name="ARC subset")
    check_choice(split, SPLITS, name="ARC split")
    check_limit(limit)
    task, description = SUBSETS[subset]
    path = Path(data_dir) / ARC_FOLDER / subset / f"{subset}-{split}.jsonl"
    if split == "Test" and not path.is_file():
        raise DataError(
            f"ARC test file {path} is missing. Only the Train and Dev files are available here, "
            "so load split='Dev' as the evaluation split, or add AI2's original Test file."
        )

    examples = []
    seen_ids: set[str] = set()
    for line_number, record in read_jsonl(path, name="ARC", expected=_EXPECTED, hint=_HINT, limit=limit):
        record_id, question, answer = _parse_record(record, path, line_number)
        if record_id in seen_ids:
            raise DataError(
                f"ARC file {path}, line {line_number}: question id {record_id!r} appears twice. "
                "Expected unique ids."
            )
        seen_ids.add(record_id)

        example = dspy.Example(
            id=f"{task}/{record_id}",
            task=task,
            task_description=description,
            question=question,
            answer=answer,
            answer_type="choice",
        )
        examples.append(example.with_inputs(*INPUT_FIELDS))

    logger.debug("Loaded %d ARC examples from %s", len(examples), path)
    return examples


def _parse_record(record: dict[str, Any], path: Path, line_number: int) -> tuple[str, str, str]:
    """Return (id, question with options, answer letter) of one ARC line."""

    def invalid(problem: str) -> DataError:
        return DataError(f"ARC file {path}, line {line_number}: {problem}. Expected {_EXPECTED}.")

    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise invalid("missing or empty string 'id'")

    body = record.get("question")
    stem = body.get("stem") if isinstance(body, dict) else None
    if not isinstance(stem, str) or not stem.strip():
        raise invalid("missing or empty string 'question.stem'")

    choices = body.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise invalid(f"'question.choices' must be a list of 2 to {len(CHOICE_LETTERS)} choices")
    labels: list[str] = []
    texts: list[str] = []
    for index, choice in enumerate(choices):
        valid = (
            isinstance(choice, dict)
            and isinstance(choice.get("text"), str)
            and isinstance(choice.get("label"), str)
        )
        if not valid:
            raise invalid(f"choice {index + 1} lacks a string 'text' or 'label'")
        labels.append(choice["label"])
        texts.append(choice["text"].strip())
    if len(set(labels)) != len(labels):
        raise invalid(f"the choice labels {labels} repeat a label")

    answer_key = record.get("answerKey")
    if answer_key not in labels:
        raise invalid(f"answerKey {answer_key!r} is not one of the choice labels {labels}")

    letter = CHOICE_LETTERS[labels.index(answer_key)]
    question = f"{stem.strip()}\n{render_options(texts)}"
    return record_id, question, f"({letter})"
