"""The `nesycd` command line: compile, run, traces and kb. Parses options, calls the library, renders."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from nesycd.errors import NesycdError

app = typer.Typer(help="Distil an LLM's reasoning into a small model with NesyCD, as DSPy programs.", no_args_is_help=True)

logger = logging.getLogger("nesycd")


def main() -> None:
    """Entry point of the `nesycd` console script: NesycdError becomes one message and exit code 2."""
    from nesycd.lm import offline_environment

    offline_environment()
    try:
        app()
    except NesycdError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "LiteLLM", "datasets", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DSPy warns on every response cut at max_tokens; the traces record each call's token count instead.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)


@app.command()
def compile(
    program_file: Path = typer.Argument(..., help="Program file, e.g. programs/bbh.py."),
    method: str = typer.Option(
        "nesycd", help="Optimizer: nesycd, std_cot, step_by_step, answer_only, zero_shot or teacher."
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Folder holding the benchmark data (default: NESYCD_DATA_DIR)."),
    student: str = typer.Option("smollm2-135m", help="Student model: packaged id, local folder or Hugging Face id."),
    teacher: str = typer.Option("gemma3-270m", help="Teacher model: as --student, or a litellm string such as openai/<model>."),
    teacher_api_base: Optional[str] = typer.Option(None, help="Base URL of an OpenAI-compatible teacher server."),
    student_api_base: Optional[str] = typer.Option(
        None,
        help="OpenAI base URL (ending in /v1) of a server that generates for the student stages (vLLM, SGLang or "
        "`nesycd serve <student>`); it must load LoRA adapters at runtime and read the run folder. Training stays local.",
    ),
    student_served_model: Optional[str] = typer.Option(
        None, help="Base model id on --student-api-base (default: the first id of GET /models)."
    ),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated task subset (default: the program's DEFAULTS)."),
    train_per_task: Optional[int] = typer.Option(None, help="Training questions per task (default: the program's DEFAULTS)."),
    test_per_task: Optional[int] = typer.Option(None, help="Test questions per task (default: the program's DEFAULTS)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Folder that receives runs/<program>/<run-id>/."),
    run_id: Optional[str] = typer.Option(None, help="Run id (default: the current UTC time)."),
    epochs: float = typer.Option(2.0, help="Epochs of the general (Std-CoT) fine-tuning."),
    kb_epochs: Optional[float] = typer.Option(None, help="Epochs of the KB-augmented fine-tuning (default: --epochs)."),
    learning_rate: float = typer.Option(1e-3, help="LoRA learning rate."),
    lora_rank: int = typer.Option(8, help="LoRA rank r (alpha is 2r)."),
    batch_size: int = typer.Option(8, help="Rows per optimizer step."),
    group_by_length: bool = typer.Option(
        False, help="Batch training rows of similar length. Batches get less padding, but each one then contains mostly one view."
    ),
    weight_kb_cot: Optional[float] = typer.Option(
        None, help="nesycd: loss weight of the knowledge + question -> rationale view (default 1)."
    ),
    weight_cot: Optional[float] = typer.Option(None, help="nesycd: loss weight of the question -> rationale view (default 1)."),
    weight_answer: Optional[float] = typer.Option(
        None, help="nesycd, step_by_step: loss weight of the question -> answer view (default 1 and 0.3)."
    ),
    weight_rationale: Optional[float] = typer.Option(
        None, help="step_by_step: loss weight of the rationale task (default 0.7)."
    ),
    retriever: Optional[str] = typer.Option(None, help="Retriever kind: dense, bm25, hybrid, adaptive or none (default: the program's)."),
    k: Optional[int] = typer.Option(None, help="Entries retrieved per question (default: the program's)."),
    insert: Optional[int] = typer.Option(None, help="Retrieved entries inserted into the prompt (default: the program's)."),
    teacher_sees_gold: bool = typer.Option(False, help="Show the gold answer to the teacher when it writes knowledge."),
    threads: int = typer.Option(8, help="Concurrent requests (batched by the in-process LM)."),
    max_tokens: int = typer.Option(160, help="Student generation limit, in tokens."),
    teacher_max_tokens: int = typer.Option(192, help="Teacher generation limit, in tokens."),
    teacher_timeout_s: float = typer.Option(
        120.0, help="Seconds before a request to a server teacher times out; timeouts, 429 and 5xx are retried 3 times."
    ),
    baselines: bool = typer.Option(True, help="nesycd: also evaluate the base and Std-CoT students on the test split."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Run an optimizer (NesyCD by default) on a program file and write runs/<program>/<run-id>/compiled/."""
    _setup_logging(verbose)
    from nesycd.compile import CompileOptions, run_compile

    given_weights = {"kb_cot": weight_kb_cot, "cot": weight_cot, "answer": weight_answer, "rationale": weight_rationale}
    options = CompileOptions(
        program_file=program_file,
        method=method,
        data_dir=data_dir,
        student=student,
        teacher=teacher,
        teacher_api_base=teacher_api_base,
        student_api_base=student_api_base,
        student_served_model=student_served_model,
        tasks=tasks.split(",") if tasks else None,
        train_per_task=train_per_task,
        test_per_task=test_per_task,
        runs_dir=runs_dir,
        run_id=run_id,
        epochs=epochs,
        kb_epochs=kb_epochs,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        batch_size=batch_size,
        group_by_length=group_by_length,
        view_weights={view: weight for view, weight in given_weights.items() if weight is not None},
        retriever=retriever,
        k=k,
        insert=insert,
        teacher_sees_gold=teacher_sees_gold,
        threads=threads,
        max_tokens=max_tokens,
        teacher_max_tokens=teacher_max_tokens,
        teacher_timeout_s=teacher_timeout_s,
        baselines=baselines,
        command=" ".join(["nesycd", *sys.argv[1:]]),
    )
    summary = run_compile(options)
    typer.echo("")
    typer.echo(summary.report)


@app.command()
def run(
    path: Path = typer.Argument(..., help="A compiled/ folder, or the run folder that contains it."),
    question: str = typer.Argument(..., help="The question, with its options."),
    task: Optional[str] = typer.Option(None, help="Task name; needed when the program was compiled on several tasks."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer, rationale and knowledge as JSON."),
):
    """Answer a question with a compiled program and print the answer and the knowledge it used."""
    logging.basicConfig(level=logging.WARNING)
    from nesycd.artifact import load

    compiled = load(path)
    try:
        prediction = compiled(question, task=task)
    finally:
        compiled.close()
    if as_json:
        typer.echo(json.dumps({"answer": prediction.answer, "reasoning": prediction.reasoning,
                               "knowledge": list(prediction.knowledge)}, indent=1))
        return
    typer.echo(f"Answer: {prediction.answer}")
    typer.echo(f"Reasoning: {prediction.reasoning}")
    if prediction.knowledge:
        typer.echo("Knowledge used:")
        for entry in prediction.knowledge:
            typer.echo("  " + entry.replace("\n", "\n  "))
    else:
        typer.echo("Knowledge used: none")


def _register_command_groups() -> None:
    from nesycd.cli import deploy, evaluate, kb, traces

    kb.register(app)
    deploy.register(app)
    traces.register(app)
    evaluate.register(app)


_register_command_groups()


if __name__ == "__main__":
    main()
