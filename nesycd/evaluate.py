"""Score a compiled program or a base model on benchmarks, recording every prediction in DuckDB.

One evaluation folder contains one `traces.duckdb`. Each call of `run_evaluate` is one row of
`runs` (config kind "evaluation"), one stage per data set, one `predictions` row per answered
question (model_label = the evaluation label) and `evaluations` rows per task ("<data set>/<task>")
and per data set ("<data set>"). A rerun into the same folder with the same label skips the
questions that already have a prediction, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from nesycd.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """A data set that `nesycd evaluate` can score: its title and its domain in the NesyCD paper."""

    name: str
    title: str
    paper_domain: str  # "in" (in-domain) or "out" (out-of-domain)


BENCHMARKS: dict[str, Benchmark] = {
    "bbh": Benchmark("bbh", "BBH", "in"),
    "gsm8k": Benchmark("gsm8k", "GSM8K", "in"),
    "arc_easy": Benchmark("arc_easy", "ARC-Easy", "out"),
    "arc_challenge": Benchmark("arc_challenge", "ARC-Challenge", "out"),
    "agieval": Benchmark("agieval", "AGIEval", "out"),
}
ARC_SUBSETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
EVALUATION_FOLDER = "evaluation"
TRACES_FILE = "traces.duckdb"


@dataclass
class EvaluateOptions:
    """Options of `nesycd evaluate`; see `nesycd evaluate --help` for each one.

    Args:
        target: a compiled folder (or the run folder that contains it), or a model for a
            zero-shot evaluation: packaged id, local folder, Hugging Face id or litellm string.
        benchmarks: data sets from BENCHMARKS (default: the program's DEFAULTS["benchmarks"], else all).
        per_task: questions per task (each BBH task, each AGIEval subset, GSM8K, each ARC set);
            None for all.
        per_dataset: questions per data set, taken from its tasks in turn (the first question of
            each task, then the second, ...), after `per_task`; None for all.
        bbh_tasks: BBH tasks to score, on the test split of the deterministic split (default: the BBH
            tasks the program was compiled on, else all 27).
        agieval_subsets: AGIEval subsets (default: the eight English multiple-choice ones).
        arc_split: "Test", "Dev" or "Train" (default: Test when its file exists, else Dev).
        in_domain: data sets reported as in-domain (default: those the program was trained on,
            else BBH and GSM8K as in the NesyCD paper).
        out_dir: the evaluation folder (default: <run folder>/evaluation, or runs/evaluate/<model>).
        label: the name of this evaluation in the traces and in `nesycd compare` (default: the
            compiled program's method, or the model name).
    """

    target: str
    benchmarks: list[str] | None = None
    data_dir: Path | None = None
    per_task: int | None = None
    per_dataset: int | None = None
    bbh_tasks: list[str] | None = None
    agieval_subsets: list[str] | None = None
    arc_split: str | None = None
    in_domain: list[str] | None = None
    out_dir: Path | None = None
    label: str | None = None
    threads: int = 8
    max_tokens: int | None = None
    api_base: str | None = None
    verify_base: bool = True
    show_progress: bool = True
    command: str = ""


@dataclass
class Score:
    """Correct answers out of n questions; errors are questions whose call failed (counted as wrong)."""

    n: int = 0
    correct: int = 0
    errors: int = 0

    @property
    def accuracy(self) -> float:
        """Correct / n, or 0.0 for no questions."""
        return self.correct / self.n if self.n else 0.0

    def add(self, correct: bool, error: bool = False) -> None:
        """Count one question."""
        self.n += 1
        self.correct += int(correct)
        self.errors += int(error)


@dataclass
class EvaluationSummary:
    """The outcome of one `run_evaluate` call."""

    out_dir: Path
    label: str
    datasets: dict[str, Score]
    tasks: dict[str, dict[str, Score]]
    in_domain: list[str]
    resumed: int
    seconds: float
    report: str = ""
    config: dict = field(default_factory=dict)


@dataclass
class _Target:
    """The evaluated program: a callable that answers one example, its label and its identity."""

    answer: Callable[[Any], Any]
    label: str
    identity: dict
    close: Callable[[], None]


def run_evaluate(options: EvaluateOptions) -> EvaluationSummary:
    """Score the target on the chosen benchmarks and record everything in <out_dir>/traces.duckdb.

    Raises:
        ConfigError: an unknown benchmark, a negative per_task, or an evaluation folder whose
            label belongs to another target.
        DataError: a benchmark file is missing or malformed (the message names the path and line).
    """
    import dspy

    from nesycd.data_dir import resolve_data_dir
    from nesycd.tracing import TraceCallback, TraceStore

    started = time.perf_counter()
    _check_options(options)
    data_dir = resolve_data_dir(options.data_dir)

    # The data is loaded and checked before the model, so a bad option fails in seconds.
    trained_tasks, defaults = _read_target_settings(options.target)
    benchmarks = _pick_benchmarks(options.benchmarks or defaults.get("benchmarks") or list(BENCHMARKS))
    in_domain = _in_domain(options.in_domain, trained_tasks)
    if options.bbh_tasks is None:
        options = replace(options, bbh_tasks=_trained_bbh_tasks(trained_tasks))
    examples = {name: load_benchmark(name, data_dir, options) for name in benchmarks}

    target = _open_target(options)
    try:
        out_dir = options.out_dir or default_out_dir(options.target, target.label)
        config = {
            "kind": "evaluation",
            "label": target.label,
            **target.identity,
            "benchmarks": benchmarks,
            "in_domain": in_domain,
            "per_task": options.per_task,
            "per_dataset": options.per_dataset,
            "bbh_tasks": options.bbh_tasks,
            "agieval_subsets": options.agieval_subsets,
            "arc_split": options.arc_split,
            "data_dir": str(data_dir),
            "questions": {name: len(items) for name, items in examples.items()},
        }
        store = TraceStore(out_dir / TRACES_FILE)
        try:
            _check_same_target(store, target)
            store.start_run(
                f"{target.label}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}",
                program=str(options.target), command=options.command, config=config,
            )
            previous_callbacks = list(dspy.settings.callbacks or [])
            dspy.configure(callbacks=[*previous_callbacks, TraceCallback(store)])
            try:
                datasets, tasks, resumed = _score_all(store, target, examples, options)
                store.finish_run("succeeded")
            except BaseException:
                store.finish_run("failed")
                raise
            finally:
                dspy.configure(callbacks=previous_callbacks)
        finally:
            store.close()
    finally:
        target.close()

    seconds = time.perf_counter() - started
    summary = EvaluationSummary(out_dir, target.label, datasets, tasks, in_domain, resumed, seconds, config=config)
    summary.report = format_summary(summary)
    return summary


def load_benchmark(name: str, data_dir: Path, options: EvaluateOptions) -> list:
    """Return the evaluation examples of one data set: `options.per_task` per task, `options.per_dataset` in all."""
    examples = _load_benchmark(name, data_dir, options)
    if options.per_dataset is None:
        return examples
    return take_in_turn(examples, options.per_dataset)


def take_in_turn(examples: list, count: int) -> list:
    """Return `count` examples, taking one from each task in turn, in the order tasks first appear.

    The result keeps the input order, so examples of one task stay together.
    """
    by_task: dict[str, list] = {}
    for example in examples:
        by_task.setdefault(example.task, []).append(example)
    chosen: set[str] = set()
    rank = 0
    while len(chosen) < min(count, len(examples)):
        for task_examples in by_task.values():
            if rank < len(task_examples) and len(chosen) < count:
                chosen.add(task_examples[rank].id)
        rank += 1
    return [example for example in examples if example.id in chosen]


def _load_benchmark(name: str, data_dir: Path, options: EvaluateOptions) -> list:
    from nesycd.benchmarks import agieval, arc, bbh, gsm8k

    if name == "bbh":
        _, test = bbh.load_bbh(data_dir, options.bbh_tasks, train_per_task=0, test_per_task=options.per_task)
        return test
    if name == "gsm8k":
        return gsm8k.load_gsm8k(data_dir, "test", limit=options.per_task)
    if name in ARC_SUBSETS:
        subset = ARC_SUBSETS[name]
        split = options.arc_split or _default_arc_split(data_dir, subset)
        return arc.load_arc(data_dir, subset, split, limit=options.per_task)
    if name == "agieval":
        return agieval.load_agieval(data_dir, options.agieval_subsets, limit=options.per_task)
    raise ConfigError(f"Unknown benchmark {name!r}. Use one of: {', '.join(BENCHMARKS)}.")


def dataset_of(task: str) -> str:
    """Return the data set (a BENCHMARKS key) that a task name belongs to."""
    from nesycd.benchmarks import AGIEVAL_SUBSETS, TASKS

    if task in TASKS:
        return "bbh"
    if task in AGIEVAL_SUBSETS:
        return "agieval"
    if task in BENCHMARKS:
        return task
    raise ConfigError(f"Task {task!r} belongs to none of the benchmarks {', '.join(BENCHMARKS)}.")


def default_out_dir(target: str, label: str) -> Path:
    """Return <run folder>/evaluation for a compiled program, or runs/evaluate/<label> for a model."""
    from nesycd.artifact import is_compiled, read_manifest

    if is_compiled(target):
        compiled_dir, _ = read_manifest(target)
        if compiled_dir.name == "compiled":
            return compiled_dir.parent / EVALUATION_FOLDER
        return compiled_dir.with_name(f"{compiled_dir.name}-{EVALUATION_FOLDER}")
    return Path("runs") / "evaluate" / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def format_summary(summary: EvaluationSummary) -> str:
    """Render the accuracy per data set and per BBH task as a plain-text table."""
    from nesycd.tracing import format_table

    rows = []
    for name, score in summary.datasets.items():
        domain = "ID" if name in summary.in_domain else "OOD"
        rows.append((BENCHMARKS[name].title, domain, score.n, score.correct, score.errors, round(100 * score.accuracy, 1)))
    if "bbh" in summary.tasks and len(summary.tasks["bbh"]) > 1:
        scores = list(summary.tasks["bbh"].values())
        mean = sum(score.accuracy for score in scores) / len(scores)
        rows.append(("BBH mean over tasks", "ID" if "bbh" in summary.in_domain else "OOD", None, None, None,
                     round(100 * mean, 1)))
    table = format_table(["data set", "domain", "n", "correct", "errors", "accuracy %"], rows)
    return "\n".join([
        f"Evaluation {summary.label!r}: {sum(s.n for s in summary.datasets.values())} questions in "
        f"{summary.seconds:.0f} s ({summary.resumed} already recorded)",
        "",
        table,
        "",
        f"Traces: {summary.out_dir / TRACES_FILE}",
        f"Compare: nesycd compare {summary.out_dir} <other evaluation folders>",
    ])


# Steps ----------------------------------------------------------------------------------------


def _check_options(options: EvaluateOptions) -> None:
    if options.per_task is not None and options.per_task < 1:
        raise ConfigError(f"--per-task is {options.per_task}. Pass 1 or more, or leave it out for all questions.")
    if options.per_dataset is not None and options.per_dataset < 1:
        raise ConfigError(f"--per-dataset is {options.per_dataset}. Pass 1 or more, or leave it out for all questions.")
    if options.threads < 1:
        raise ConfigError(f"--threads is {options.threads}. Pass 1 or more.")
    if options.max_tokens is not None and options.max_tokens < 1:
        raise ConfigError(f"--max-tokens is {options.max_tokens}. Pass 1 or more.")
    if options.label is not None and not options.label.strip():
        raise ConfigError("--label is empty. Pass a name such as nesycd or std_cot.")


def _pick_benchmarks(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ConfigError(
            f"Unknown benchmark {', '.join(map(repr, unknown))}. Use a comma-separated list of: {', '.join(BENCHMARKS)}."
        )
    return list(dict.fromkeys(names))


def _in_domain(explicit: list[str] | None, trained_tasks: list[str]) -> list[str]:
    if explicit is not None:
        return _pick_benchmarks(explicit)
    trained = []
    for task in trained_tasks:
        try:
            trained.append(dataset_of(task))
        except ConfigError:
            logger.info("Training task %s belongs to no known benchmark; it does not set a domain", task)
    if trained:
        return list(dict.fromkeys(trained))
    return [name for name, benchmark in BENCHMARKS.items() if benchmark.paper_domain == "in"]


def _trained_bbh_tasks(trained_tasks: list[str]) -> list[str] | None:
    from nesycd.benchmarks import TASKS

    return [task for task in trained_tasks if task in TASKS] or None


def _default_arc_split(data_dir: Path, subset: str) -> str:
    from nesycd.benchmarks.arc import ARC_FOLDER

    if (data_dir / ARC_FOLDER / subset / f"{subset}-Test.jsonl").is_file():
        return "Test"
    logger.info("No %s test file in %s, so %s is scored on its Dev split", subset, data_dir, subset)
    return "Dev"


def _read_target_settings(target: str) -> tuple[list[str], dict]:
    """Return (tasks the program was compiled on, its program file's DEFAULTS) without loading a model."""
    from nesycd.artifact import is_compiled, read_manifest
    from nesycd.program import load_program

    if not is_compiled(target):
        return [], {}
    path, manifest = read_manifest(target)
    return list(manifest.get("tasks") or {}), load_program(path / manifest["program"]["file"]).defaults


def _open_target(options: EvaluateOptions) -> _Target:
    """Load a compiled program, or wrap a model in a zero-shot chain-of-thought program."""
    from nesycd.artifact import is_compiled, load

    if is_compiled(options.target):
        compiled = load(options.target, verify_base=options.verify_base, max_tokens=options.max_tokens)
        manifest = compiled.manifest
        identity = {
            "target": str(compiled.path),
            "method": compiled.method,
            "compile_run_id": manifest.get("run_id"),
            "model": manifest["base_model"],
            "adapter_sha256": (manifest.get("adapter") or {}).get("sha256"),
            "training": manifest.get("training"),
            "max_tokens": options.max_tokens or manifest["generation"]["max_tokens"],
        }
        return _Target(
            answer=lambda ex: compiled(ex.question, task=ex.task, task_description=ex.task_description),
            label=options.label or compiled.method,
            identity=identity,
            close=compiled.close,
        )

    from nesycd.lm import make_lm

    max_tokens = options.max_tokens or 256
    program = _plain_program(make_lm(options.target, role="student", api_base=options.api_base, max_tokens=max_tokens))
    identity = {"target": options.target, "method": "base_model", "model": options.target, "training": None,
                "max_tokens": max_tokens}
    return _Target(
        answer=lambda ex: program(question=ex.question, task=ex.task, task_description=ex.task_description),
        label=options.label or Path(options.target).name,
        identity=identity,
        close=lambda: None,
    )


def _plain_program(lm):
    """Return a program without retrieval whose ReasonStep uses `lm`: the zero-shot chain-of-thought prompt."""
    import dspy

    from nesycd.adapter import ReasonStep
    from nesycd.knowledge import NoRetriever

    class PlainProgram(dspy.Module):
        def __init__(self):
            super().__init__()
            self.retriever = NoRetriever()
            self.reason = ReasonStep()

        def forward(self, question: str, task: str, task_description: str):
            step = self.reason(task_description=task_description, question=question, knowledge=[], task=task)
            return dspy.Prediction(reasoning=step.reasoning, answer=step.answer, knowledge=[], knowledge_ids=[])

    program = PlainProgram()
    program.set_lm(lm)
    return program


def _check_same_target(store, target: _Target) -> None:
    """Raise ConfigError when earlier runs of this label in the folder evaluated another target."""
    import json

    _, rows = store.query(
        "SELECT config FROM runs WHERE json_extract_string(config, '$.kind') = 'evaluation' "
        "AND json_extract_string(config, '$.label') = ? ORDER BY started_at",
        [target.label],
    )
    keys = ("method", "model", "compile_run_id", "adapter_sha256")
    for (raw,) in rows:
        earlier = json.loads(raw)
        if any(earlier.get(key) != target.identity.get(key) for key in keys):
            raise ConfigError(
                f"{store.path} already contains evaluation {target.label!r} of {earlier.get('target')} "
                f"(method {earlier.get('method')}, model {earlier.get('model')}). Pass another --label, or "
                "another --out folder, to evaluate a different program."
            )


def _score_all(store, target: _Target, examples: dict[str, list], options: EvaluateOptions):
    """Score every data set, skipping questions already recorded; return (datasets, tasks, resumed)."""
    _, rows = store.query(
        "SELECT example_id, arg_max(correct, created_at) FROM predictions WHERE model_label = ? GROUP BY example_id",
        [target.label],
    )
    recorded = {example_id: bool(correct) for example_id, correct in rows}
    datasets: dict[str, Score] = {}
    tasks: dict[str, dict[str, Score]] = {}
    resumed = 0
    for name, items in examples.items():
        datasets[name], tasks[name], skipped = _score_dataset(store, target, name, items, recorded, options)
        resumed += skipped
    return datasets, tasks, resumed


def _score_dataset(store, target: _Target, name: str, items: list, recorded: dict[str, bool], options):
    from nesycd.benchmarks.bbh import metric
    from nesycd.parallel import run_parallel

    pending = [example for example in items if example.id not in recorded]
    with store.stage(f"evaluate_{name}", fingerprint=f"{target.label}:{len(items)}") as stage:
        if len(pending) < len(items):
            logger.info("%s: %d of %d questions already recorded, scoring %d", name, len(items) - len(pending),
                        len(items), len(pending))

        scored: dict[str, bool] = {}
        failed: set[str] = set()

        def save(outcome):
            # Runs as each question finishes, so an interruption loses at most the questions in flight.
            example = outcome.example
            if outcome.error is not None:
                failed.add(example.id)
                store.record("failures", {
                    "example_id": example.id, "task": example.task, "kind": "error", "question": example.question,
                    "gold": example.answer, "detail": outcome.error,
                })
                return
            correct = bool(metric(example, outcome.prediction))
            _record_prediction(store, target.label, example, outcome.prediction, correct)
            scored[example.id] = correct

        run_parallel(
            target.answer, pending, threads=options.threads, desc=f"{target.label} on {name}",
            show_progress=options.show_progress, on_result=save,
        )

        total, per_task = Score(), {}
        for example in items:
            error = example.id in failed
            correct = scored.get(example.id, recorded.get(example.id, False))
            total.add(correct, error)
            per_task.setdefault(example.task, Score()).add(correct, error)

        for task, task_score in per_task.items():
            _record_evaluation(store, target.label, f"{name}/{task}", task_score)
        _record_evaluation(store, target.label, name, total)
        stage.counts.update(questions=len(items), resumed=len(items) - len(pending), scored=len(pending),
                            correct=total.correct, errors=total.errors)
    logger.info("%s on %s: %d of %d correct (%.1f%%)", target.label, name, total.correct, total.n, 100 * total.accuracy)
    return total, per_task, len(items) - len(pending)


def _record_prediction(store, label: str, example, prediction, correct: bool) -> None:
    store.record(
        "predictions",
        {
            "model_label": label,
            "example_id": example.id,
            "task": example.task,
            "question": example.question,
            "output": getattr(prediction, "reasoning", None),
            "answer": getattr(prediction, "answer", None),
            "gold": example.answer,
            "correct": correct,
            "knowledge": list(getattr(prediction, "knowledge", None) or []),
            "knowledge_ids": list(getattr(prediction, "knowledge_ids", None) or []),
        },
    )


def _record_evaluation(store, label: str, task: str, score: Score) -> None:
    store.record(
        "evaluations",
        {"model_label": label, "task": task, "n": score.n, "correct": score.correct, "accuracy": score.accuracy},
    )
