"""`nesycd traces`: summary, SQL, failures, one call and Parquet export of a run's DuckDB traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup


class _SummaryByDefault(TyperGroup):
    """A group where `nesycd traces RUN [SQL]` means `nesycd traces summary RUN [SQL]`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["summary", *args]
        return super().parse_args(ctx, args)


traces_app = typer.Typer(
    cls=_SummaryByDefault,
    no_args_is_help=True,
    help=(
        "Query a run's DuckDB traces. `nesycd traces RUN` prints a summary; "
        "`nesycd traces RUN \"SQL\"` runs a query."
    ),
)


def register(app: typer.Typer) -> None:
    """Add the `traces` command group to the main application."""
    app.add_typer(traces_app, name="traces")


def _trace_file(run: Path) -> Path:
    return run / "traces.duckdb" if run.is_dir() else run


def _echo_rows(columns: list[str], rows: list[tuple], as_json: bool) -> None:
    from nesycd.tracing import format_table

    if as_json:
        typer.echo(json.dumps([dict(zip(columns, row)) for row in rows], default=str, indent=1))
    else:
        typer.echo(format_table(columns, rows))


SUMMARY_QUERIES = {
    "run": ("select run_id, status, program, started_at, finished_at from runs", None),
    "stages": (
        "select name, status, round(seconds, 1) as seconds, counts from stages order by started_at",
        None,
    ),
    "lm_calls": (
        "select stage, role, count(*) as calls, count(*) filter (where error is not null) as errors, "
        "sum(prompt_tokens) as prompt_tokens, sum(completion_tokens) as completion_tokens, "
        "round(sum(latency_s), 1) as seconds from lm_calls group by stage, role order by min(created_at)",
        None,
    ),
    "failures": (
        "select stage, kind, count(*) as failures from failures group by stage, kind order by min(created_at)",
        None,
    ),
    "evaluations": (
        "select model_label, n, correct, round(accuracy, 3) as accuracy from evaluations where task = 'ALL' "
        "order by created_at",
        None,
    ),
}


@traces_app.command("summary")
def summary(
    run: Path = typer.Argument(..., help="A run folder or its traces.duckdb file."),
    sql: Optional[str] = typer.Argument(None, help="SQL to run instead of the summary (same as `traces sql`)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
):
    """Print the run, its stages, LM calls per stage and role, failures and test accuracy."""
    from nesycd.tracing import format_table, query_file_many

    path = _trace_file(run)
    if sql is not None:
        _echo_rows(*_query(path, sql), as_json)
        return
    results = dict(zip(SUMMARY_QUERIES, query_file_many(path, list(SUMMARY_QUERIES.values()))))
    if as_json:
        typer.echo(json.dumps(
            {name: [dict(zip(columns, row)) for row in rows] for name, (columns, rows) in results.items()},
            default=str, indent=1,
        ))
        return
    titles = {"run": "Run", "stages": "Stages", "lm_calls": "LM calls", "failures": "Failures",
              "evaluations": "Test accuracy"}
    blocks = []
    for name, (columns, rows) in results.items():
        if rows or name in ("run", "stages"):
            blocks.append(f"{titles[name]}\n{format_table(columns, rows, max_width=80)}")
    typer.echo("\n\n".join(blocks))


def _query(path: Path, sql: str):
    from nesycd.tracing import query_file

    return query_file(path, sql)


@traces_app.command("sql")
def sql_command(
    run: Path = typer.Argument(..., help="A run folder or its traces.duckdb file."),
    sql: str = typer.Argument(..., help="The SQL query, e.g. \"select role, count(*) from lm_calls group by 1\"."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON objects."),
):
    """Run one SQL query on the run's traces and print the rows."""
    _echo_rows(*_query(_trace_file(run), sql), as_json)


@traces_app.command("failures")
def failures(
    run: Path = typer.Argument(..., help="A run folder or its traces.duckdb file."),
    stage: Optional[str] = typer.Option(None, help="Only failures of this stage, e.g. collect_demonstrations."),
    kind: Optional[str] = typer.Option(None, help="Only failures of this kind: wrong, unparseable, error, teacher_error, kb_parse."),
    limit: int = typer.Option(50, help="Maximum rows to print."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON objects, with full texts."),
):
    """List failures: wrong or unparseable student answers, teacher errors and rejected knowledge entries."""
    from nesycd.tracing import query_file_many

    if limit < 1:
        raise typer.BadParameter(f"--limit must be 1 or more, got {limit}.")
    conditions, params = [], []
    if stage is not None:
        conditions.append("stage = ?")
        params.append(stage)
    if kind is not None:
        conditions.append("kind = ?")
        params.append(kind)
    where = f"where {' and '.join(conditions)}" if conditions else ""
    sql = (
        f"select failure_id, stage, kind, task, example_id, gold, output, detail from failures {where} "
        f"order by created_at limit {int(limit)}"
    )
    [(columns, rows)] = query_file_many(_trace_file(run), [(sql, params)])
    _echo_rows(columns, rows, as_json)


@traces_app.command("show")
def show(
    run: Path = typer.Argument(..., help="A run folder or its traces.duckdb file."),
    call_id: str = typer.Argument(..., help="An lm_calls.call_id, or a unique prefix of one."),
    as_json: bool = typer.Option(False, "--json", help="Print the call as one JSON object."),
):
    """Print one LM call in full: model, role, stage, parameters, tokens, latency, messages and output."""
    from nesycd.errors import TraceStoreError
    from nesycd.tracing import query_file_many

    [(columns, rows)] = query_file_many(
        _trace_file(run), [("select * from lm_calls where starts_with(call_id, ?) order by created_at limit 2", [call_id])]
    )
    if not rows:
        raise TraceStoreError(
            f"No LM call with id {call_id!r} in {_trace_file(run)}. "
            "List ids with: nesycd traces sql RUN \"select call_id, stage, role from lm_calls\"."
        )
    if len(rows) > 1:
        raise TraceStoreError(f"The prefix {call_id!r} matches several LM calls. Pass more characters of the id.")
    call = dict(zip(columns, rows[0]))
    if as_json:
        for key in ("messages", "params"):
            if isinstance(call.get(key), str):
                call[key] = json.loads(call[key])
        typer.echo(json.dumps(call, default=str, indent=1))
        return
    for key in ("call_id", "stage", "role", "model", "params", "prompt_tokens", "completion_tokens",
                "latency_s", "cache_hit", "error", "created_at"):
        if key in call:
            typer.echo(f"{key}: {'' if call[key] is None else call[key]}")
    messages = json.loads(call["messages"]) if isinstance(call.get("messages"), str) else call.get("messages")
    for message in messages or []:
        typer.echo(f"\n--- {message.get('role', 'user')} ---")
        content = message.get("content")
        typer.echo(content if isinstance(content, str) else json.dumps(content, indent=1))
    typer.echo("\n--- output ---")
    typer.echo(call.get("output") or "")


@traces_app.command("export")
def export(
    run: Path = typer.Argument(..., help="A run folder or its traces.duckdb file."),
    parquet: Optional[Path] = typer.Option(None, "--parquet", help="Write one Parquet file per table into this folder."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write one CSV file per table into this folder."),
):
    """Export every trace table to Parquet (for pandas, polars or a warehouse) or CSV files."""
    from nesycd.tracing import export_file

    if (parquet is None) == (csv is None):
        raise typer.BadParameter("Pass exactly one of --parquet DIR or --csv DIR.")
    out_dir, file_format = (parquet, "parquet") if parquet is not None else (csv, "csv")
    for path in export_file(_trace_file(run), out_dir, file_format=file_format):
        typer.echo(str(path))
