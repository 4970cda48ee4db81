"""`nesycd kb`: read, search, edit, export, import, rebuild and evaluate the knowledge base of a run."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from nesycd.errors import KnowledgeBaseError

logger = logging.getLogger(__name__)

kb_app = typer.Typer(
    help="Read, search, edit, export, import and rebuild the knowledge base of a run or a compiled program.",
    no_args_is_help=True,
)

DEFAULT_COLLECTION = "nesycd_kb"
NO_PATH = "-"

PATH_HELP = (
    "A run folder, its compiled/ folder, or a Qdrant KB folder. With --kb-url: a run folder "
    "(its embedder is used and changes are recorded in its traces), or '-' for none."
)
KB_URL_HELP = "URL of a Qdrant server that holds the KB (for example http://127.0.0.1:6333), in place of a folder."
COLLECTION_HELP = "Qdrant collection, one per KB version (default: the compiled manifest's, else nesycd_kb)."
EMBEDDER_HELP = "Embedder model folder or hub id (default: the one the run or compiled program recorded)."


def register(app: typer.Typer) -> None:
    """Add the `kb` command group to the main application."""
    app.add_typer(kb_app, name="kb")


@dataclass
class KbTarget:
    """Location, collection and embedder of a KB, and the run whose traces record changes to it."""

    location: str
    collection: str
    embedder_model: Optional[str]
    run_dir: Optional[Path]


def _kb_folder(path: Path) -> Path:
    """Return the Qdrant folder for a run folder, a compiled/ folder or a KB folder."""
    for candidate in (path / "kb", path / "compiled" / "kb"):
        if candidate.is_dir():
            return candidate
    return path


def _read_manifest(folder: Path) -> Optional[dict]:
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise KnowledgeBaseError(f"Failed to read {manifest}: {error}. Copy the compiled folder again.") from error


def resolve_target(
    path: Optional[Path],
    *,
    kb_url: Optional[str] = None,
    collection: Optional[str] = None,
    embedder: Optional[str] = None,
    must_exist: bool = True,
) -> KbTarget:
    """Resolve PATH and the options into a KbTarget.

    A folder with manifest.json is a compiled program, a folder with traces.duckdb and kb/
    is a run, anything else is a KB folder. With `must_exist`, a KB folder that does not
    exist raises KnowledgeBaseError instead of being created.
    """
    from nesycd.knowledge.usage import TRACE_FILE, run_embedder

    if path is not None and str(path) == NO_PATH:
        path = None
    if kb_url is None and path is None:
        raise KnowledgeBaseError("Pass a PATH (run, compiled or KB folder), or --kb-url with the URL of a Qdrant server.")

    run_dir = path if path is not None and (path / TRACE_FILE).is_file() else None
    manifest = _read_manifest(path) if path is not None else None
    if manifest is None and path is not None and run_dir is None:
        manifest = _read_manifest(path / "compiled") if (path / "compiled").is_dir() else None
        if manifest is not None:
            path = path / "compiled"

    if embedder is None and manifest is not None:
        embedder = (manifest.get("embedder") or {}).get("model")
    elif embedder is None and run_dir is not None:
        embedder = run_embedder(run_dir)
    if collection is None:
        collection = ((manifest or {}).get("kb") or {}).get("collection", DEFAULT_COLLECTION)

    if kb_url is not None:
        return KbTarget(location=kb_url, collection=collection, embedder_model=embedder, run_dir=run_dir)

    if manifest is not None:
        folder = path / (manifest.get("kb") or {}).get("path", "kb")
    elif run_dir is not None:
        folder = run_dir / "kb"
    else:
        folder = _kb_folder(path)
    if must_exist and not folder.is_dir():
        raise KnowledgeBaseError(
            f"Knowledge base folder {str(folder)!r} not found. Pass a run folder, its compiled/ folder or a KB folder."
        )
    return KbTarget(location=str(folder), collection=collection, embedder_model=embedder, run_dir=run_dir)


def _open(target: KbTarget, *, create: bool = False, recreate: bool = False):
    from nesycd.knowledge import Embedder, KnowledgeStore

    return KnowledgeStore(
        target.location,
        collection=target.collection,
        embedder=Embedder(target.embedder_model),
        create=create or recreate,
        recreate=recreate,
    )


def _find_entry(store, entry_id: str):
    """Return the entry with this id, or the one entry whose id starts with it."""
    try:
        return store.get(entry_id)
    except KnowledgeBaseError:
        matches = [entry for entry in store.entries() if entry.id.startswith(entry_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KnowledgeBaseError(
            f"No entry id is or starts with {entry_id!r} in {store.location} collection {store.collection}. "
            "List the ids with `nesycd kb list`."
        )
    raise KnowledgeBaseError(
        f"{len(matches)} entry ids start with {entry_id!r} ({', '.join(entry.id for entry in matches[:5])}, ...). "
        "Pass more characters of the id."
    )


def _one_line(text: str, width: int) -> str:
    return " ".join(text.split())[:width]


def _echo_entry(entry) -> None:
    typer.echo(f"id: {entry.id}")
    typer.echo(f"task: {entry.task}")
    typer.echo(f"status: {entry.status}")
    for name in ("source_example_id", "failure_id", "source_run", "teacher_model", "created_at"):
        value = getattr(entry, name)
        if value is not None:
            typer.echo(f"{name}: {value}")
    for name in ("source_example_ids", "failure_ids", "merged_ids"):
        values = getattr(entry, name)
        if values:
            typer.echo(f"{name}: {', '.join(values)}")
    typer.echo(f"\nKey:\n{entry.key}\n\n{entry.text}")


# ----- reading -----


@kb_app.command("list")
def kb_list(
    path: Path = typer.Argument(..., help=PATH_HELP),
    limit: int = typer.Option(50, help="Entries to show."),
    task: Optional[str] = typer.Option(None, help="Show only entries of this task."),
    status: Optional[str] = typer.Option(None, help="Show only entries with this status (active or retired)."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """List knowledge-base entries: id, task, status and the start of the learning summary."""
    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder)
    with _open(target) as store:
        entries = store.entries()
    selected = [entry for entry in entries if (task is None or entry.task == task) and (status is None or entry.status == status)]
    typer.echo(f"{len(selected)} of {len(entries)} entries in {target.location} collection {target.collection}")
    for entry in selected[:limit]:
        typer.echo(f"{entry.id[:12]}  {entry.task:28s} {entry.status:8s} {_one_line(entry.learning_summary, 80)}")


@kb_app.command("show")
def kb_show(
    path: Path = typer.Argument(..., help=PATH_HELP),
    entry_id: str = typer.Argument(..., help="Entry id, or a prefix that only one id starts with."),
    as_json: bool = typer.Option(False, "--json", help="Print the entry as one JSON object."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Print one entry with all its fields."""
    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder)
    with _open(target) as store:
        entry = _find_entry(store, entry_id)
    if as_json:
        typer.echo(json.dumps(entry.to_dict(), indent=1, ensure_ascii=False))
    else:
        _echo_entry(entry)


@kb_app.command("search")
def kb_search(
    path: Path = typer.Argument(..., help=PATH_HELP),
    query: str = typer.Argument(..., help="Text to search for, for example a task description and question."),
    k: int = typer.Option(5, help="Entries to return."),
    task: Optional[str] = typer.Option(None, help="Search only entries of this task."),
    retriever: str = typer.Option("dense", help="Ranking: dense (cosine), bm25 or hybrid (reciprocal rank fusion)."),
    min_score: Optional[float] = typer.Option(None, help="Drop hits below this score (on the retriever's scale)."),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Search the KB the way a program's retriever does and print the ranked hits."""
    from nesycd.knowledge import make_retriever

    if retriever not in ("dense", "bm25", "hybrid"):
        raise KnowledgeBaseError(f"--retriever must be dense, bm25 or hybrid, got {retriever!r}.")
    config = {"kind": retriever, "k": k, "insert": 0, "min_score": min_score, "task_filter": task is not None}
    if retriever == "hybrid":
        config["candidates"] = max(k, 20)
    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder)
    with _open(target) as store:
        result = make_retriever(config).bind(store).retrieve(query, task)
        entries = {entry_id: store.get(entry_id) for entry_id in result.ids}
    if as_json:
        hits = [
            {"rank": rank, "score": score, **entries[entry_id].to_dict()}
            for rank, (entry_id, score) in enumerate(zip(result.ids, result.scores), start=1)
        ]
        typer.echo(json.dumps(hits, indent=1, ensure_ascii=False))
        return
    typer.echo(f"{len(result.ids)} hits ({retriever})")
    for rank, (entry_id, score) in enumerate(zip(result.ids, result.scores), start=1):
        entry = entries[entry_id]
        typer.echo(f"{rank:2d}. {score:8.4f}  {entry_id[:12]}  {entry.task:24s} {_one_line(entry.learning_summary, 70)}")


# ----- files -----


@kb_app.command("export")
def kb_export(
    path: Path = typer.Argument(..., help=PATH_HELP),
    out: Path = typer.Argument(..., help="File to write: .jsonl (one JSON object per entry) or .md (Markdown)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl or markdown (default: from the file suffix)."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Write every entry to a JSONL or Markdown file that `nesycd kb import` reads back."""
    from nesycd.knowledge.files import write_entries

    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder)
    with _open(target) as store:
        entries = store.entries()
    used = write_entries(entries, out, fmt)
    typer.echo(f"Wrote {len(entries)} entries to {out} ({used})")


@kb_app.command("import")
def kb_import(
    path: Path = typer.Argument(..., help=PATH_HELP + " A KB folder that does not exist is created."),
    source: Path = typer.Argument(..., help="A .jsonl or .md file in the format that `nesycd kb export` writes."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl or markdown (default: from the file suffix)."),
    dedup: bool = typer.Option(False, help="Merge near-duplicates (cosine >= 0.95, same task) into stored entries."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Validate every record of a file, then add all entries (an entry with a stored id replaces it).

    Any invalid record stops the import before anything is written, and each problem is
    listed with its line number.
    """
    from nesycd.knowledge.files import read_entries
    from nesycd.knowledge.usage import record_entry_change

    entries = read_entries(source, fmt)
    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder, must_exist=False)
    with _open(target, create=True) as store:
        holders = store.add(entries, dedup=dedup)
        stored = [store.get(entry_id) for entry_id in dict.fromkeys(holders)]
        total = store.count()
    if target.run_dir is not None:
        for entry in stored:
            record_entry_change(target.run_dir, entry, stage="kb_import")
    merged = len(entries) - len(set(holders))
    typer.echo(f"Imported {len(entries)} entries ({merged} merged into near-duplicates); the KB now has {total}")


# ----- changes -----


def _run_editor(file: Path) -> None:
    command = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not command:
        raise KnowledgeBaseError("Neither VISUAL nor EDITOR is set. Set EDITOR to an editor command, e.g. EDITOR=nano.")
    try:
        completed = subprocess.run([*shlex.split(command), str(file)], check=False)
    except OSError as error:
        raise KnowledgeBaseError(f"Failed to start the editor {command!r}: {error}. Set EDITOR to an installed editor.") from error
    if completed.returncode != 0:
        raise KnowledgeBaseError(
            f"The editor {command!r} exited with code {completed.returncode}, so the entry was not changed."
        )


@kb_app.command("edit")
def kb_edit(
    path: Path = typer.Argument(..., help=PATH_HELP),
    entry_id: str = typer.Argument(..., help="Entry id, or a prefix that only one id starts with."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Open one entry in $EDITOR as Markdown, then validate it, store it and re-embed its key.

    For a run folder the edit is also recorded in its traces, so `nesycd kb rebuild` keeps it.
    """
    from nesycd.knowledge.files import read_entries, render_markdown
    from nesycd.knowledge.usage import record_entry_change

    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder)
    with _open(target) as store:
        entry = _find_entry(store, entry_id)
        with tempfile.TemporaryDirectory(prefix="nesycd-kb-edit-") as folder:
            file = Path(folder) / f"entry-{entry.id[:12]}.md"
            file.write_text(render_markdown([entry], title=f"Entry {entry.id}"), encoding="utf-8")
            _run_editor(file)
            edited = read_entries(file, "markdown")
        if len(edited) != 1:
            raise KnowledgeBaseError(
                f"The edited file contains {len(edited)} entries; keep exactly one. Entry {entry.id} was not changed."
            )
        changed = edited[0]
        if changed.id != entry.id:
            raise KnowledgeBaseError(
                f"The edit changed the id from {entry.id!r} to {changed.id!r}. Keep the id; to add a new entry, "
                "use `nesycd kb import`. The entry was not changed."
            )
        if changed == entry:
            typer.echo(f"No change to entry {entry.id}")
            return
        store.update(changed)
    if target.run_dir is not None:
        record_entry_change(target.run_dir, changed, stage="kb_edit")
    typer.echo(f"Updated entry {changed.id} and re-embedded its key")


@kb_app.command("delete")
def kb_delete(
    path: Path = typer.Argument(..., help=PATH_HELP),
    entry_id: str = typer.Argument(..., help="Entry id, or a prefix that only one id starts with."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help=KB_URL_HELP),
    collection: Optional[str] = typer.Option(None, help=COLLECTION_HELP),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Delete one entry. For a run folder the deletion is also recorded in its traces, so rebuild replays it."""
    from nesycd.knowledge.usage import DELETED_STATUS, record_entry_change

    target = resolve_target(path, kb_url=kb_url, collection=collection, embedder=embedder)
    with _open(target) as store:
        entry = _find_entry(store, entry_id)
        store.delete(entry.id)
        remaining = store.count()
    if target.run_dir is not None:
        record_entry_change(target.run_dir, entry, stage="kb_delete", status=DELETED_STATUS)
    typer.echo(f"Deleted entry {entry.id} ({entry.task}); {remaining} entries remain")


@kb_app.command("rebuild")
def kb_rebuild(
    run: Path = typer.Argument(..., help="A run folder: its traces.duckdb kb_entries table is the source."),
    collection: str = typer.Option(DEFAULT_COLLECTION, help="Collection to recreate; a new name makes a new KB version."),
    dedup: bool = typer.Option(True, help="Merge near-duplicates (cosine >= 0.95, same task), as compile does."),
    kb_url: Optional[str] = typer.Option(None, "--kb-url", help="Rebuild on this Qdrant server instead of RUN/kb."),
    embedder: Optional[str] = typer.Option(None, help=EMBEDDER_HELP),
):
    """Recreate the Qdrant collection from the entries recorded in the run's traces, re-embedding every key.

    Edits and deletions made with `nesycd kb edit/delete` on the run folder are replayed.
    The compiled/ folder keeps its own copy of the KB and is not changed.
    """
    from nesycd.knowledge.usage import recorded_entries, trace_file

    trace_file(run)
    entries = recorded_entries(run)
    target = resolve_target(run, kb_url=kb_url, collection=collection, embedder=embedder, must_exist=False)
    with _open(target, recreate=True) as store:
        holders = store.add(entries, dedup=dedup)
        total = store.count()
    typer.echo(
        f"Rebuilt {target.location} collection {target.collection}: {total} entries from {len(entries)} recorded "
        f"({len(entries) - len(set(holders))} merged)"
    )


# ----- usefulness -----


@kb_app.command("stats")
def kb_stats(
    run: Path = typer.Argument(..., help="A run folder with traces.duckdb."),
    label: Optional[str] = typer.Option(None, help="Show only this model_label (for example nesycd)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON objects."),
):
    """Per entry and model_label: times retrieved and inserted, and accuracy when used vs the task's accuracy."""
    from nesycd.knowledge.usage import entry_usage
    from nesycd.tracing import format_table

    columns, rows = entry_usage(run)
    records = [dict(zip(columns, row)) for row in rows]
    if label is not None:
        records = [record for record in records if record["model_label"] == label]
    if as_json:
        typer.echo(json.dumps(records, indent=1, default=str))
        return
    headers = ["entry", "task", "model_label", "retrieved", "inserted", "used", "acc_used", "task_acc", "difference"]
    table = [
        (
            record["entry_id"][:12],
            record["task"],
            record["model_label"],
            record["times_retrieved"],
            record["times_inserted"],
            record["predictions_using"],
            record["accuracy_using"],
            record["task_accuracy"],
            record["accuracy_difference"],
        )
        for record in records
    ]
    typer.echo(format_table(headers, table))


@kb_app.command("sweep")
def kb_sweep(
    path: Path = typer.Argument(..., help="A compiled/ folder (or the run folder that contains it)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding the benchmark data (default: NESYCD_DATA_DIR)."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks (default: the tasks the program was compiled on)."),
    test_per_task: Optional[int] = typer.Option(None, help="Test questions per task (default: all of the test split)."),
    thresholds: str = typer.Option("0,20,40,60,68,80,90,100", help="Comma-separated confidence thresholds, 0 to 100."),
    max_new_tokens: int = typer.Option(16, help="Tokens the confidence probe generates."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON objects."),
):
    """Report accuracy and retrieval rate of adaptive retrieval at each confidence threshold on the test split."""
    from nesycd.artifact import load
    from nesycd.data_dir import resolve_data_dir
    from nesycd.knowledge.adaptive import sweep_thresholds
    from nesycd.program import load_program
    from nesycd.tracing import format_table

    try:
        values = [float(value) for value in thresholds.split(",") if value.strip()]
    except ValueError as error:
        raise KnowledgeBaseError(f"--thresholds must be comma-separated numbers, got {thresholds!r}.") from error
    data = resolve_data_dir(data_dir)
    compiled = load(path)
    try:
        spec = load_program(compiled.path / compiled.manifest["program"]["file"])
        chosen = tasks.split(",") if tasks else sorted(compiled.manifest.get("tasks", {}))
        _, testset = spec.load_data(data, tasks=chosen, train_per_task=None, test_per_task=test_per_task)
        if not testset:
            raise KnowledgeBaseError(f"No test questions for tasks {chosen} in {data}. Check --tasks and --data-dir.")
        result = sweep_thresholds(compiled.program, testset, spec.metric, thresholds=values,
                                  probe_tokens=max_new_tokens)
    finally:
        compiled.close()
    rows = [(row.threshold, row.n, row.retrieved, row.retrieval_rate, row.accuracy) for row in result.rows]
    columns = ["threshold", "questions", "retrieved", "retrieval_rate", "accuracy"]
    if as_json:
        typer.echo(json.dumps([dict(zip(columns, row)) for row in rows], indent=1))
        return
    typer.echo(format_table(columns, rows))
    with_knowledge = sum(result.correct_with) / len(result.correct_with)
    without = sum(result.correct_without) / len(result.correct_without)
    typer.echo(f"Always retrieve: accuracy {with_knowledge:.3f}; never retrieve: accuracy {without:.3f}")
