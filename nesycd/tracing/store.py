"""DuckDB trace store: one file per compile run, fed by a background writer thread."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import operator
import os
import platform
import queue
import re
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from nesycd.errors import TraceStoreError, is_disk_full

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SCHEMA_PATH = Path(__file__).with_name("schema.sql")
# MIGRATIONS[v] upgrades a file from schema version v to v + 1; the schema file runs after them.
MIGRATIONS = {1: Path(__file__).with_name("migrations") / "to_v2.sql"}

DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BATCH_ROWS = 2_000
DEFAULT_FLUSH_INTERVAL_S = 1.0
DEFAULT_LOCK_TIMEOUT_S = 10.0

# The column that gets a fresh id when a recorded row lacks it. evaluations has none.
ID_COLUMNS = {
    "runs": "run_id",
    "stages": "stage_id",
    "lm_calls": "call_id",
    "retrievals": "retrieval_id",
    "predictions": "prediction_id",
    "failures": "failure_id",
    "kb_entries": "entry_id",
    "finetune_jobs": "job_id",
    "spans": "span_id",
}

REDACTED = "[REDACTED]"

# Dict keys whose values never reach the file. "token" must be a whole word so that
# count keys such as max_tokens and prompt_tokens, and tokenizer names, are kept.
_SECRET_KEY = re.compile(
    r"api[-_]?key|authorization|secret|password|(?<![a-z])token(?![a-z])|token$",
    re.IGNORECASE,
)

# DuckDB raises these while another connection has the file open, and they clear once it closes.
# "different configuration" comes from a second in-process connection with another read_only flag.
_LOCK_MESSAGES = ("could not set lock", "conflicting lock", "different configuration")

_TIMESTAMP_TYPES = ("TIMESTAMP", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S")
_INTEGER_TYPES = ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER")
_FLOAT_TYPES = ("DOUBLE", "FLOAT", "REAL")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------- helpers


def _duckdb():
    """Import duckdb on first use, so that importing nesycd.tracing stays cheap."""
    import duckdb

    return duckdb


def utc_now() -> dt.datetime:
    """Return the current UTC time without a time zone, the form the TIMESTAMP columns store."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def redact_secrets(value: Any) -> Any:
    """Return a copy of ``value`` in which every dict key that names a secret maps to "[REDACTED]".

    Dicts, lists and tuples are walked at any depth. Other objects are returned as they are,
    so a secret inside an object's attributes is not found. Pass plain dicts instead.
    """
    if isinstance(value, dict):
        cleaned = {}
        for key, item in value.items():
            if isinstance(key, str) and _SECRET_KEY.search(key):
                cleaned[key] = REDACTED
            else:
                cleaned[key] = redact_secrets(item)
        return cleaned
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    return value


def _is_lock_error(error: BaseException) -> bool:
    message = str(error).lower()
    return any(text in message for text in _LOCK_MESSAGES)


def _connect(path: Path, *, read_only: bool, retries_s: float):
    """Open ``path``, retrying while another connection holds its lock, for up to ``retries_s`` seconds."""
    duckdb = _duckdb()
    deadline = time.monotonic() + retries_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as error:
            if not _is_lock_error(error):
                raise TraceStoreError(
                    f"Cannot open trace file {path}: {error}. "
                    "Check that the path is a DuckDB file written by nesycd."
                ) from error
            if time.monotonic() >= deadline:
                raise TraceStoreError(
                    f"Trace file {path} stayed locked by another process for {retries_s:.1f} s: {error}. "
                    "Close other programs that have the file open (a duckdb shell, another nesycd command) "
                    "and retry."
                ) from error
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _execute(connection, path: Path, sql: str, params) -> tuple[list[str], list[tuple]]:
    duckdb = _duckdb()
    try:
        cursor = connection.execute(sql, params)
        columns = [description[0] for description in cursor.description or []]
        rows = cursor.fetchall() if cursor.description else []
    except duckdb.Error as error:
        raise TraceStoreError(f"Query on trace file {path} failed: {error}. The query was: {sql[:500]}") from error
    return columns, rows


def query_file(path: str | Path, sql: str, *, retries_s: float = 5.0) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on a trace file through a read-only connection and return (column names, rows).

    While a compile run writes the file, its writer holds the file only during a flush, so this
    retries on the lock error for up to ``retries_s`` seconds. Use it from another process than
    the one that has a TraceStore open on the file, because that process reads with ``TraceStore.query``.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceStoreError(f"Trace file {path} not found. Pass the .duckdb file that a compile run wrote.")
    connection = _connect(path, read_only=True, retries_s=retries_s)
    try:
        return _execute(connection, path, sql, None)
    finally:
        connection.close()


def query_file_many(
    path: str | Path, statements: Sequence[tuple[str, Sequence[Any] | None]], *, retries_s: float = 5.0
) -> list[tuple[list[str], list[tuple]]]:
    """Run several parameterised queries on one read-only connection, so that they see the same file state."""
    path = Path(path)
    if not path.is_file():
        raise TraceStoreError(f"Trace file {path} not found. Pass the .duckdb file that a compile run wrote.")
    connection = _connect(path, read_only=True, retries_s=retries_s)
    try:
        return [_execute(connection, path, sql, params) for sql, params in statements]
    finally:
        connection.close()


def export_file(path: str | Path, out_dir: str | Path, *, file_format: str = "parquet", retries_s: float = 5.0) -> list[Path]:
    """Write every table of a trace file to `out_dir/<table>.<format>` (parquet or csv) and return the paths."""
    if file_format not in ("parquet", "csv"):
        raise TraceStoreError(f"Export format {file_format!r} is not supported. Use parquet or csv.")
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise TraceStoreError(f"Trace file {path} not found. Pass the .duckdb file that a compile run wrote.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TraceStoreError(f"Cannot create the export folder {out_dir}: {error}. Pass a writable folder.") from error
    duckdb = _duckdb()
    connection = _connect(path, read_only=True, retries_s=retries_s)
    written = []
    try:
        tables = [row[0] for row in connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' AND table_type = 'BASE TABLE' "
            "ORDER BY table_name"
        ).fetchall()]
        for table in tables:
            target = out_dir / f"{table}.{file_format}"
            options = "(FORMAT parquet)" if file_format == "parquet" else "(FORMAT csv, HEADER true)"
            try:
                connection.execute(f"COPY \"{table}\" TO '{_sql_string(target)}' {options}")
            except duckdb.Error as error:
                raise TraceStoreError(f"Exporting table {table} of {path} to {target} failed: {error}") from error
            written.append(target)
    finally:
        connection.close()
    return written


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")


def _format_cell(value: Any, max_width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, float):
        text = format(value, ".6g")
    else:
        text = str(value)
    text = " ".join(text.split()) if ("\n" in text or "\t" in text or "\r" in text) else text
    if len(text) > max_width:
        text = text[: max(max_width - 3, 0)] + "..."
    return text


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """Render rows as an aligned plain-text table with a header line and a dashed rule.

    Cells longer than ``max_width`` characters are cut and end in "...", line breaks become
    spaces, None becomes an empty cell and numbers are right-aligned.
    """
    if max_width < 4:
        raise TraceStoreError(f"max_width={max_width} is too small. Pass 4 or more characters.")
    header = [_format_cell(name, max_width) for name in columns]
    body = [[_format_cell(value, max_width) for value in row] for row in rows]
    for index, row in enumerate(body):
        if len(row) != len(header):
            raise TraceStoreError(
                f"Row {index} has {len(row)} values but there are {len(header)} columns. "
                "Pass rows with one value per column."
            )
    widths = [len(name) for name in header]
    for row in body:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    numeric = [
        bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
        for i in range(len(header))
    ]

    def render(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(cells, widths, numeric)
        ]
        return "  ".join(padded).rstrip()

    lines = [render(header), "  ".join("-" * width for width in widths).rstrip()]
    lines.extend(render(row) for row in body)
    return "\n".join(lines)


# --------------------------------------------------------------------------- row conversion


def _valid_utf8(text: str) -> str:
    """Return ``text``, with lone surrogates replaced by "?" because DuckDB rejects text that is not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _convert_value(table: str, column: str, column_type: str, value: Any) -> Any:
    """Convert one value to what its column stores, or raise TraceStoreError naming the column."""
    if value is None:
        return None
    if column_type == "JSON":
        try:
            return _valid_utf8(json.dumps(redact_secrets(value), default=str, ensure_ascii=False))
        except (TypeError, ValueError) as error:
            raise TraceStoreError(
                f"Value for JSON column {table}.{column} cannot be serialised: {error}. "
                "Pass dicts, lists, strings and numbers."
            ) from error

    problem = None
    if column_type == "VARCHAR":
        if isinstance(value, (dict, list, tuple, set)):
            problem = "text, not a dict or list"
        else:
            return _valid_utf8(value if isinstance(value, str) else str(value))
    elif column_type == "BOOLEAN":
        if isinstance(value, str):
            problem = "a boolean"
        else:
            try:
                if value in (True, False):
                    return bool(value)
            except (TypeError, ValueError):
                pass
            problem = "a boolean"
    elif column_type in _INTEGER_TYPES:
        if isinstance(value, bool):
            problem = "an integer"
        else:
            try:
                number = operator.index(value)
            except TypeError:
                problem = "an integer"
            else:
                if _INT64_MIN <= number <= _INT64_MAX:
                    return number
                problem = "an integer that fits in 64 bits"
    elif column_type in _FLOAT_TYPES:
        if isinstance(value, (str, bool)):
            problem = "a number"
        else:
            try:
                return float(value)
            except (TypeError, ValueError):
                problem = "a number"
    elif column_type in _TIMESTAMP_TYPES:
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return value
        problem = "a datetime"
    else:
        # This column type has no Python-side check, so DuckDB converts or rejects the value when writing.
        return value

    value_repr = repr(value)
    value_repr = value_repr if len(value_repr) <= 80 else value_repr[:77] + "..."
    raise TraceStoreError(
        f"Column {table}.{column} stores {column_type}, but the value {value_repr} has type {type(value).__name__}. "
        f"Pass {problem}."
    )


# --------------------------------------------------------------------------- writer thread


class _DiskFull(Exception):
    """Raised inside the writer when DuckDB reports a full disk, so the rows stay buffered."""


@dataclass
class _FlushRequest:
    """A marker in the writer queue. The writer sets ``done`` once the rows queued before it are written."""

    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


@dataclass
class _Segment:
    """Rows buffered per table, then SQL statements that must run after those rows are inserted."""

    rows: dict[str, list[dict]] = field(default_factory=dict)
    statements: list[tuple[str, list]] = field(default_factory=list)


@dataclass
class StageHandle:
    """The stage that ``TraceStore.stage`` opened, whose ``counts`` are written to the stage row on exit."""

    name: str
    stage_id: str
    fingerprint: str = ""
    counts: dict[str, Any] = field(default_factory=dict)


class TraceStore:
    """The trace of one compile run in one DuckDB file, written in batches by a background thread.

    ``record`` validates a row in the calling thread and queues it. The writer thread inserts
    queued rows in batches when ``batch_rows`` rows are waiting, every ``flush_interval_s``
    seconds, on ``flush()`` and on ``close()``. It opens the file only while it writes, so another
    process can read the file between flushes. The current run id and stage live on the store
    object, not in a context variable, because DSPy's ParallelExecutor (dspy 3.4.1) copies only
    its own settings into worker threads. So stages must not run concurrently on one store.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        if queue_size < 1 or batch_rows < 1:
            raise TraceStoreError(
                f"queue_size={queue_size} and batch_rows={batch_rows} must both be 1 or more."
            )
        if flush_interval_s <= 0 or lock_timeout_s < 0:
            raise TraceStoreError(
                f"flush_interval_s={flush_interval_s} must be positive and "
                f"lock_timeout_s={lock_timeout_s} must not be negative."
            )
        self.path = Path(path)
        self._batch_rows = batch_rows
        self._flush_interval_s = flush_interval_s
        self._lock_timeout_s = lock_timeout_s

        self._run_id: str | None = None
        self._stage_stack: list[StageHandle] = []
        self._state_lock = threading.Lock()
        # Serialises every connection this process opens on the file: the writer's and query()'s.
        self._db_lock = threading.Lock()
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stats = {"rows_queued": 0, "rows_written": 0, "appends": 0, "flushes": 0, "rows_dropped": 0}
        self._last_write_error: str | None = None
        self._queue_full_warned = False
        self._failed_writes = 0

        self._columns = self._open_and_migrate()

        self._segments: list[_Segment] = [_Segment()]
        self._pending_rows = 0
        self._writer_error: BaseException | None = None
        self._writer = threading.Thread(target=self._writer_loop, name=f"nesycd-trace-writer:{self.path.name}",
                                        daemon=True)
        self._writer.start()
        _open_stores.add(self)
        logger.debug("Trace store opened on %s", self.path)

    # ------------------------------------------------------------------ opening

    def _open_and_migrate(self) -> dict[str, dict[str, str]]:
        """Create the file or check its schema version, and return {table: {column: DuckDB type}}."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TraceStoreError(
                f"Cannot create the folder {self.path.parent} for trace file {self.path}: {error}. "
                "Pass a path in a writable folder."
            ) from error
        duckdb = _duckdb()
        with self._db_lock:
            connection = _connect(self.path, read_only=False, retries_s=self._lock_timeout_s)
            try:
                found = self._read_schema_version(connection)
                if found is not None and found > SCHEMA_VERSION:
                    raise TraceStoreError(
                        f"Trace file {self.path} has schema version {found}, which is newer than "
                        f"schema version {SCHEMA_VERSION} that this nesycd writes. "
                        "Write the trace to a new file, or open this one with a matching nesycd version."
                    )
                if found is not None and found < SCHEMA_VERSION:
                    self._migrate(connection, found)
                try:
                    connection.execute(SCHEMA_PATH.read_text(encoding="utf-8"))
                except duckdb.Error as error:
                    raise TraceStoreError(
                        f"Cannot apply the trace schema {SCHEMA_PATH} to {self.path}: {error}. "
                        "Write the trace to a new file."
                    ) from error
                written = self._read_schema_version(connection)
                if written != SCHEMA_VERSION:
                    raise TraceStoreError(
                        f"Trace file {self.path} has schema version {written} after applying {SCHEMA_PATH}, "
                        f"but store.py expects {SCHEMA_VERSION}. Make the two versions match."
                    )
                rows = connection.execute(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
                ).fetchall()
            finally:
                connection.close()
        columns: dict[str, dict[str, str]] = {}
        for table, column, data_type in rows:
            if table != "schema_version":
                columns.setdefault(table, {})[column] = data_type.upper()
        return columns

    def _migrate(self, connection, found: int) -> None:
        """Upgrade the file from schema version `found` to SCHEMA_VERSION in one transaction."""
        duckdb = _duckdb()
        connection.execute("BEGIN TRANSACTION")
        try:
            for version in range(found, SCHEMA_VERSION):
                connection.execute(MIGRATIONS[version].read_text(encoding="utf-8"))
            connection.execute("COMMIT")
        except (duckdb.Error, KeyError) as error:
            connection.execute("ROLLBACK")
            raise TraceStoreError(
                f"Cannot migrate trace file {self.path} from schema version {found} to {SCHEMA_VERSION}: "
                f"{error!r}. The file is unchanged; copy it and report the error, or write the trace to a new file."
            ) from error
        logger.info("Migrated trace file %s from schema version %d to %d", self.path, found, SCHEMA_VERSION)

    @staticmethod
    def _read_schema_version(connection) -> int | None:
        exists = connection.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_name = 'schema_version'"
        ).fetchone()[0]
        if not exists:
            return None
        return connection.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    # ------------------------------------------------------------------ public state

    @property
    def run_id(self) -> str | None:
        """The id passed to ``start_run``, or None before it."""
        return self._run_id

    @property
    def current_stage(self) -> str | None:
        """The name of the innermost open stage, or None outside every stage."""
        with self._state_lock:
            return self._stage_stack[-1].name if self._stage_stack else None

    @property
    def current_stage_id(self) -> str | None:
        """The stage_id of the innermost open stage, or None outside every stage."""
        with self._state_lock:
            return self._stage_stack[-1].stage_id if self._stage_stack else None

    @property
    def tables(self) -> dict[str, list[str]]:
        """The tables that ``record`` accepts, each with its column names."""
        return {table: list(columns) for table, columns in self._columns.items()}

    def write_stats(self) -> dict[str, Any]:
        """Return counters of the writer: rows queued, written and dropped, appends, flushes and the last error."""
        with self._state_lock:
            stats: dict[str, Any] = dict(self._stats)
        stats["last_error"] = self._last_write_error
        return stats

    # ------------------------------------------------------------------ recording

    def start_run(self, run_id: str, *, program: str, command: str, config: dict) -> int:
        """Record the run row with status 'running' and return the attempt number (1 for a new run).

        Rows recorded afterwards get this run id. When the file already has a row for `run_id`, the
        run is being resumed: the row gets status 'running', the new command, config and pid, and
        one more attempt.
        """
        if not run_id or not isinstance(run_id, str):
            raise TraceStoreError(f"run_id={run_id!r} is invalid. Pass a non-empty string.")
        with self._state_lock:
            if self._run_id is not None:
                raise TraceStoreError(
                    f"Trace store {self.path} already records run {self._run_id!r}, so run {run_id!r} cannot "
                    "start on it. Open a new TraceStore for each run."
                )
            self._run_id = run_id
        _, existing = self.query("SELECT coalesce(attempts, 1) FROM runs WHERE run_id = ?", [run_id])
        if existing:
            attempt = int(existing[0][0]) + 1
            self._enqueue_statement(
                "UPDATE runs SET status = 'running', command = ?, config = ?, pid = ?, attempts = ?, "
                "resumed_at = ?, finished_at = NULL WHERE run_id = ?",
                [command, _convert_value("runs", "config", "JSON", config), os.getpid(), attempt, utc_now(), run_id],
            )
            # Stages still 'running' belong to the attempt that was killed or crashed.
            self._enqueue_statement(
                "UPDATE stages SET status = 'interrupted' WHERE run_id = ? AND status = 'running'", [run_id]
            )
            return attempt
        self.record(
            "runs",
            {
                "run_id": run_id,
                "program": program,
                "command": command,
                "config": config,
                "status": "running",
                "started_at": utc_now(),
                "nesycd_version": _nesycd_version(),
                "python_version": platform.python_version(),
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "attempts": 1,
            },
        )
        return 1

    def finish_run(self, status: str) -> None:
        """Set the run's final status (for example 'succeeded' or 'failed') and its finish time."""
        if self._run_id is None:
            raise TraceStoreError(f"finish_run({status!r}) was called before start_run on {self.path}. Call start_run first.")
        if not status or not isinstance(status, str):
            raise TraceStoreError(f"status={status!r} is invalid. Pass a non-empty string such as 'succeeded'.")
        self._enqueue_statement(
            "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
            [status, utc_now(), self._run_id],
        )

    @contextlib.contextmanager
    def stage(self, name: str, fingerprint: str = "") -> Iterator[StageHandle]:
        """Record a stage: a 'running' row now, then 'succeeded' or 'failed' with its seconds.

        An exception inside the block marks the stage failed with the error text and propagates.
        Rows recorded from any thread while the block runs get this stage name.
        """
        if not name or not isinstance(name, str):
            raise TraceStoreError(f"Stage name {name!r} is invalid. Pass a non-empty string.")
        handle = StageHandle(name=name, stage_id=uuid.uuid4().hex, fingerprint=fingerprint or "")
        started_at = utc_now()
        self.record(
            "stages",
            {
                "stage_id": handle.stage_id,
                "name": name,
                "status": "running",
                "fingerprint": handle.fingerprint,
                "started_at": started_at,
                "counts": {},
            },
        )
        with self._state_lock:
            self._stage_stack.append(handle)
        logger.info("Stage %s started (run %s)", name, self._run_id)
        start = time.perf_counter()
        status, error_text = "succeeded", None
        try:
            yield handle
        except BaseException as error:
            status, error_text = "failed", f"{type(error).__name__}: {error}"
            raise
        finally:
            seconds = time.perf_counter() - start
            with self._state_lock:
                if handle in self._stage_stack:
                    self._stage_stack.remove(handle)
            logger.info("Stage %s %s after %.2f s", name, status, seconds)
            counts = _convert_value("stages", "counts", "JSON", handle.counts)
            self._enqueue_statement(
                "UPDATE stages SET status = ?, finished_at = ?, seconds = ?, counts = ?, error = ? WHERE stage_id = ?",
                [status, utc_now(), seconds, counts, error_text, handle.stage_id],
            )

    def find_stage(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        """Return the latest 'succeeded' or 'reused' row of stage `name` with `fingerprint`, or None."""
        columns, rows = self.query(
            "SELECT * FROM stages WHERE name = ? AND fingerprint = ? AND status IN ('succeeded', 'reused') "
            "ORDER BY started_at DESC LIMIT 1",
            [name, fingerprint],
        )
        if not rows:
            return None
        found = dict(zip(columns, rows[0]))
        if isinstance(found.get("counts"), str):
            found["counts"] = json.loads(found["counts"])
        return found

    def record_reused_stage(self, name: str, fingerprint: str, counts: dict[str, Any] | None = None) -> str:
        """Record a stage whose outputs an earlier attempt made, with status 'reused'; return its stage_id."""
        stage_id = uuid.uuid4().hex
        now = utc_now()
        self.record(
            "stages",
            {
                "stage_id": stage_id,
                "name": name,
                "status": "reused",
                "fingerprint": fingerprint,
                "started_at": now,
                "finished_at": now,
                "seconds": 0.0,
                "counts": counts or {},
            },
        )
        logger.info("Stage %s reused from an earlier attempt (fingerprint %s)", name, fingerprint)
        return stage_id

    def record(self, table: str, row: dict) -> None:
        """Validate ``row`` for ``table`` and queue it for the writer.

        Fills run_id, stage, created_at and the table's id column when ``row`` lacks them.
        Raises TraceStoreError for an unknown table or column, a value of the wrong type,
        or a closed store. Blocks while the queue is full.
        """
        columns = self._columns.get(table)
        if columns is None:
            raise TraceStoreError(
                f"Unknown trace table {table!r}. The tables are {', '.join(sorted(self._columns))}."
            )
        if not isinstance(row, dict):
            raise TraceStoreError(f"A row for table {table!r} must be a dict, not {type(row).__name__}.")
        unknown = [column for column in row if column not in columns]
        if unknown:
            raise TraceStoreError(
                f"Unknown column {', '.join(map(repr, unknown))} for trace table {table!r}. "
                f"Its columns are {', '.join(columns)}."
            )
        converted = {
            column: _convert_value(table, column, columns[column], value) for column, value in row.items()
        }
        self._fill_defaults(table, columns, converted)
        self._put(("row", table, converted))

    def _fill_defaults(self, table: str, columns: dict[str, str], row: dict) -> None:
        id_column = ID_COLUMNS.get(table)
        if id_column and id_column != "run_id" and row.get(id_column) is None:
            row[id_column] = uuid.uuid4().hex
        if "run_id" in columns and "run_id" not in row:
            row["run_id"] = self._run_id
        if "stage" in columns and "stage" not in row:
            row["stage"] = self.current_stage
        if table != "stages" and "stage_id" in columns and "stage_id" not in row:
            row["stage_id"] = self.current_stage_id
        if "created_at" in columns and row.get("created_at") is None:
            row["created_at"] = utc_now()

    def _enqueue_statement(self, sql: str, params: list) -> None:
        self._put(("sql", sql, params))

    def _put(self, item: tuple) -> None:
        if self._closed:
            raise TraceStoreError(f"Trace store {self.path} is closed. Open a new TraceStore to record more rows.")
        while True:
            if self._writer_error is not None or not self._writer.is_alive():
                raise TraceStoreError(
                    f"The trace writer thread for {self.path} stopped ({self._writer_error!r}), "
                    "so rows can no longer be recorded. Open a new TraceStore."
                )
            try:
                self._queue.put(item, timeout=0.5)
            except queue.Full:
                if not self._queue_full_warned:
                    self._queue_full_warned = True
                    logger.warning(
                        "Trace queue for %s is full (%d rows), so recording waits for the writer",
                        self.path, self._queue.maxsize,
                    )
                continue
            if item[0] == "row":
                with self._state_lock:
                    self._stats["rows_queued"] += 1
            return

    # ------------------------------------------------------------------ flushing, reading, closing

    def flush(self, timeout_s: float = 60.0) -> None:
        """Write every row queued so far to the file, or raise TraceStoreError when that fails or times out."""
        if self._closed:
            return
        request = _FlushRequest()
        self._put(("flush", request))
        self._wait_for(request, timeout_s, "flush")

    def _wait_for(self, request: _FlushRequest, timeout_s: float, action: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not request.done.wait(timeout=0.2):
            if not self._writer.is_alive():
                raise TraceStoreError(
                    f"The trace writer thread for {self.path} stopped before the {action} finished "
                    f"({self._writer_error!r})."
                )
            if time.monotonic() >= deadline:
                raise TraceStoreError(
                    f"The {action} of trace file {self.path} timed out after {timeout_s:.0f} s. "
                    "Another process may have the file open. Close it and retry."
                )
        if request.error is not None:
            raise TraceStoreError(f"The {action} of trace file {self.path} failed: {request.error}")

    def query(self, sql: str, params: Sequence[Any] | dict | None = None) -> tuple[list[str], list[tuple]]:
        """Flush, then run ``sql`` on the file and return (column names, rows).

        Works while the writer thread runs and after ``close()``. It is meant for reads, because a
        statement that writes goes straight to the file, ahead of rows still queued after the flush.
        """
        self.flush()
        with self._db_lock:
            connection = _connect(self.path, read_only=False, retries_s=self._lock_timeout_s)
            try:
                return _execute(connection, self.path, sql, params)
            finally:
                connection.close()

    def close(self, timeout_s: float = 60.0) -> None:
        """Write the remaining rows and stop the writer thread. Calling it again does nothing.

        Raises TraceStoreError when the final write fails, for example because another process
        kept the file locked for ``lock_timeout_s`` seconds. The rows still buffered are then lost.
        """
        if self._closed:
            return
        request = _FlushRequest()
        try:
            self._put(("stop", request))
        finally:
            self._closed = True
        try:
            self._wait_for(request, timeout_s, "final flush")
        finally:
            _open_stores.discard(self)
            self._writer.join(timeout=max(timeout_s, 1.0))
            logger.debug("Trace store on %s closed: %s", self.path, self.write_stats())

    def __enter__(self) -> "TraceStore":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()

    # ------------------------------------------------------------------ the writer thread

    def _writer_loop(self) -> None:
        try:
            self._writer_steps()
        except BaseException as error:  # noqa: BLE001 - recorded, logged and reported to callers
            self._writer_error = error
            logger.exception("Trace writer thread for %s stopped", self.path)

    def _writer_steps(self) -> None:
        next_flush: float | None = None
        while True:
            if next_flush is None:
                timeout = None
            else:
                timeout = max(next_flush - time.monotonic(), 0.0)
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None

            if item is not None:
                kind = item[0]
                if kind == "row":
                    self._buffer_row(item[1], item[2])
                elif kind == "sql":
                    self._segments[-1].statements.append((item[1], item[2]))
                else:
                    request: _FlushRequest = item[1]
                    request.error = self._write_pending(self._lock_timeout_s)
                    request.done.set()
                    if kind == "stop":
                        return
                    next_flush = None

            pending = self._pending_rows > 0 or self._has_statements()
            if not pending:
                next_flush = None
                continue
            if next_flush is None:
                next_flush = time.monotonic() + self._flush_interval_s
            # Rows that arrive without pause must still be written on time, so the clock
            # is checked after every item, not only when the queue runs empty.
            if self._pending_rows >= self._batch_rows or time.monotonic() >= next_flush:
                self._write_pending(self._lock_timeout_s)
                next_flush = None

    def _has_statements(self) -> bool:
        return any(segment.statements for segment in self._segments)

    def _buffer_row(self, table: str, row: dict) -> None:
        segment = self._segments[-1]
        if segment.statements:
            segment = _Segment()
            self._segments.append(segment)
        segment.rows.setdefault(table, []).append(row)
        self._pending_rows += 1

    def _write_pending(self, lock_timeout_s: float) -> str | None:
        """Write buffered rows and statements in order, and return the error text or None on success.

        A locked file leaves everything buffered for the next attempt. A statement or batch
        that DuckDB rejects for another reason is dropped and logged, so it cannot block the rest.
        """
        if not self._pending_rows and not self._has_statements():
            return None
        with self._db_lock:
            try:
                connection = _connect(self.path, read_only=False, retries_s=lock_timeout_s)
            except TraceStoreError as error:
                self._last_write_error = str(error)
                self._failed_writes += 1
                # Log the first failure and then every 30th, because a held lock repeats each interval.
                if self._failed_writes == 1 or self._failed_writes % 30 == 0:
                    logger.warning(
                        "Trace flush to %s postponed (attempt %d), %d rows stay buffered: %s",
                        self.path, self._failed_writes, self._pending_rows, error,
                    )
                return str(error)
            if self._failed_writes:
                logger.info("Trace flush to %s succeeded after %d failed attempts", self.path, self._failed_writes)
                self._failed_writes = 0
            errors: list[str] = []
            try:
                while self._segments:
                    segment = self._segments[0]
                    errors.extend(self._write_segment(connection, segment))
                    self._segments.pop(0)
            except _DiskFull as error:
                # The rows stay buffered and the next flush tries again, as after a lock error.
                self._last_write_error = str(error)
                self._failed_writes += 1
                if self._failed_writes == 1 or self._failed_writes % 30 == 0:
                    logger.error("Trace flush to %s failed because the disk is full; %d rows stay buffered: %s",
                                 self.path, self._pending_rows, error)
                return str(error)
            finally:
                self._segments = self._segments or [_Segment()]
                connection.close()
        with self._state_lock:
            self._stats["flushes"] += 1
        if errors:
            self._last_write_error = "; ".join(errors)
            return self._last_write_error
        return None

    def _write_segment(self, connection, segment: _Segment) -> list[str]:
        duckdb = _duckdb()
        errors = []
        for table in list(segment.rows):
            rows = segment.rows[table]
            try:
                self._append_rows(connection, table, rows)
            except (duckdb.Error, ValueError, TypeError, OverflowError) as error:
                if is_disk_full(error):
                    raise _DiskFull(f"{error} (while writing {len(rows)} rows for table {table})") from error
                message = f"{len(rows)} rows for table {table} were dropped: {error}"
                errors.append(message)
                logger.error("Trace write to %s failed, %s", self.path, message)
                with self._state_lock:
                    self._stats["rows_dropped"] += len(rows)
            else:
                with self._state_lock:
                    self._stats["rows_written"] += len(rows)
                    self._stats["appends"] += 1
            del segment.rows[table]
            self._pending_rows -= len(rows)
        while segment.statements:
            sql, params = segment.statements[0]
            try:
                connection.execute(sql, params)
            except duckdb.Error as error:
                if is_disk_full(error):
                    raise _DiskFull(str(error)) from error
                message = f"statement {sql!r} was dropped: {error}"
                errors.append(message)
                logger.error("Trace write to %s failed, %s", self.path, message)
            segment.statements.pop(0)
        return errors

    def _append_rows(self, connection, table: str, rows: list[dict]) -> None:
        """Insert ``rows`` with one statement that takes each column as a list parameter.

        Unnesting equal-length lists side by side zips them into rows. Measured with duckdb 2.0.1
        on a 2-core machine, 10,000 rows of six mixed-type columns take about 40 ms, as an Arrow
        append does. pyarrow.array is avoided because its first call imports pandas, and that
        import fails when the last flush runs at interpreter exit.
        """
        column_types = self._columns[table]
        present = {column for row in rows for column in row}
        names = [column for column in column_types if column in present]
        selects = []
        for position, name in enumerate(names, start=1):
            # JSON values arrive as serialised text, and DuckDB casts text to JSON on insert.
            list_type = "VARCHAR" if column_types[name] == "JSON" else column_types[name]
            selects.append(f'unnest(${position}::{list_type}[]) AS "{name}"')
        values = [[row.get(name) for row in rows] for name in names]
        connection.execute(f'INSERT INTO "{table}" BY NAME SELECT {", ".join(selects)}', values)


# Stores still open at interpreter exit are closed there, because the daemon writer thread
# would otherwise be stopped with its buffered rows unwritten.
_open_stores: "weakref.WeakSet[TraceStore]" = weakref.WeakSet()


@atexit.register
def _close_open_stores() -> None:
    for store in list(_open_stores):
        try:
            store.close()
        except TraceStoreError as error:
            logger.error("Closing trace store %s at exit failed: %s", store.path, error)


def _nesycd_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("nesycd")
    except metadata.PackageNotFoundError:
        logger.debug("Package metadata for nesycd not found, so the run row gets no version")
        return None
