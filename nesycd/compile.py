"""Run a whole compile from CLI options: program file -> data -> optimizer -> traces -> compiled/ -> report."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nesycd.errors import ConfigError, DiskFullError, TraceStoreError, is_disk_full

logger = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    """Options of `nesycd compile`; see `nesycd compile --help` for each one."""

    program_file: Path
    method: str = "nesycd"
    data_dir: Path | None = None
    student: str = "smollm2-135m"
    teacher: str = "gemma3-270m"
    teacher_api_base: str | None = None
    student_api_base: str | None = None
    student_served_model: str | None = None
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
    group_by_length: bool = False
    # Loss weight per fine-tuning view; views left out keep the method's default (optimizers.VIEW_WEIGHTS).
    view_weights: dict[str, float] = field(default_factory=dict)
    retriever: str | None = None
    k: int | None = None
    insert: int | None = None
    teacher_sees_gold: bool = False
    threads: int = 8
    max_tokens: int = 160
    teacher_max_tokens: int = 192
    teacher_timeout_s: float = 120.0
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
    """Load the program and data, run the optimizer of `options.method` with tracing, write compiled/ and a report."""
    import dspy

    from nesycd.data_dir import resolve_data_dir
    from nesycd.knowledge import make_retriever
    from nesycd.program import load_program
    from nesycd.tracing import TraceCallback, TraceStore
    from nesycd.training.sft import LoraTrainingConfig
    from optimizers import method_class, view_weights
    from optimizers.nesycd import NesyCDConfig

    started = time.perf_counter()
    optimizer_class = method_class(options.method)
    weights = view_weights(options.method, options.view_weights)
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
        raise ConfigError(
            f"Run folder {run_dir} already contains a compiled program, so the run is finished. "
            "Pass a new --run-id, or delete the folder to compile it again."
        )
    if (run_dir / "traces.duckdb").exists():
        logger.info("Resuming run %s: stages that succeeded on the same inputs are reused", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    config = NesyCDConfig(
        student=options.student,
        teacher=options.teacher,
        teacher_api_base=options.teacher_api_base,
        student_api_base=options.student_api_base,
        student_served_model=options.student_served_model,
        lora=LoraTrainingConfig(
            rank=options.lora_rank, alpha=2 * options.lora_rank, learning_rate=options.learning_rate,
            epochs=options.epochs, batch_size=options.batch_size, group_by_length=options.group_by_length,
        ),
        kb_lora_epochs=options.kb_epochs,
        view_weights=weights,
        teacher_sees_gold=options.teacher_sees_gold,
        threads=options.threads,
        student_max_tokens=options.max_tokens,
        teacher_max_tokens=options.teacher_max_tokens,
        teacher_timeout_s=options.teacher_timeout_s,
        embedder=options.embedder,
        evaluate_baselines=options.baselines,
    )
    logger.info(
        "Run %s (method %s): %d training and %d test questions from %d tasks; student %s, teacher %s",
        run_dir, options.method, len(trainset), len(testset), len(used_tasks), options.student, options.teacher,
    )

    store = TraceStore(run_dir / "traces.duckdb")
    store.start_run(
        run_id,
        program=str(spec.path),
        command=options.command,
        config={**asdict(config), "method": options.method, "tasks": used_tasks, "train_per_task": train_per_task,
                "test_per_task": test_per_task, "data_dir": str(data_dir), "retriever": spec.program.retriever.config()},
    )
    callback = TraceCallback(store)
    previous_callbacks = list(dspy.settings.callbacks or [])
    dspy.configure(callbacks=[*previous_callbacks, callback])
    optimizer = optimizer_class(spec.metric, run_dir=run_dir, store=store, config=config, demos=demos,
                                show_progress=options.show_progress)
    succeeded = False
    try:
        compiled = optimizer.compile(spec.program, trainset=trainset, testset=testset)
        result = optimizer.result
        compiled_dir = _save(run_dir, options, spec, compiled, optimizer, trainset, run_id)
        store.finish_run("succeeded")
        succeeded = True
    except BaseException as error:
        _close_after_failure(store)
        if isinstance(error, Exception) and is_disk_full(error):
            raise _disk_full_error(run_dir, error) from error
        raise
    finally:
        dspy.configure(callbacks=previous_callbacks)
        if succeeded:
            store.close()

    total = time.perf_counter() - started
    report = _report(run_dir, compiled_dir, result.results, result.stage_seconds, total, result.kb_entries, options.method)
    (run_dir / "report.md").write_text(report + "\n")
    return CompileSummary(run_dir, compiled_dir, result.results, result.stage_seconds, report)


def _save(run_dir: Path, options: CompileOptions, spec, compiled, optimizer, trainset, run_id: str) -> Path:
    """Write run_dir/compiled/: the method's adapter (if it trained one) and knowledge base (if it built one)."""
    from nesycd.artifact import save_compiled
    from optimizers import TEACHER_METHODS

    kb = getattr(optimizer, "kb", None)
    kb_parts = {}
    if kb is not None:
        kb.close()  # the Qdrant folder is copied, so no client may hold it open
        kb_parts = {"kb_dir": run_dir / "kb", "kb_collection": "nesycd_kb", "embedder_id": kb.embedder_id,
                    "embedder": options.embedder}
    runs_teacher = options.method in TEACHER_METHODS
    per_task: dict[str, int] = {}
    for example in trainset:
        per_task[example.task] = per_task.get(example.task, 0) + 1
    training = {"examples": len(trainset), "per_task": per_task, "student": options.student, "teacher": options.teacher}
    rationales_file = run_dir / "teacher_rationales.jsonl"
    if rationales_file.is_file():  # written by the methods that distil teacher rationales
        training["teacher_rationales"] = sum(1 for line in rationales_file.read_text().splitlines() if line.strip())
    return save_compiled(
        run_dir / "compiled",
        program=compiled,
        program_file=spec.path,
        base_model=options.teacher if runs_teacher else options.student,
        model_api_base=options.teacher_api_base if runs_teacher else None,
        adapter_dir=optimizer.result.adapters.get(options.method),
        tasks={example.task: example.task_description for example in trainset},
        max_tokens=options.teacher_max_tokens if runs_teacher else options.max_tokens,
        run_id=run_id,
        method=options.method,
        training=training,
        **kb_parts,
    )


def _close_after_failure(store) -> None:
    """Mark the run failed and close the traces without hiding the error that stopped the run."""
    try:
        store.finish_run("failed")
        store.close()
    except TraceStoreError as error:
        logger.error("Closing the traces of the failed run also failed: %s", error)


def _disk_full_error(run_dir: Path, error: BaseException) -> DiskFullError:
    import shutil

    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"Writing to {run_dir} failed because the disk is full ({free}): {str(error)[:300]}. "
        "Free some space, or pass --runs-dir on a larger disk after moving the run folder there, then run the "
        "same command again: the stages and items already finished are kept in the run folder and reused."
    )


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


def _report(
    run_dir: Path, compiled_dir: Path, results: dict, seconds: dict, total: float, kb_entries: int, method: str = "nesycd"
) -> str:
    lines = [f"# nesycd compile: {run_dir}", "", f"Method: {method}", "", "## Accuracy on the test split", ""]
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
    lines += [f"| **total** | {total:.0f} |", ""]
    if method == "nesycd":
        lines += [f"Knowledge-base entries: {kb_entries}", ""]
    lines += [f"Compiled program: {compiled_dir}", f"Traces: {run_dir / 'traces.duckdb'}",
              f"Try: nesycd run {compiled_dir} \"<question>\" --task <task>",
              f"Score it on other benchmarks: nesycd evaluate {compiled_dir} --benchmarks bbh,gsm8k,arc_easy,arc_challenge,agieval"]
    return "\n".join(lines)
