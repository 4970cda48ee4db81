"""AGIEval: loading of the English multiple-choice exam subsets (LSAT, LogiQA, SAT, AQuA-RAT)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

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
from nesycd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

AGIEVAL_FOLDER = "agieval"

# Task description per English multiple-choice subset, in the default loading order.
SUBSETS: dict[str, str] = {
    "lsat-ar": "Answer the LSAT analytical reasoning question about the arrangement the passage "
    "describes by choosing the correct option.",
    "lsat-lr": "Answer the LSAT logical reasoning question about the argument in the passage by "
    "choosing the correct option.",
    "lsat-rc": "Answer the LSAT reading comprehension question about the passage by choosing the "
    "correct option.",
    "logiqa-en": "Answer the logical reasoning question about the passage by choosing the correct option.",
    "sat-math": "Solve the SAT math question and choose the correct option.",
    "sat-en": "Answer the SAT reading and writing question about the passage by choosing the correct option.",
    "sat-en-without-passage": "Answer the SAT reading and writing question, whose passage is not "
    "given, by choosing the most likely option.",
    "aqua-rat": "Solve the algebra word problem and choose the correct option.",
}

_EXPECTED = (
    'a JSON object {"passage": str or null, "question": str, "options": ["(A)text", ...], '
    '"label": "A".."E"} with 2 to 5 options and a label that names one of them'
)
_HINT = "Point the data directory at the folder that contains agieval/<subset>.jsonl."

# An option normally starts with its letter in brackets, "(A)text".
_BRACKETED_LABEL = re.compile(r"^\(\s*([A-E])\s*\)\s*")
# NOTE: a few logiqa-en options write the letter without brackets ("A first", "A? text"). Such a
# prefix is removed only when its letter matches the option's position, so an unlabelled option
# whose text starts with that letter as a word, like "A dog" in position A, loses the word "A".
_BARE_LABEL = re.compile(r"^([A-E])(?:\?\s*|\s+)")

# The gold answer is an option letter "(A)".."(E)".
metric = bbh.metric


def load_agieval(
    data_dir: str | Path, subsets: Sequence[str] | None = None, limit: int | None = None
) -> list[dspy.Example]:
    """Load AGIEval subsets from ``<data_dir>/agieval/<subset>.jsonl``, grouped by subset.

    ``subsets`` defaults to all keys of ``SUBSETS``. Each example has ``id``
    (``"<subset>/<index in the file>"``), ``task`` (the subset name), ``task_description``,
    ``question`` (the passage when there is one, a blank line, the question, then "Options:"
    and one "(A) text" line per option), ``answer`` (the label as "(A)".."(E)") and
    ``answer_type`` ("choice"). The inputs are ``question``, ``task`` and ``task_description``.
    ``limit`` keeps the first N examples of each subset, and None keeps them all.

    Raises:
        ConfigError: ``subsets`` is a single string, a subset is unknown or listed twice, or
            ``limit`` is negative.
        DataError: a file is missing, or a line is not valid JSON or not in AGIEval's
            multiple-choice format.
    """
    if isinstance(subsets, str):
        raise ConfigError(f"subsets is the string {subsets!r}. Pass a list of names, e.g. [{subsets!r}].")
    selected = list(SUBSETS) if subsets is None else list(subsets)
    _check_subsets(selected)
    check_limit(limit)

    examples: list[dspy.Example] = []
    for subset in selected:
        examples.extend(_load_subset(Path(data_dir), subset, limit))

    logger.debug("Loaded %d AGIEval examples from %d subsets", len(examples), len(selected))
    return examples


def _check_subsets(subsets: list[str]) -> None:
    seen: set[str] = set()
    for subset in subsets:
        check_choice(subset, tuple(SUBSETS), name="AGIEval subset")
        if subset in seen:
            raise ConfigError(f"AGIEval subset {subset!r} is listed twice. List each subset once.")
        seen.add(subset)


def _load_subset(data_dir: Path, subset: str, limit: int | None) -> list[dspy.Example]:
    path = data_dir / AGIEVAL_FOLDER / f"{subset}.jsonl"
    examples = []
    for line_number, record in read_jsonl(path, name="AGIEval", expected=_EXPECTED, hint=_HINT, limit=limit):
        question, answer = _parse_record(record, path, line_number)
        example = dspy.Example(
            id=f"{subset}/{len(examples)}",
            task=subset,
            task_description=SUBSETS[subset],
            question=question,
            answer=answer,
            answer_type="choice",
        )
        examples.append(example.with_inputs(*INPUT_FIELDS))
    return examples


def _parse_record(record: dict[str, Any], path: Path, line_number: int) -> tuple[str, str]:
    """Return (question text with passage and options, answer letter) of one AGIEval line."""

    def invalid(problem: str) -> DataError:
        return DataError(f"AGIEval file {path}, line {line_number}: {problem}. Expected {_EXPECTED}.")

    passage = record.get("passage")
    if passage is not None and not isinstance(passage, str):
        raise invalid(f"'passage' is a {type(passage).__name__}, not a string or null")

    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise invalid("missing or empty string 'question'")

    options = record.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(CHOICE_LETTERS):
        raise invalid(f"'options' must be a list of 2 to {len(CHOICE_LETTERS)} strings")
    labelled: dict[str, str] = {}
    for index, option in enumerate(options):
        if not isinstance(option, str):
            raise invalid(f"option {index + 1} is a {type(option).__name__}, not a string")
        letter, text = _split_option(option, CHOICE_LETTERS[index])
        if letter in labelled:
            raise invalid(f"option {index + 1} {option[:40]!r} repeats the letter ({letter})")
        labelled[letter] = text

    letters = CHOICE_LETTERS[: len(options)]
    if sorted(labelled) != list(letters):
        found = ", ".join(sorted(labelled))
        raise invalid(f"the option letters are {found} instead of {', '.join(letters)}")
    texts = [labelled[letter] for letter in letters]

    label = record.get("label")
    if not isinstance(label, str) or label not in letters:
        raise invalid(f"label {label!r} is not one of the option letters {', '.join(letters)}")

    parts = [passage.strip()] if passage and passage.strip() else []
    parts.append(f"{question.strip()}\n{render_options(texts)}")
    return "\n\n".join(parts), f"({label})"


def _split_option(option: str, position_letter: str) -> tuple[str, str]:
    """Split an option into its letter and its text.

    The letter is the bracketed label when there is one, because a few logiqa-en lines list
    their options in the order A, C, B, D. An option without a bracketed label takes the letter
    of its position in the list.
    """
    stripped = option.strip()
    bracketed = _BRACKETED_LABEL.match(stripped)
    if bracketed:
        return bracketed.group(1), stripped[bracketed.end() :].strip()

    bare = _BARE_LABEL.match(stripped)
    if bare and bare.group(1) == position_letter:
        return position_letter, stripped[bare.end() :].strip()
    return position_letter, stripped
