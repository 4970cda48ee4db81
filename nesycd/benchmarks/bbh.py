"""BIG-Bench Hard: task loading, the deterministic train/test split, CoT demos and the metric."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Sequence

import dspy

from nesycd.benchmarks.answers import answers_match
from nesycd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Answer type per task, derived from the targets of the BBH release: most tasks use option
# letters "(A)".."(R)"; the others use the words or values named here.
ANSWER_TYPES: dict[str, str] = {
    "boolean_expressions": "true_false",
    "causal_judgement": "yes_no",
    "date_understanding": "choice",
    "disambiguation_qa": "choice",
    "dyck_languages": "text",
    "formal_fallacies": "valid_invalid",
    "geometric_shapes": "choice",
    "hyperbaton": "choice",
    "logical_deduction_five_objects": "choice",
    "logical_deduction_seven_objects": "choice",
    "logical_deduction_three_objects": "choice",
    "movie_recommendation": "choice",
    "multistep_arithmetic_two": "number",
    "navigate": "yes_no",
    "object_counting": "number",
    "penguins_in_a_table": "choice",
    "reasoning_about_colored_objects": "choice",
    "ruin_names": "choice",
    "salient_translation_error_detection": "choice",
    "snarks": "choice",
    "sports_understanding": "yes_no",
    "temporal_sequences": "choice",
    "tracking_shuffled_objects_five_objects": "choice",
    "tracking_shuffled_objects_seven_objects": "choice",
    "tracking_shuffled_objects_three_objects": "choice",
    "web_of_lies": "yes_no",
    "word_sorting": "text",
}

TASKS: tuple[str, ...] = tuple(ANSWER_TYPES)

BBH_FOLDER = "bbh"
COT_PROMPTS_FOLDER = "cot-prompts"

INPUT_FIELDS = ("question", "task", "task_description")

_COT_TRIGGER = "Let's think step by step."
_FINAL_ANSWER = "So the answer is"
# The header of a cot-prompts file (canary line) ends at a line of five dashes.
_HEADER_END = re.compile(r"^-----[ \t]*$", re.MULTILINE)
# Exemplars start with "Q:" at the start of a line after a blank line.
_EXEMPLAR_START = re.compile(r"\n[ \t]*\n(?=Q:)")
_DESCRIPTION_LABEL = "Task description:"


def load_task(data_dir: str | Path, task: str) -> list[dspy.Example]:
    """Load every example of one BBH task from ``<data_dir>/bbh/<task>.json``.

    Each example has ``id`` (``"<task>/<index in the file>"``), ``task``,
    ``task_description`` (from ``bbh/cot-prompts/<task>.txt``), ``question`` (the input
    with its options), ``answer`` (the target) and ``answer_type``. The inputs are
    ``question``, ``task`` and ``task_description``.

    Raises:
        DataError: the task is unknown, or the task file or its cot-prompts file is
            missing or malformed.
    """
    _check_task(task)
    path = Path(data_dir) / BBH_FOLDER / f"{task}.json"
    records = _read_task_records(path)
    description, _ = _read_cot_prompt(Path(data_dir), task)

    examples = []
    for index, record in enumerate(records):
        example = dspy.Example(
            id=f"{task}/{index}",
            task=task,
            task_description=description,
            question=record["input"],
            answer=record["target"],
            answer_type=ANSWER_TYPES[task],
        )
        examples.append(example.with_inputs(*INPUT_FIELDS))

    logger.debug("Loaded %d examples of BBH task %s from %s", len(examples), task, path)
    return examples


def split_task(
    examples: Sequence[dspy.Example], test_fraction: float = 0.4, seed: int = 42
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """Split one task's examples into (train, test), deterministically.

    BBH ships a single split, so every task is split by the same rule. A fresh
    ``random.Random(seed)`` shuffles the indices ``0..n-1``. The first
    ``round(test_fraction * n)`` shuffled indices form the test split, and the rest form
    the train split. ``round`` is Python's, which rounds halves to even. Both splits keep
    the input order.

    NOTE: the split is reproducible within one Python minor version. The random module
    documentation guarantees only ``random()`` sequences across minor versions, so a
    later Python could change what ``shuffle`` returns for the same seed.

    Raises:
        ConfigError: ``test_fraction`` is outside [0, 1].
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ConfigError(
            f"test_fraction {test_fraction!r} is outside [0, 1]. Pass a fraction such as 0.4."
        )

    indices = list(range(len(examples)))
    random.Random(seed).shuffle(indices)
    test_size = round(test_fraction * len(examples))
    test_indices = set(indices[:test_size])

    train = [example for index, example in enumerate(examples) if index not in test_indices]
    test = [example for index, example in enumerate(examples) if index in test_indices]
    return train, test


def load_cot_demos(data_dir: str | Path, task: str) -> list[dspy.Example]:
    """Load the chain-of-thought exemplars of ``<data_dir>/bbh/cot-prompts/<task>.txt``.

    Each demo has ``task``, ``task_description``, ``question``, ``reasoning`` (the text
    after "Let's think step by step." up to the final "So the answer is X." sentence),
    ``answer`` (X without its trailing period) and ``answer_type``. The released files
    hold three exemplars per task.

    Raises:
        DataError: the task is unknown, or the file is missing or not in the cot-prompts format.
    """
    _check_task(task)
    description, demos = _read_cot_prompt(Path(data_dir), task)

    examples = []
    for demo in demos:
        example = dspy.Example(
            task=task,
            task_description=description,
            question=demo["question"],
            reasoning=demo["reasoning"],
            answer=demo["answer"],
            answer_type=ANSWER_TYPES[task],
        )
        examples.append(example.with_inputs(*INPUT_FIELDS))
    return examples


def load_bbh(
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    *,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    test_fraction: float = 0.4,
    seed: int = 42,
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """Load BBH tasks and return (train, test), split per task with ``split_task``.

    ``tasks`` defaults to all 27 tasks. ``train_per_task`` and ``test_per_task`` keep the
    first N examples of each task's split, in file order, and None keeps them all.
    Examples are grouped by task, in the order of ``tasks``.

    Raises:
        ConfigError: a per-task count is negative, ``tasks`` repeats a task, or
            ``test_fraction`` is outside [0, 1].
        DataError: a task is unknown or its files are missing or malformed.
    """
    selected = list(TASKS) if tasks is None else list(tasks)
    _check_task_selection(selected)
    for name, count in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if count is not None and count < 0:
            raise ConfigError(f"{name} is {count}. Pass a count of 0 or more, or None for all.")

    train: list[dspy.Example] = []
    test: list[dspy.Example] = []
    for task in selected:
        task_train, task_test = split_task(load_task(data_dir, task), test_fraction, seed)
        train.extend(task_train[:train_per_task])
        test.extend(task_test[:test_per_task])

    logger.info(
        "Loaded BBH: %d tasks, %d train and %d test examples (test_fraction=%s, seed=%s)",
        len(selected),
        len(train),
        len(test),
        test_fraction,
        seed,
    )
    return train, test


def metric(example: dspy.Example, prediction: Any, trace: Any = None) -> bool:
    """Return whether ``prediction.answer`` matches ``example.answer`` under ``example.answer_type``.

    ``prediction.answer`` is an already extracted answer span, or None when the program
    found none. A prediction without an ``answer`` field counts as wrong. ``trace`` is
    unused and accepted for DSPy's metric signature.
    """
    predicted = getattr(prediction, "answer", None)
    return answers_match(predicted, example.answer, example.answer_type)


def _check_task(task: str) -> None:
    if task not in ANSWER_TYPES:
        raise DataError(f"Unknown BBH task {task!r}. Use one of: {', '.join(TASKS)}.")


def _check_task_selection(tasks: list[str]) -> None:
    seen: set[str] = set()
    for task in tasks:
        _check_task(task)
        if task in seen:
            raise ConfigError(f"BBH task {task!r} is listed twice. List each task once.")
        seen.add(task)


def _read_task_records(path: Path) -> list[dict[str, str]]:
    """Read and validate ``{"examples": [{"input": str, "target": str}, ...]}`` from ``path``."""
    expected = 'a JSON object {"examples": [{"input": str, "target": str}, ...]}'
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"BBH task file {path} is missing. Point the data directory at the folder "
            "that contains bbh/<task>.json."
        ) from None
    except OSError as error:
        raise DataError(f"Cannot read BBH task file {path}: {error}.") from error

    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"BBH task file {path} is not valid JSON (line {error.lineno}, column "
            f"{error.colno}: {error.msg}). Expected {expected}."
        ) from error

    records = content.get("examples") if isinstance(content, dict) else None
    if not isinstance(records, list):
        raise DataError(f"BBH task file {path} has no 'examples' list. Expected {expected}.")

    for index, record in enumerate(records):
        valid = (
            isinstance(record, dict)
            and isinstance(record.get("input"), str)
            and isinstance(record.get("target"), str)
        )
        if not valid:
            raise DataError(
                f"BBH task file {path}: examples[{index}] lacks a string 'input' or 'target'. "
                f"Expected {expected}."
            )
    return records


def _read_cot_prompt(data_dir: Path, task: str) -> tuple[str, list[dict[str, str]]]:
    """Parse a cot-prompts file into the task description and its exemplars.

    The file contains a canary line, a line "-----", the task description and then the
    exemplars "Q: ...\\nA: Let's think step by step. ... So the answer is X.", separated by
    blank lines. Everything between the dashes and the first exemplar is the description,
    without a leading "Task description:" label.
    """
    path = data_dir / BBH_FOLDER / COT_PROMPTS_FOLDER / f"{task}.txt"
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except FileNotFoundError:
        raise DataError(
            f"BBH cot-prompts file {path} is missing. Point the data directory at the folder "
            "that contains bbh/cot-prompts/<task>.txt."
        ) from None
    except OSError as error:
        raise DataError(f"Cannot read BBH cot-prompts file {path}: {error}.") from error

    header_end = _HEADER_END.search(text)
    if header_end is None:
        raise DataError(
            f"BBH cot-prompts file {path} has no '-----' line after its header. Expected a "
            "canary line, '-----', the task description and 'Q: ... A: ...' exemplars."
        )

    body = "\n" + text[header_end.end() :].strip("\n")
    blocks = [block.strip() for block in _EXEMPLAR_START.split(body)]
    if blocks and not blocks[0].startswith("Q:"):
        description = _strip_description_label(blocks.pop(0))
    else:
        description = ""

    if not blocks:
        raise DataError(f"BBH cot-prompts file {path} contains no 'Q:' exemplars.")
    demos = [_parse_exemplar(block, path, number) for number, block in enumerate(blocks, 1)]
    return description, demos


def _strip_description_label(description: str) -> str:
    if description.startswith(_DESCRIPTION_LABEL):
        return description[len(_DESCRIPTION_LABEL) :].strip()
    return description


def _parse_exemplar(block: str, path: Path, number: int) -> dict[str, str]:
    """Split one "Q: ...\\nA: Let's think step by step. ... So the answer is X." block."""
    question_part, separator, answer_part = block.partition("\nA:")
    if not separator:
        raise DataError(f"BBH cot-prompts file {path}: exemplar {number} has no 'A:' line.")

    answer_part = answer_part.strip()
    if not answer_part.startswith(_COT_TRIGGER):
        raise DataError(
            f"BBH cot-prompts file {path}: exemplar {number} does not start its answer with "
            f"{_COT_TRIGGER!r}."
        )

    final_position = answer_part.rfind(_FINAL_ANSWER)
    if final_position < 0:
        raise DataError(
            f"BBH cot-prompts file {path}: exemplar {number} has no {_FINAL_ANSWER!r} sentence."
        )

    answer = answer_part[final_position + len(_FINAL_ANSWER) :].strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    if not answer:
        raise DataError(f"BBH cot-prompts file {path}: exemplar {number} has an empty answer.")

    return {
        "question": question_part[len("Q:") :].strip(),
        "reasoning": answer_part[len(_COT_TRIGGER) : final_position].strip(),
        "answer": answer,
    }
