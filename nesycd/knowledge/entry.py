"""Knowledge-base entries and the parser for the teacher's entry replies."""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from nesycd.errors import KnowledgeBaseError

logger = logging.getLogger(__name__)

_REQUIRED_FIELDS = ("task", "learning_summary", "supplementary_knowledge", "key")
_OPTIONAL_TEXT_FIELDS = ("source_example_id", "source_run", "teacher_model", "failure_id")
# Provenance lists: every error case and failure whose entry was merged into this one,
# and the ids of the merged entries. The single-value fields keep the first provenance.
_LIST_FIELDS = ("source_example_ids", "failure_ids", "merged_ids")

# Statuses that the import and edit commands accept. Search returns "active" entries by default.
ENTRY_STATUSES = ("active", "retired")


def _new_entry_id() -> str:
    return uuid.uuid4().hex


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass(kw_only=True)
class KnowledgeEntry:
    """One knowledge-base entry that the teacher wrote from a student's error case.

    `key` is the text that is embedded and matched against queries: the task
    description followed by the question of the error case. When near-duplicate
    entries are merged, `source_example_ids`, `failure_ids` and `merged_ids` collect
    the provenance of every merged entry; `source_example_id` and `failure_id` keep
    the first one.
    """

    id: str = field(default_factory=_new_entry_id)
    task: str
    learning_summary: str
    supplementary_knowledge: str
    key: str
    source_example_id: str | None = None
    source_run: str | None = None
    teacher_model: str | None = None
    failure_id: str | None = None
    created_at: str = field(default_factory=_utc_now_iso)
    status: str = "active"
    source_example_ids: list[str] = field(default_factory=list)
    failure_ids: list[str] = field(default_factory=list)
    merged_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("id", *_REQUIRED_FIELDS, "created_at", "status"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise KnowledgeBaseError(
                    f"Knowledge entry field {name!r} must be a string, got {type(value).__name__} "
                    f"({value!r:.80}). Pass text for {name!r}."
                )
        if not self.id.strip():
            raise KnowledgeBaseError("Knowledge entry id is empty. Pass a non-empty id or omit it to get a uuid4 hex.")
        for name in _OPTIONAL_TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise KnowledgeBaseError(
                    f"Knowledge entry field {name!r} must be a string or None, got {type(value).__name__} "
                    f"({value!r:.80}). Convert it with str() or pass None."
                )
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise KnowledgeBaseError(
                    f"Knowledge entry field {name!r} must be a list of strings, got {value!r:.80}. "
                    "Pass a list of ids, or omit it."
                )
        if self.source_example_id is not None and not self.source_example_ids:
            self.source_example_ids = [self.source_example_id]
        if self.failure_id is not None and not self.failure_ids:
            self.failure_ids = [self.failure_id]

    @property
    def text(self) -> str:
        """Block inserted into the student's prompt."""
        return f"Learning summary: {self.learning_summary}\nSupplementary knowledge:\n{self.supplementary_knowledge}"

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as a JSON-safe dict of strings, None and lists of strings."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeEntry:
        """Build an entry from a dict written by `to_dict`, ignoring keys that this version does not define."""
        if not isinstance(data, dict):
            raise KnowledgeBaseError(
                f"Knowledge entry data must be a dict, got {type(data).__name__}. Pass the output of to_dict()."
            )
        missing = [name for name in _REQUIRED_FIELDS if name not in data]
        if missing:
            raise KnowledgeBaseError(
                f"Knowledge entry data lacks the fields {missing} (keys present: {sorted(data)}). "
                "The payload was not written by KnowledgeEntry.to_dict(), so rebuild the entry."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.debug("Ignoring unknown knowledge entry fields %s of entry %s", unknown, data.get("id"))
        return cls(**{name: value for name, value in data.items() if name in known})


def _extend_unique(values: list[str], more: list[str]) -> list[str]:
    result = list(values)
    for value in more:
        if value not in result:
            result.append(value)
    return result


def merge_provenance(target: KnowledgeEntry, duplicate: KnowledgeEntry) -> KnowledgeEntry:
    """Return a copy of `target` that also records the provenance of its near-duplicate `duplicate`.

    The text, key and single-value fields of `target` stay as they are. The lists gain the
    example ids and failure ids of `duplicate`, and `merged_ids` gains its id and the ids
    that it had itself absorbed.
    """
    return dataclasses.replace(
        target,
        source_example_ids=_extend_unique(target.source_example_ids, duplicate.source_example_ids),
        failure_ids=_extend_unique(target.failure_ids, duplicate.failure_ids),
        merged_ids=_extend_unique(target.merged_ids, [duplicate.id, *duplicate.merged_ids]),
    )


# A heading sits at the start of a line and may carry markdown decoration:
# "Learning Summary:", "**Learning Summary**:", "**Learning Summary:**",
# "### Learning Summary" or "1. Learning summary:". After the name there must be
# a colon or the end of the line, so a sentence that starts with the same words
# is not taken as a heading.
_HEADING_TEMPLATE = (
    r"^[ \t]*(?:#{{1,6}}[ \t]*)?(?:\d+[.)][ \t]*)?(?:\*\*|__)?[ \t]*"
    r"{name}"
    r"[ \t]*(?:\*\*|__)?[ \t]*(?::|(?=\r?\n|\Z))[ \t]*(?:\*\*|__)?"
)
_SUMMARY_HEADING = re.compile(
    _HEADING_TEMPLATE.format(name=r"learning[ \t]+summary"), re.IGNORECASE | re.MULTILINE
)
_KNOWLEDGE_HEADING = re.compile(
    _HEADING_TEMPLATE.format(name=r"supplementary[ \t]+knowledge"), re.IGNORECASE | re.MULTILINE
)
# Small teachers often keep generating a new case after the entry.
_FOLLOW_ON = re.compile(r"\n[ \t]*(?:question[ \t]*:|the student was given)", re.IGNORECASE)


def _cut_follow_on(part: str) -> str:
    match = _FOLLOW_ON.search(part)
    if match:
        part = part[: match.start()]
    return part.strip()


def parse_teacher_entry(text: str) -> tuple[str, str]:
    """Split a teacher's reply into (learning summary, supplementary knowledge).

    Both headings are required, in either order. Text after a generated
    follow-on case ("Question:" or "The student was given" at the start of a
    line) is dropped. Raises KnowledgeBaseError when a part is missing or empty.
    """
    if not isinstance(text, str):
        raise KnowledgeBaseError(
            f"Teacher reply must be a string, got {type(text).__name__}. Pass the reply text of the teacher LM."
        )
    quoted = repr(text[:200])

    summary_match = _SUMMARY_HEADING.search(text)
    knowledge_match = _KNOWLEDGE_HEADING.search(text)
    missing = []
    if summary_match is None:
        missing.append("'Learning Summary:'")
    if knowledge_match is None:
        missing.append("'Supplementary Knowledge:'")
    if missing:
        raise KnowledgeBaseError(
            f"Teacher reply lacks the heading {' and '.join(missing)}. The reply starts with {quoted}. "
            "Ask the teacher to answer with both headings, or discard this reply."
        )

    if summary_match.start() < knowledge_match.start():
        summary = text[summary_match.end() : knowledge_match.start()]
        knowledge = text[knowledge_match.end() :]
    else:
        knowledge = text[knowledge_match.end() : summary_match.start()]
        summary = text[summary_match.end() :]
    summary = _cut_follow_on(summary)
    knowledge = _cut_follow_on(knowledge)

    empty = [name for name, part in (("learning summary", summary), ("supplementary knowledge", knowledge)) if not part]
    if empty:
        raise KnowledgeBaseError(
            f"Teacher reply has an empty {' and '.join(empty)}. The reply starts with {quoted}. "
            "Ask the teacher again or discard this reply."
        )
    return summary, knowledge
