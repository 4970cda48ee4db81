"""`nesycd evaluate` and `nesycd compare`: score programs on benchmarks and compare them side by side."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `evaluate` and `compare` commands to the main application."""
    app.command("evaluate")(evaluate)
    app.command("compare")(compare)


def evaluate(
    target: str = typer.Argument(
        ..., help="A compiled/ folder or its run folder; or a model (packaged id, local folder, hub id) to score zero-shot."
    ),
    benchmarks: Optional[str] = typer.Option(
        None, help="Comma-separated data sets: bbh, gsm8k, arc_easy, arc_challenge, agieval "
        "(default: the program's DEFAULTS['benchmarks'], else all five).",
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding the benchmark data (default: NESYCD_DATA_DIR)."),
    per_task: Optional[int] = typer.Option(
        None, help="Questions per task: each BBH task, each AGIEval subset, GSM8K, each ARC set (default: all)."
    ),
    per_dataset: Optional[int] = typer.Option(
        None, help="Questions per data set, taken from its tasks in turn, after --per-task (default: all)."
    ),
    bbh_tasks: Optional[str] = typer.Option(
        None, help="Comma-separated BBH tasks, scored on their test split (default: those the program was "
        "compiled on, else all 27).",
    ),
    agieval_subsets: Optional[str] = typer.Option(
        None, help="Comma-separated AGIEval subsets (default: the eight English multiple-choice ones)."
    ),
    arc_split: Optional[str] = typer.Option(None, help="ARC split: Test, Dev or Train (default: Test if present, else Dev)."),
    in_domain: Optional[str] = typer.Option(
        None, help="Comma-separated data sets reported as in-domain (default: those the program was trained on)."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Evaluation folder (default: <run folder>/evaluation, or runs/evaluate/<model>)."
    ),
    label: Optional[str] = typer.Option(None, help="Name in the traces and in `nesycd compare` (default: the method)."),
    threads: int = typer.Option(8, help="Concurrent questions (batched by the in-process LM)."),
    max_tokens: Optional[int] = typer.Option(None, help="Generation limit in tokens (default: the compiled program's, else 256)."),
    api_base: Optional[str] = typer.Option(None, help="Base URL of an OpenAI-compatible server for a litellm model TARGET."),
    verify_base: bool = typer.Option(True, "--verify-base/--no-verify-base", help="Check the base weights' sha256."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Score a compiled program or a model on benchmarks; predictions go to DuckDB and a rerun resumes."""
    from nesycd.cli.main import _setup_logging
    from nesycd.evaluate import EvaluateOptions, run_evaluate

    _setup_logging(verbose)
    options = EvaluateOptions(
        target=target,
        benchmarks=_split(benchmarks),
        data_dir=data_dir,
        per_task=per_task,
        per_dataset=per_dataset,
        bbh_tasks=_split(bbh_tasks),
        agieval_subsets=_split(agieval_subsets),
        arc_split=arc_split,
        in_domain=_split(in_domain),
        out_dir=out,
        label=label,
        threads=threads,
        max_tokens=max_tokens,
        api_base=api_base,
        verify_base=verify_base,
        command=" ".join(["nesycd", *sys.argv[1:]]),
    )
    summary = run_evaluate(options)
    typer.echo("")
    typer.echo(summary.report)


def compare(
    runs: List[Path] = typer.Argument(
        ..., help="Evaluation folders written by `nesycd evaluate`, or the run or compiled folders they belong to."
    ),
    out: Optional[Path] = typer.Option(
        None, help="Folder for report.md and the PNG plots (default: runs/comparison/<UTC time>)."
    ),
    title: str = typer.Option("Method comparison", help="Title of the report."),
    command: Optional[str] = typer.Option(
        None, help="Command line recorded in the report as the one that made it (default: this command)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Print the side-by-side table of several evaluations and write a Markdown report with plots."""
    from nesycd.cli.main import _setup_logging
    from nesycd.compare import format_comparison, load_results
    from nesycd.report import write_report

    _setup_logging(verbose)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    results = load_results(runs)
    out = out or Path("runs") / "comparison" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    report = write_report(results, out, command=command or " ".join(["nesycd", *sys.argv[1:]]), title=title)
    typer.echo(format_comparison(results))
    typer.echo("")
    typer.echo(f"Report: {report}")


def _split(value: Optional[str]) -> Optional[list[str]]:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]
