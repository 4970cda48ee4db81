"""Side-by-side comparison of evaluations: one table of methods x data sets, and a Markdown report with plots.

`load_results` reads the `evaluations` rows that `nesycd evaluate` wrote. For each label and each
task it keeps the row of the most recent succeeded run, so evaluating one data set at a time, or
resuming an interrupted evaluation, still yields one complete column per label.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from nesycd.errors import ConfigError
from nesycd.evaluate import BENCHMARKS, EVALUATION_FOLDER, TRACES_FILE, Score

logger = logging.getLogger(__name__)

# What a task of a multi-task data set is called in tables and headings.
TASK_WORD = {"bbh": "task", "agieval": "subset"}

_LATEST_ROWS_SQL = """
SELECT e.model_label, e.task, arg_max(e.n, e.created_at), arg_max(e.correct, e.created_at)
FROM evaluations e JOIN runs r ON e.run_id = r.run_id
WHERE r.status = 'succeeded' AND json_extract_string(r.config, '$.kind') = 'evaluation'
GROUP BY e.model_label, e.task
"""
_LATEST_CONFIG_SQL = """
SELECT json_extract_string(config, '$.label'), arg_max(config, started_at), count(*)
FROM runs
WHERE status = 'succeeded' AND json_extract_string(config, '$.kind') = 'evaluation'
GROUP BY 1
"""
_UNFINISHED_SQL = """
SELECT json_extract_string(config, '$.label'), count(*)
FROM runs
WHERE coalesce(status, 'running') <> 'succeeded' AND json_extract_string(config, '$.kind') = 'evaluation'
GROUP BY 1
"""


@dataclass
class RunResults:
    """The scores of one evaluation label: per data set, per task, and its run configuration."""

    label: str
    source: Path
    config: dict
    datasets: dict[str, Score] = field(default_factory=dict)
    tasks: dict[str, dict[str, Score]] = field(default_factory=dict)

    @property
    def in_domain(self) -> list[str]:
        """The data sets this evaluation reports as in-domain."""
        return list(self.config.get("in_domain") or [])

    @property
    def method(self) -> str:
        """The method that built the evaluated program ("base_model" for a bare model)."""
        return self.config.get("method") or self.label

    @property
    def teacher_rationales(self) -> int | None:
        """The number of teacher rationales the program was trained on, or None when it used none."""
        return (self.config.get("training") or {}).get("teacher_rationales")

    @property
    def training_examples(self) -> int | None:
        """The number of training examples of the compiled program, or None when it was not trained."""
        training = self.config.get("training") or {}
        if self.method in ("zero_shot", "teacher", "base_model"):
            return None
        return training.get("examples")

    def domain_average(self, in_domain: bool) -> float | None:
        """Return the mean accuracy over the in-domain (or out-of-domain) data sets, or None when there is none."""
        names = [name for name in self.datasets if (name in self.in_domain) == in_domain]
        if not names:
            return None
        return sum(self.datasets[name].accuracy for name in names) / len(names)

    def task_mean(self, dataset: str) -> float | None:
        """Return the mean accuracy over the tasks of `dataset`, or None when it has no scored task."""
        scores = list(self.tasks.get(dataset, {}).values())
        if not scores:
            return None
        return sum(score.accuracy for score in scores) / len(scores)


def find_traces(path: str | Path) -> Path:
    """Return the traces file with evaluation results for an evaluation folder, a run folder or a compiled folder.

    Raises:
        ConfigError: no traces file with `nesycd evaluate` results is found there.
    """
    from nesycd.artifact import MANIFEST

    path = Path(path)
    if path.is_file():
        candidates = [path]
    elif (path / MANIFEST).is_file():  # a compiled folder: its evaluation folder is next to it
        sibling = path.parent / EVALUATION_FOLDER if path.name == "compiled" else path.with_name(f"{path.name}-{EVALUATION_FOLDER}")
        candidates = [sibling / TRACES_FILE]
    else:  # a run folder, or the evaluation folder itself
        candidates = [path / EVALUATION_FOLDER / TRACES_FILE, path / TRACES_FILE]
    for candidate in candidates:
        if candidate.is_file() and _has_evaluations(candidate):
            return candidate
    raise ConfigError(
        f"No `nesycd evaluate` results found for {path}. Run `nesycd evaluate {path}` first, or pass the "
        "evaluation folder that it printed."
    )


def load_results(paths: list[str | Path]) -> list[RunResults]:
    """Read the latest succeeded scores of every evaluation label in the given folders, in argument order.

    A label found in several folders gets the folder name appended, so every column is unique.

    Raises:
        ConfigError: a path has no evaluation results.
    """
    from nesycd.tracing import query_file

    if not paths:
        raise ConfigError("No evaluation given. Pass one or more folders written by `nesycd evaluate`.")
    results: list[RunResults] = []
    for path in paths:
        traces = find_traces(path)
        _, unfinished = query_file(traces, _UNFINISHED_SQL)
        for label, count in unfinished:
            logger.warning("%s: %d unfinished evaluation runs of %r; rerun `nesycd evaluate` to finish them",
                           traces, count, label)
        _, configs = query_file(traces, _LATEST_CONFIG_SQL)
        _, rows = query_file(traces, _LATEST_ROWS_SQL)
        for label, raw_config, _ in configs:
            run = RunResults(label=label, source=traces, config=json.loads(raw_config))
            for row_label, task, n, correct in rows:
                if row_label != label:
                    continue
                dataset, _, task_name = task.partition("/")
                if dataset not in BENCHMARKS:
                    continue
                if task_name:
                    run.tasks.setdefault(dataset, {})[task_name] = Score(n=n, correct=correct)
                else:
                    run.datasets[dataset] = Score(n=n, correct=correct)
            run.datasets = {name: run.datasets[name] for name in BENCHMARKS if name in run.datasets}
            results.append(run)
    _make_labels_unique(results)
    return results


def comparison_rows(results: list[RunResults]) -> list[tuple[str, str, str, list[float | None]]]:
    """Return the summary rows (name, domain, n, accuracy per label): data sets, ID and OOD averages, BBH task mean."""
    datasets = [name for name in BENCHMARKS if any(name in run.datasets for run in results)]
    rows = []
    for name in datasets:
        domains = {"ID" if name in run.in_domain else "OOD" for run in results if name in run.datasets}
        counts = sorted({run.datasets[name].n for run in results if name in run.datasets})
        values = [run.datasets[name].accuracy if name in run.datasets else None for run in results]
        rows.append((BENCHMARKS[name].title, "/".join(sorted(domains)), _count_text(counts), values))
    rows.append(("ID average", "ID", "", [run.domain_average(True) for run in results]))
    rows.append(("OOD average", "OOD", "", [run.domain_average(False) for run in results]))
    if any(len(run.tasks.get("bbh", {})) > 1 for run in results):
        rows.append(("BBH mean over tasks", "", "", [run.task_mean("bbh") for run in results]))
    return rows


def task_rows(results: list[RunResults], dataset: str) -> list[tuple[str, str, list[float | None]]]:
    """Return (task, n, accuracy per label) for every task of `dataset` that any label scored."""
    names = sorted({task for run in results for task in run.tasks.get(dataset, {})})
    rows = []
    for task in names:
        scores = [run.tasks.get(dataset, {}).get(task) for run in results]
        counts = sorted({score.n for score in scores if score is not None})
        rows.append((task, _count_text(counts), [None if score is None else score.accuracy for score in scores]))
    return rows


def format_comparison(results: list[RunResults]) -> str:
    """Render the side-by-side table and the per-task tables as plain text (accuracy in %)."""
    from nesycd.tracing import format_table

    labels = [run.label for run in results]
    lines = [format_table(["data set", "domain", "n", *labels],
                          [(name, domain, n, *map(_percent, values)) for name, domain, n, values in comparison_rows(results)])]
    for dataset in ("bbh", "agieval"):
        rows = task_rows(results, dataset)
        if len(rows) > 1:
            lines += ["", f"{BENCHMARKS[dataset].title} per {TASK_WORD[dataset]} (accuracy %)", ""]
            lines.append(format_table(["task", "n", *labels], [(task, n, *map(_percent, values)) for task, n, values in rows]))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_values(values: list[float | None]) -> list[str]:
    """Format accuracies as percentages, with the best of the row in bold (none when all are equal)."""
    present = [value for value in values if value is not None]
    best = max(present) if present else None
    varied = len(set(present)) > 1
    cells = []
    for value in values:
        text = _percent(value)
        if varied and value == best:
            text = f"**{text}**"
        cells.append(text)
    return cells


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _count_text(counts: list[int]) -> str:
    if not counts:
        return ""
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _has_evaluations(traces: Path) -> bool:
    from nesycd.errors import TraceStoreError
    from nesycd.tracing import query_file

    try:
        _, rows = query_file(traces, "SELECT count(*) FROM runs WHERE json_extract_string(config, '$.kind') = 'evaluation'")
    except TraceStoreError as error:
        logger.debug("%s has no evaluation runs: %s", traces, error)
        return False
    return rows[0][0] > 0


def _make_labels_unique(results: list[RunResults]) -> None:
    seen: dict[str, int] = {}
    for run in results:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in results:
        if seen[run.label] > 1:
            folder = run.source.parent
            name = folder.parent.name if folder.name == EVALUATION_FOLDER else folder.name
            run.label = f"{run.label} ({name})"
