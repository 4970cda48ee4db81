"""GSM8K: loading of the grade-school math word problems with their final numeric answers."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import dspy

from nesycd.benchmarks import bbh
from nesycd.benchmarks.jsonl import INPUT_FIELDS, check_choice, check_limit, read_jsonl
from nesycd.errors import DataError

logger = logging.getLogger(__name__)

TASK = "gsm8k"
SPLITS = ("train", "test")
GSM8K_FOLDER = "gsm8k"

TASK_DESCRIPTION = "Solve the grade-school math word problem and give the final answer as a number."

# The worked solution ends with a line "#### <final number>".
ANSWER_SEPARATOR = "####"
# The final numbers of the release are integers, some negative and some with thousands commas.
_FINAL_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

_EXPECTED = 'a JSON object {"question": str, "answer": str} whose answer ends with "#### <number>"'
_HINT = "Point the data directory at the folder that contains gsm8k/train.jsonl and gsm8k/test.jsonl."

# The final answer is compared numerically: "1,080", "$1080" and "1080.0" all match "1080".
metric = bbh.metric


def load_gsm8k(data_dir: str | Path, split: str = "train", limit: int | None = None) -> list[dspy.Example]:
    """Load GSM8K questions from ``<data_dir>/gsm8k/<split>.jsonl``, in file order.

    Each example has ``id`` (``"gsm8k/<split>/<index in the file>"``), ``task`` ("gsm8k"),
    ``task_description``, ``question``, ``answer`` (the number after "####", without thousands
    commas) and ``answer_type`` ("number"). The inputs are ``question``, ``task`` and
    ``task_description``. ``limit`` keeps the first N examples, and None keeps them all.

    Raises:
        ConfigError: ``split`` is not "train" or "test", or ``limit`` is negative.
        DataError: the file is missing, or a line is not valid JSON or lacks a string
            question or an answer that ends with "#### <number>".
    """
    check_choice(split, SPLITS, name="GSM8K split")
    check_limit(limit)
    path = Path(data_dir) / GSM8K_FOLDER / f"{split}.jsonl"

    examples = []
    records = read_jsonl(path, name="GSM8K", expected=_EXPECTED, hint=_HINT, limit=limit)
    for line_number, record in records:
        question, answer = _parse_record(record, path, line_number)
        example = dspy.Example(
            id=f"{TASK}/{split}/{len(examples)}",
            task=TASK,
            task_description=TASK_DESCRIPTION,
            question=question,
            answer=answer,
            answer_type="number",
        )
        examples.append(example.with_inputs(*INPUT_FIELDS))

    logger.debug("Loaded %d GSM8K %s examples from %s", len(examples), split, path)
    return examples


def final_answer(solution: str) -> str | None:
    """Return the number after the last "####" of a worked solution, without commas, or None."""
    _, separator, tail = solution.rpartition(ANSWER_SEPARATOR)
    if not separator:
        return None
    number = tail.strip()
    if _FINAL_NUMBER.fullmatch(number) is None:
        return None
    return number.replace(",", "")


def _parse_record(record: dict[str, Any], path: Path, line_number: int) -> tuple[str, str]:
    question = record.get("question")
    solution = record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(
            f"GSM8K file {path}, line {line_number}: missing or empty string 'question'. Expected {_EXPECTED}."
        )
    if not isinstance(solution, str):
        raise DataError(f"GSM8K file {path}, line {line_number}: missing string 'answer'. Expected {_EXPECTED}.")

    answer = final_answer(solution)
    if answer is None:
        tail = solution.rsplit("\n", 1)[-1]
        raise DataError(
            f"GSM8K file {path}, line {line_number}: the answer does not end with '#### <number>' "
            f"(last line {tail!r}). Expected {_EXPECTED}."
        )
    return question.strip(), answer
