"""Knowledge entries as JSONL or Markdown files that people can read, edit and import, with line-numbered checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge.entry import ENTRY_STATUSES, KnowledgeEntry

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "markdown")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".md": "markdown", ".markdown": "markdown"}

TEXT_FIELDS = ("key", "learning_summary", "supplementary_knowledge")
LIST_FIELDS = ("source_example_ids", "failure_ids", "merged_ids")
ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(KnowledgeEntry))
_REQUIRED = ("task", *TEXT_FIELDS)
_METADATA_ORDER = tuple(name for name in ENTRY_FIELDS if name not in TEXT_FIELDS)

# A Markdown export marks each entry and each text section with an HTML comment on a line
# of its own, which renderers hide. Text is copied verbatim between the markers.
_MARKER = re.compile(r"^<!-- nesycd:([A-Za-z_]+) -->[ \t]*$")
_METADATA_LINE = re.compile(r"^- ([A-Za-z_]+):[ \t]?(.*)$")
_MAX_REPORTED_ERRORS = 50


@dataclass(frozen=True)
class RecordError:
    """One problem in an import file: the 1-based line and what is wrong there."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class EntryFileError(KnowledgeBaseError):
    """An import file has invalid records; `errors` lists every problem with its line."""

    def __init__(self, path: Path | str, errors: list[RecordError]) -> None:
        self.path = str(path)
        self.errors = list(errors)
        listed = "\n".join(f"  {error}" for error in self.errors[:_MAX_REPORTED_ERRORS])
        more = len(self.errors) - _MAX_REPORTED_ERRORS
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{self.path} has {len(self.errors)} invalid record(s), so nothing was written:\n{listed}{tail}\n"
            "Fix these lines and run the command again."
        )


def detect_format(path: Path | str, explicit: str | None = None) -> str:
    """Return "jsonl" or "markdown": `explicit` when given, else from the file suffix."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise KnowledgeBaseError(f"Unknown entry file format {explicit!r}. The formats are {list(FORMATS)}.")
        return explicit
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise KnowledgeBaseError(
            f"Cannot tell the format of {str(path)!r} from its suffix {suffix!r}. Name it .jsonl or .md, "
            "or pass --format jsonl or --format markdown."
        )
    return _SUFFIXES[suffix]


# ----- writing -----


def render_jsonl(entries: list[KnowledgeEntry]) -> str:
    """Return one JSON object per line, with the fields of `KnowledgeEntry.to_dict`."""
    return "".join(json.dumps(entry.to_dict(), ensure_ascii=False, sort_keys=True) + "\n" for entry in entries)


def _metadata_value(value: Any) -> str:
    if isinstance(value, list) or (isinstance(value, str) and ("\n" in value or value.startswith(('"', "[")))):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_markdown(entries: list[KnowledgeEntry], *, title: str | None = None) -> str:
    """Return a Markdown document with one section per entry that `parse_markdown` reads back."""
    noun = "entry" if len(entries) == 1 else "entries"
    lines = [f"# {title}" if title else f"# Knowledge base: {len(entries)} {noun}", ""]
    lines.append(
        "Edit the text between the markers and the `- field: value` lines. Keep each "
        "`<!-- nesycd:... -->` marker on a line of its own."
    )
    lines.append("")
    for entry in entries:
        data = entry.to_dict()
        summary = " ".join(entry.learning_summary.split())[:70]
        lines += ["<!-- nesycd:entry -->", f"## {entry.task}: {summary}", ""]
        for name in _METADATA_ORDER:
            value = data.get(name)
            if value is None or (name in LIST_FIELDS and not value):
                continue
            lines.append(f"- {name}: {_metadata_value(value)}")
        for name in TEXT_FIELDS:
            text = data[name]
            if any(_MARKER.match(line) for line in text.splitlines()):
                raise KnowledgeBaseError(
                    f"Entry {entry.id!r} has a line in {name} that looks like an export marker "
                    "('<!-- nesycd:... -->'), so it cannot be written as Markdown. Export it as JSONL."
                )
            lines += ["", f"<!-- nesycd:{name} -->", text]
        lines.append("")
    return "\n".join(lines)


def write_entries(entries: list[KnowledgeEntry], path: Path | str, fmt: str | None = None) -> str:
    """Write `entries` to `path` as JSONL or Markdown and return the format used."""
    fmt = detect_format(path, fmt)
    text = render_jsonl(entries) if fmt == "jsonl" else render_markdown(entries)
    path = Path(path)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise KnowledgeBaseError(f"Failed to write {str(path)!r}: {error}. Pass a writable file path.") from error
    logger.info("Wrote %d entries to %s as %s", len(entries), path, fmt)
    return fmt


# ----- reading -----


def check_record(data: Any, line: int) -> tuple[KnowledgeEntry | None, list[RecordError]]:
    """Validate one record strictly and return (entry, []) or (None, errors).

    Every field must be a known KnowledgeEntry field; task, key, learning_summary and
    supplementary_knowledge must be non-empty text; status must be one of ENTRY_STATUSES.
    A record without an id gets a new one.
    """
    if not isinstance(data, dict):
        return None, [RecordError(line, f"expected an object with entry fields, got {type(data).__name__}")]
    errors = []
    unknown = sorted(set(data) - set(ENTRY_FIELDS))
    if unknown:
        errors.append(RecordError(line, f"unknown field(s) {unknown}; the fields are {list(ENTRY_FIELDS)}"))
    for name in _REQUIRED:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            errors.append(RecordError(line, f"field {name!r} must be non-empty text, got {value!r:.60}"))
    status = data.get("status", "active")
    if status not in ENTRY_STATUSES:
        errors.append(RecordError(line, f"status {status!r} is invalid; use one of {list(ENTRY_STATUSES)}"))
    if errors:
        return None, errors
    try:
        return KnowledgeEntry(**data), []
    except (KnowledgeBaseError, TypeError) as error:
        return None, [RecordError(line, str(error))]


def parse_jsonl(text: str) -> tuple[list[tuple[int, KnowledgeEntry]], list[RecordError]]:
    """Parse JSONL text into (line, entry) pairs and the errors found; blank lines are skipped."""
    entries: list[tuple[int, KnowledgeEntry]] = []
    errors: list[RecordError] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as error:
            errors.append(RecordError(number, f"invalid JSON: {error.msg} at column {error.colno}"))
            continue
        entry, problems = check_record(data, number)
        errors += problems
        if entry is not None:
            entries.append((number, entry))
    return entries, errors


def _parse_metadata_value(name: str, raw: str, number: int) -> tuple[Any, RecordError | None]:
    raw = raw.strip()
    if name in LIST_FIELDS or raw.startswith(('"', "[")):
        try:
            return json.loads(raw), None
        except json.JSONDecodeError as error:
            return None, RecordError(number, f"field {name!r} must be JSON ({error.msg}), got {raw!r:.60}")
    return raw, None


def parse_markdown(text: str) -> tuple[list[tuple[int, KnowledgeEntry]], list[RecordError]]:
    """Parse a Markdown export into (line of the entry marker, entry) pairs and the errors found."""
    entries: list[tuple[int, KnowledgeEntry]] = []
    errors: list[RecordError] = []
    record: dict[str, Any] | None = None
    record_line = 0
    section: str | None = None
    section_lines: list[str] = []

    def close_section() -> None:
        if record is not None and section is not None:
            record[section] = "\n".join(section_lines).strip()

    def close_record() -> None:
        if record is None:
            return
        close_section()
        entry, problems = check_record(record, record_line)
        errors.extend(problems)
        if entry is not None:
            entries.append((record_line, entry))

    for number, line in enumerate(text.splitlines(), start=1):
        marker = _MARKER.match(line)
        if marker:
            name = marker.group(1)
            if name == "entry":
                close_record()
                record, record_line, section, section_lines = {}, number, None, []
                continue
            if record is None:
                errors.append(RecordError(number, f"marker {name!r} appears before the first '<!-- nesycd:entry -->'"))
                continue
            if name not in TEXT_FIELDS:
                errors.append(RecordError(number, f"unknown section {name!r}; the sections are {list(TEXT_FIELDS)}"))
                close_section()
                section, section_lines = None, []
                continue
            close_section()
            if name in record:
                errors.append(RecordError(number, f"field {name!r} is given twice in the entry of line {record_line}"))
            section, section_lines = name, []
            continue

        if record is None:
            continue
        if section is not None:
            section_lines.append(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _METADATA_LINE.match(stripped)
        if match is None:
            errors.append(RecordError(number, f"expected '- field: value' or a section marker, got {stripped!r:.60}"))
            continue
        name, raw = match.group(1), match.group(2)
        if name in record:
            errors.append(RecordError(number, f"field {name!r} is given twice in the entry of line {record_line}"))
            continue
        value, problem = _parse_metadata_value(name, raw, number)
        if problem is not None:
            errors.append(problem)
            continue
        record[name] = value
    close_record()
    return entries, errors


def read_entries(path: Path | str, fmt: str | None = None) -> list[KnowledgeEntry]:
    """Read and validate every record of a JSONL or Markdown file.

    Raises EntryFileError listing every invalid record with its line (and duplicate ids),
    so that a caller writes either all entries or none.
    """
    path = Path(path)
    fmt = detect_format(path, fmt)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KnowledgeBaseError(f"Failed to read {str(path)!r}: {error}. Pass a UTF-8 text file.") from error
    parsed, errors = parse_jsonl(text) if fmt == "jsonl" else parse_markdown(text)

    first_line: dict[str, int] = {}
    for number, entry in parsed:
        if entry.id in first_line:
            errors.append(RecordError(number, f"entry id {entry.id!r} repeats the record of line {first_line[entry.id]}"))
        else:
            first_line[entry.id] = number
    if errors:
        errors.sort(key=lambda error: error.line)
        raise EntryFileError(path, errors)
    return [entry for _, entry in parsed]
