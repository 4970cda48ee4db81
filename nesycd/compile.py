"""Run a whole compile from CLI options: program file -> data -> NesyCD -> traces -> compiled/ -> report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nesycd.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    """Options of `nesycd compile`; see `nesycd compile --help` for each one."""

    program_file: Path
    data_dir: Path | None = None
    student: str = "smollm2-135m"
    teacher: str = "gemma3-270m"
    teacher_api_base: str | None = None
    tasks: list[str] | None = None
    train_per_task: int | None = None
    test_per_task: int | None = None
    runs_dir: Path = Path("runs")
    run_id: str | None = None
    epochs: float = 2.0
    kb_epochs: float | None = None
    learning_rate: float = 1e-3
    lora_rank: int = 8
    batch_size: int = 8
    view_weights: dict[str, float] = field(default_factory=lambda: {"kb_cot": 1.0, "cot": 1.0, "answer": 1.0})
    retriever: str | None = None
    k: int | None = None
    insert: int | None = None
    teacher_sees_gold: bool = False
    threads: int = 8
    max_tokens: int = 160
    teacher_max_tokens: int = 192
    baselines: bool = True
    embedder: str | None = None
    show_progress: bool = True
    command: str = ""


@dataclass
class CompileSummary:
    """The run folder, the compiled folder, the results and a printable report of one compile."""

    run_dir: Path
    compiled_dir: Path
    results: dict
    stage_seconds: dict
    report: str


def run_compile(options: CompileOptions) -> CompileSummary:
    """Load the program and data, run NesyCD with tracing, write compiled/ and a report."""
    import dspy

    from nesycd.artifact import save_compiled
    from nesycd.data_dir import resolve_data_dir
    from nesycd.knowledge import make_retriever
    from nesycd.program import load_program
    from nesycd.tracing import TraceCallback, TraceStore
    from nesycd.training.sft import LoraTrainingConfig
    from optimizers.nesycd import NesyCD, NesyCDConfig

    started = time.perf_counter()
    spec = load_program(options.program_file)
    _apply_retriever_options(spec.program, options, make_retriever)
    data_dir = resolve_data_dir(options.data_dir)
    tasks = options.tasks or spec.defaults.get("tasks")
    train_per_task = _pick(options.train_per_task, spec.defaults.get("train_per_task"))
    test_per_task = _pick(options.test_per_task, spec.defaults.get("test_per_task"))
    trainset, testset = spec.load_data(data_dir, tasks=tasks, train_per_task=train_per_task, test_per_task=test_per_task)
    if not trainset:
        raise ConfigError(f"{spec.path} loaded no training examples from {data_dir} for tasks {tasks}.")
    used_tasks = sorted({example.task for example in trainset})
    demos = spec.load_demos(data_dir, used_tasks) if spec.load_demos else []

    run_id = options.run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = options.runs_dir / spec.name / run_id
    if (run_dir / "compiled").exists():
        raise ConfigError(f"Run folder {run_dir} already contains a compiled program. Pass a new --run-id.")
    run_dir.mkdir(parents=True, exist_ok=True)

    config = NesyCDConfig(
        student=options.student,
        teacher=options.teacher,
        teacher_api_base=options.teacher_api_base,
        lora=LoraTrainingConfig(
            rank=options.lora_rank, alpha=2 * options.lora_rank, learning_rate=options.learning_rate,
            epochs=options.epochs, batch_size=options.batch_size,
        ),
        kb_lora_epochs=options.kb_epochs,
        view_weights=dict(options.view_weights),
        teacher_sees_gold=options.teacher_sees_gold,
        threads=options.threads,
        student_max_tokens=options.max_tokens,
        teacher_max_tokens=options.teacher_max_tokens,
        embedder=options.embedder,
        evaluate_baselines=options.baselines,
    )
    logger.info(
        "Run %s: %d training and %d test questions from %d tasks; student %s, teacher %s",
        run_dir, len(trainset), len(testset), len(used_tasks), options.student, options.teacher,
    )

    store = TraceStore(run_dir / "traces.duckdb")
    store.start_run(
        run_id,
        program=str(spec.path),
        command=options.command,
        config={**asdict(config), "tasks": used_tasks, "train_per_task": train_per_task, "test_per_task": test_per_task,
                "data_dir": str(data_dir), "retriever": spec.program.retriever.config()},
    )
    callback = TraceCallback(store)
    previous_callbacks = list(dspy.settings.callbacks or [])
    dspy.configure(callbacks=[*previous_callbacks, callback])
    optimizer = NesyCD(spec.metric, run_dir=run_dir, store=store, config=config, demos=demos,
                       show_progress=options.show_progress)
    try:
        compiled = optimizer.compile(spec.program, trainset=trainset, testset=testset)
        result = optimizer.result
        optimizer.kb.close()
        task_descriptions = {example.task: example.task_description for example in trainset}
        compiled_dir = save_compiled(
            run_dir / "compiled",
            program=compiled,
            program_file=spec.path,
            base_model=options.student,
            adapter_dir=result.adapters["nesycd"],
            kb_dir=run_dir / "kb",
            kb_collection="nesycd_kb",
            embedder_id=optimizer.kb.embedder_id,
            embedder=options.embedder,
            tasks=task_descriptions,
            max_tokens=options.max_tokens,
            run_id=run_id,
        )
        store.finish_run("succeeded")
    except BaseException:
        store.finish_run("failed")
        raise
    finally:
        dspy.configure(callbacks=previous_callbacks)
        store.close()

    total = time.perf_counter() - started
    report = _report(run_dir, compiled_dir, result.results, result.stage_seconds, total, result.kb_entries)
    (run_dir / "report.md").write_text(report + "\n")
    return CompileSummary(run_dir, compiled_dir, result.results, result.stage_seconds, report)


def _pick(value, default):
    return value if value is not None else default


def _apply_retriever_options(program, options: CompileOptions, make_retriever) -> None:
    if options.retriever is None and options.k is None and options.insert is None:
        return
    config = dict(program.retriever.config())
    if options.retriever is not None:
        config = {"kind": options.retriever} if options.retriever == "none" else {**config, "kind": options.retriever}
    if config.get("kind") != "none":
        if options.k is not None:
            config["k"] = options.k
        if options.insert is not None:
            config["insert"] = options.insert
    program.retriever = make_retriever(config)


def _report(run_dir: Path, compiled_dir: Path, results: dict, seconds: dict, total: float, kb_entries: int) -> str:
    lines = [f"# nesycd compile: {run_dir}", "", "## Accuracy on the test split", ""]
    if results:
        labels = list(results)
        tasks = [task for task in results[labels[0]] if task not in ("ALL", "TASK_MEAN")]
        lines.append("| task | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        for task in [*tasks, "ALL", "TASK_MEAN"]:
            name = {"ALL": "**all (micro)**", "TASK_MEAN": "**mean over tasks**"}.get(task, task)
            lines.append(f"| {name} | " + " | ".join(f"{results[label].get(task, 0.0):.1%}" for label in labels) + " |")
    else:
        lines.append("No test questions; evaluation was skipped.")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {value:.0f} |" for stage, value in seconds.items()]
    lines += [f"| **total** | {total:.0f} |", "", f"Knowledge-base entries: {kb_entries}", "",
              f"Compiled program: {compiled_dir}", f"Traces: {run_dir / 'traces.duckdb'}",
              f"Try: nesycd run {compiled_dir} \"<question>\" --task <task>"]
    return "\n".join(lines)
