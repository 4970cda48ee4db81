"""JSON Lines reading and option rendering shared by the GSM8K, ARC and AGIEval loaders."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from nesycd.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CHOICE_LETTERS = "ABCDE"

INPUT_FIELDS = ("question", "task", "task_description")


def read_jsonl(
    path: Path, *, name: str, expected: str, hint: str, limit: int | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of the JSON Lines file ``path``.

    ``name`` is the data set name used in messages, and ``expected`` describes one valid line.
    ``hint`` ends the missing-file message and says where the file belongs. Reading stops after
    ``limit`` objects, so lines past the limit are not checked. Line numbers start at 1 and count
    blank lines.

    Raises:
        DataError: the file is missing or unreadable, a line is not valid UTF-8 or JSON, a line
            is not a JSON object, or the file contains no objects.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{name} file {path} is missing. {hint}") from None
    except OSError as error:
        raise DataError(f"Cannot read {name} file {path}: {error}.") from error

    count = 0
    with handle:
        for line_number, raw_line in enumerate(handle, 1):
            if limit is not None and count >= limit:
                return
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{name} file {path}, line {line_number}: not valid UTF-8 ({error.reason}). "
                    f"Expected {expected}."
                ) from error
            if not line.strip():
                continue

            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{name} file {path}, line {line_number}: invalid JSON (column {error.colno}: "
                    f"{error.msg}). Expected {expected}."
                ) from error
            if not isinstance(record, dict):
                raise DataError(
                    f"{name} file {path}, line {line_number}: a JSON {type(record).__name__} "
                    f"instead of an object. Expected {expected}."
                )

            count += 1
            yield line_number, record

    if count == 0 and limit != 0:
        raise DataError(f"{name} file {path} contains no examples. Expected {expected}.")


def check_limit(limit: int | None) -> None:
    """Raise ConfigError unless ``limit`` is None or a count of 0 or more."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit is {limit!r}. Pass a count of 0 or more, or None for all examples.")


def check_choice(value: str, allowed: Sequence[str], *, name: str) -> None:
    """Raise ConfigError, naming the option ``name``, unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"Unknown {name} {value!r}. Use one of: {', '.join(allowed)}.")


def render_options(texts: Sequence[str]) -> str:
    """Render option texts as an "Options:" line and one "(A) text" line per option."""
    lines = ["Options:"]
    lines += [f"({letter}) {text}" for letter, text in zip(CHOICE_LETTERS, texts)]
    return "\n".join(lines)
