"""Knowledge-base usefulness from a run's traces, and the rebuild of a KB from its DuckDB copy."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from nesycd.errors import KnowledgeBaseError
from nesycd.knowledge.entry import KnowledgeEntry

logger = logging.getLogger(__name__)

TRACE_FILE = "traces.duckdb"

# Status of a kb_entries row that records the deletion of an entry by `nesycd kb delete`.
DELETED_STATUS = "deleted"

# The body of the kb_entry_usage view in nesycd/tracing/schema.sql. The view exists only in
# trace files written since it was added, so `entry_usage` runs this query itself.
# It returns one row per entry and model_label. times_retrieved and times_inserted count
# retrievals rows of all stages and labels, because retrievals carry no label.
# predictions_using counts that label's predictions whose knowledge_ids contain the entry.
ENTRY_USAGE_SQL = """
WITH entries AS (
    SELECT entry_id, arg_min(task, created_at) AS task, arg_max(status, created_at) AS status
    FROM kb_entries
    GROUP BY entry_id
),
retrieved AS (
    SELECT entry_id, count(*) AS times_retrieved
    FROM (SELECT unnest(json_extract_string(hits, '$[*].entry_id')) AS entry_id FROM retrievals WHERE hits IS NOT NULL)
    GROUP BY entry_id
),
inserted AS (
    SELECT entry_id, count(*) AS times_inserted
    FROM (SELECT unnest(json_extract_string(inserted, '$[*]')) AS entry_id FROM retrievals WHERE inserted IS NOT NULL)
    GROUP BY entry_id
),
used AS (
    SELECT model_label, entry_id, count(*) AS predictions_using,
           count(*) FILTER (WHERE correct) AS correct_using
    FROM (
        SELECT model_label, correct, unnest(json_extract_string(knowledge_ids, '$[*]')) AS entry_id
        FROM predictions WHERE knowledge_ids IS NOT NULL
    )
    GROUP BY model_label, entry_id
),
task_accuracy AS (
    SELECT model_label, task, count(*) AS task_predictions,
           avg(CASE WHEN correct THEN 1.0 ELSE 0.0 END) AS task_accuracy
    FROM predictions
    GROUP BY model_label, task
),
labels AS (
    SELECT DISTINCT model_label FROM predictions
    UNION ALL
    SELECT NULL WHERE NOT EXISTS (SELECT 1 FROM predictions)
)
SELECT
    e.entry_id,
    e.task,
    e.status,
    l.model_label,
    coalesce(r.times_retrieved, 0) AS times_retrieved,
    coalesce(i.times_inserted, 0) AS times_inserted,
    coalesce(u.predictions_using, 0) AS predictions_using,
    coalesce(u.correct_using, 0) AS correct_using,
    u.correct_using / u.predictions_using AS accuracy_using,
    t.task_predictions,
    t.task_accuracy,
    u.correct_using / u.predictions_using - t.task_accuracy AS accuracy_difference
FROM entries e
CROSS JOIN labels l
LEFT JOIN retrieved r ON r.entry_id = e.entry_id
LEFT JOIN inserted i ON i.entry_id = e.entry_id
LEFT JOIN used u ON u.entry_id = e.entry_id AND u.model_label IS NOT DISTINCT FROM l.model_label
LEFT JOIN task_accuracy t ON t.task = e.task AND t.model_label IS NOT DISTINCT FROM l.model_label
ORDER BY e.task, e.entry_id, l.model_label
"""


def trace_file(run_dir: Path | str) -> Path:
    """Return the trace file of a run folder, or raise KnowledgeBaseError when it is missing."""
    path = Path(run_dir)
    candidate = path if path.suffix == ".duckdb" else path / TRACE_FILE
    if not candidate.is_file():
        raise KnowledgeBaseError(
            f"No trace file {TRACE_FILE} in {str(path)!r}. Pass a run folder written by `nesycd compile`."
        )
    return candidate


def entry_usage(run_dir: Path | str) -> tuple[list[str], list[tuple]]:
    """Return (columns, rows) of the per-entry usage and accuracy of a run (see ENTRY_USAGE_SQL)."""
    from nesycd.tracing import query_file

    return query_file(trace_file(run_dir), ENTRY_USAGE_SQL)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.isoformat()
    return str(value)


def recorded_entries(run_dir: Path | str) -> list[KnowledgeEntry]:
    """Return the entries recorded in a run's kb_entries table, as they stand after the recorded changes.

    For each entry id the latest row wins, so rows written by `nesycd kb edit` replace the
    teacher's text and a row with status "deleted" removes the entry. Entries are ordered by
    the time of their first row, the order in which they were first added.
    """
    from nesycd.tracing import query_file

    columns, rows = query_file(
        trace_file(run_dir),
        "SELECT entry_id, run_id, failure_id, example_id, task, learning_summary, supplementary_knowledge, "
        "key_text, teacher_model, status, created_at FROM kb_entries ORDER BY created_at, entry_id",
    )
    latest: dict[str, dict[str, Any]] = {}
    first_seen: dict[str, Any] = {}
    for row in rows:
        record = dict(zip(columns, row))
        entry_id = record["entry_id"]
        first_seen.setdefault(entry_id, record["created_at"])
        latest[entry_id] = record

    entries = []
    for entry_id, record in latest.items():
        if record["status"] == DELETED_STATUS:
            continue
        try:
            entries.append(
                KnowledgeEntry(
                    id=entry_id,
                    task=record["task"],
                    learning_summary=record["learning_summary"],
                    supplementary_knowledge=record["supplementary_knowledge"],
                    key=record["key_text"],
                    source_example_id=record["example_id"],
                    source_run=record["run_id"],
                    teacher_model=record["teacher_model"],
                    failure_id=record["failure_id"],
                    created_at=_iso(first_seen[entry_id]),
                    status=record["status"] or "active",
                )
            )
        except KnowledgeBaseError as error:
            raise KnowledgeBaseError(
                f"The kb_entries row of entry {entry_id!r} in {run_dir} is invalid: {error} "
                "Fix the row with a DuckDB shell, or delete the entry with `nesycd kb delete`."
            ) from error
    logger.debug("Read %d entries from the kb_entries table of %s", len(entries), run_dir)
    return entries


def record_entry_change(run_dir: Path | str, entry: KnowledgeEntry, *, stage: str, status: str | None = None) -> None:
    """Append a kb_entries row for an entry that a person added, edited or deleted.

    The row gets the run's id and `stage` (for example "kb_edit"), so `recorded_entries`
    and `nesycd kb rebuild` reproduce the change.
    """
    from nesycd.tracing import TraceStore, query_file

    path = trace_file(run_dir)
    _, rows = query_file(path, "SELECT run_id FROM runs ORDER BY started_at LIMIT 1")
    run_id = rows[0][0] if rows else None
    embedder = None
    collection = None
    _, previous = query_file(
        path,
        "SELECT embedder, collection FROM kb_entries WHERE embedder IS NOT NULL ORDER BY created_at DESC LIMIT 1",
    )
    if previous:
        embedder, collection = previous[0]
    store = TraceStore(path)
    try:
        store.record(
            "kb_entries",
            {
                "entry_id": entry.id,
                "run_id": run_id,
                "stage": stage,
                "failure_id": entry.failure_id,
                "example_id": entry.source_example_id,
                "task": entry.task,
                "learning_summary": entry.learning_summary,
                "supplementary_knowledge": entry.supplementary_knowledge,
                "key_text": entry.key,
                "teacher_model": entry.teacher_model,
                "embedder": embedder,
                "collection": collection,
                "status": status or entry.status,
            },
        )
    finally:
        store.close()
    logger.info("Recorded %s of entry %s in %s", stage, entry.id, path)


def run_embedder(run_dir: Path | str) -> str | None:
    """Return the embedder model option recorded in the run's config (None: the packaged model)."""
    from nesycd.tracing import query_file

    _, rows = query_file(trace_file(run_dir), "SELECT config FROM runs ORDER BY started_at LIMIT 1")
    if not rows or rows[0][0] is None:
        return None
    config = rows[0][0]
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            logger.warning("The runs.config of %s is not JSON, so the packaged embedder is used", run_dir)
            return None
    return config.get("embedder") if isinstance(config, dict) else None
