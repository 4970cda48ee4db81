"""The comparison report: report.md with the side-by-side tables and PNG plots drawn with matplotlib."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from nesycd.compare import (
    TASK_WORD,
    RunResults,
    comparison_rows,
    markdown_table,
    markdown_values,
    task_rows,
)
from nesycd.evaluate import BENCHMARKS

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
# Methods that learn nothing from the teacher, so the report shows no teacher for them.
UNTAUGHT_METHODS = ("zero_shot", "answer_only", "base_model")
DATASETS_PLOT = "datasets.png"
TASKS_PLOT = "bbh_tasks.png"
TRAINING_SIZE_PLOT = "training_size.png"


def write_report(results: list[RunResults], out_dir: str | Path, *, command: str = "", title: str = "") -> Path:
    """Write report.md and its plots (datasets.png, bbh_tasks.png, training_size.png) to `out_dir`.

    Returns the path of report.md. A plot is left out when there is nothing to draw (no BBH
    tasks; no trained program for the training-size plot).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {DATASETS_PLOT: plot_datasets(results, out_dir / DATASETS_PLOT)}
    plots[TASKS_PLOT] = plot_tasks(results, "bbh", out_dir / TASKS_PLOT)
    plots[TRAINING_SIZE_PLOT] = plot_training_size(results, out_dir / TRAINING_SIZE_PLOT)

    text = render_markdown(results, plots=plots, command=command, title=title)
    path = out_dir / REPORT_FILE
    path.write_text(text)
    logger.info("Wrote %s with %d plots", path, sum(plots.values()))
    return path


def render_markdown(results: list[RunResults], *, plots: dict[str, bool], command: str = "", title: str = "") -> str:
    """Render the report's Markdown; `plots` maps each plot file name to whether it was drawn."""
    labels = [run.label for run in results]
    lines = [f"# {title or 'Method comparison'}", ""]
    lines += [
        "Accuracy in percent on each data set, per evaluated program; the best value of each row is in bold. "
        "The ID average is the mean over the in-domain data sets (those the programs were trained on), the OOD "
        "average the mean over the others. Each data set's accuracy is micro (correct answers over all its "
        "questions).",
        "",
    ]
    rows = [[name, domain, n, *markdown_values(values)] for name, domain, n, values in comparison_rows(results)]
    lines += [markdown_table(["data set", "domain", "n", *labels], rows), ""]
    smallest = min((score.n for run in results for score in run.datasets.values()), default=0)
    if smallest and smallest < 100:
        lines += [
            f"NOTE: the smallest data set here has {smallest} questions, so one question moves its accuracy by "
            f"{100 / smallest:.1f} points. Differences of that size are noise.",
            "",
        ]
    if plots.get(DATASETS_PLOT):
        lines += [f"![Accuracy per data set]({DATASETS_PLOT})", ""]

    for dataset in ("bbh", "agieval"):
        rows = task_rows(results, dataset)
        if len(rows) < 2:
            continue
        word = TASK_WORD[dataset]
        lines += [f"## {BENCHMARKS[dataset].title} per {word}", ""]
        table_rows = [[task, n, *markdown_values(values)] for task, n, values in rows]
        lines += [markdown_table([word, "n", *labels], table_rows), ""]
        if dataset == "bbh" and plots.get(TASKS_PLOT):
            lines += [f"![Accuracy per BBH task]({TASKS_PLOT})", ""]

    if plots.get(TRAINING_SIZE_PLOT):
        lines += [
            "## Accuracy and training-set size",
            "",
            "Each point is one compiled program; lines join programs of the same method. Methods that train "
            "nothing (zero-shot student, teacher) are dashed horizontal lines.",
            "",
            f"![Accuracy and training-set size]({TRAINING_SIZE_PLOT})",
            "",
        ]

    lines += ["## Evaluated programs", ""]
    run_rows = []
    for run in results:
        config = run.config
        training = config.get("training") or {}
        trained = run.training_examples
        rationales = run.teacher_rationales
        uses_teacher = run.method not in UNTAUGHT_METHODS
        run_rows.append([
            run.label, run.method, str(config.get("model", "")),
            "–" if trained is None else str(trained),
            str(training.get("teacher", "")) if uses_teacher else "–",
            "–" if rationales is None else str(rationales),
            ", ".join(BENCHMARKS[name].title for name in run.in_domain if name in BENCHMARKS),
            str(config.get("target", "")), str(run.source),
        ])
    header = ["label", "method", "model", "training examples", "teacher", "teacher rationales", "in-domain",
              "program", "traces"]
    lines += [
        "Training examples count the training questions; teacher rationales count those the teacher answered "
        "correctly, which are the only ones whose rationale is distilled.",
        "",
        markdown_table(header, run_rows),
        "",
    ]
    if command:
        lines += ["## Command", "", "```bash", command, "```", ""]
    return "\n".join(lines)


# Plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    if os.environ.get("MPLBACKEND") is None:
        matplotlib.use("Agg")  # files only; no display is needed
    import matplotlib.pyplot as plt

    return plt


def _colors(count: int) -> list:
    plt = _pyplot()
    palette = plt.get_cmap("tab10")
    return [palette(index % 10) for index in range(count)]


def plot_datasets(results: list[RunResults], path: Path) -> bool:
    """Draw grouped bars: accuracy per data set and the ID and OOD averages, one bar per label."""
    plt = _pyplot()
    rows = [row for row in comparison_rows(results) if row[0] != "BBH mean over tasks"]
    groups = [f"{name}\n({domain})" if domain and not name.endswith("average") else name for name, domain, _, _ in rows]
    width = 0.8 / max(1, len(results))
    figure, axes = plt.subplots(figsize=(min(16.0, 2.0 + len(groups) * (0.3 + 0.35 * len(results))), 4.8))
    for index, (run, color) in enumerate(zip(results, _colors(len(results)))):
        positions = [group + (index - (len(results) - 1) / 2) * width for group in range(len(rows))]
        values = [100 * (row[3][index] or 0.0) for row in rows]
        bars = axes.bar(positions, values, width, label=run.label, color=color)
        for bar, row in zip(bars, rows):
            if row[3][index] is not None:
                axes.annotate(f"{bar.get_height():.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=7)
    axes.set_xticks(range(len(rows)), groups, fontsize=8)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 105)
    axes.set_title("Accuracy per data set")
    axes.legend(fontsize=8, ncols=min(6, len(results)), loc="upper center", bbox_to_anchor=(0.5, -0.16))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_tasks(results: list[RunResults], dataset: str, path: Path) -> bool:
    """Draw horizontal grouped bars: accuracy per task of `dataset`, one bar per label."""
    rows = task_rows(results, dataset)
    if len(rows) < 2:
        return False
    plt = _pyplot()
    height = 0.8 / max(1, len(results))
    figure, axes = plt.subplots(figsize=(9.5, max(3.0, 0.18 * len(rows) * max(2, len(results)) + 1.2)))
    for index, (run, color) in enumerate(zip(results, _colors(len(results)))):
        positions = [row + (index - (len(results) - 1) / 2) * height for row in range(len(rows))]
        axes.barh(positions, [100 * (values[index] or 0.0) for _, _, values in rows], height, label=run.label, color=color)
    axes.set_yticks(range(len(rows)), [f"{task} (n={n})" for task, n, _ in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("accuracy (%)")
    axes.set_xlim(0, 100)
    axes.set_title(f"Accuracy per {BENCHMARKS[dataset].title} task")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_training_size(results: list[RunResults], path: Path) -> bool:
    """Draw ID and OOD average accuracy against the number of training examples, one line per method."""
    trained = [run for run in results if run.training_examples is not None]
    if not trained:
        return False
    plt = _pyplot()
    methods = list(dict.fromkeys(run.method for run in results))
    colors = dict(zip(methods, _colors(len(methods))))
    sizes = [run.training_examples for run in trained]

    figure, panels = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for panel, in_domain in zip(panels, (True, False)):
        for method in methods:
            runs = [run for run in results if run.method == method]
            if runs[0].training_examples is None:
                value = runs[0].domain_average(in_domain)
                if value is not None:
                    panel.axhline(100 * value, color=colors[method], linestyle="--", label=method)
                continue
            # A small sideways shift per method keeps methods with the same size and accuracy visible.
            shift = (methods.index(method) - (len(methods) - 1) / 2) * 0.012 * max(sizes)
            points = sorted(
                (run.training_examples + shift, run.domain_average(in_domain)) for run in runs
                if run.domain_average(in_domain) is not None
            )
            if points:
                panel.plot([x for x, _ in points], [100 * y for _, y in points], marker="o", color=colors[method],
                           label=method)
        panel.set_title("in-domain average" if in_domain else "out-of-domain average")
        panel.set_xlabel("training examples")
        panel.set_xlim(0, max(sizes) * 1.15 + 1)
        panel.grid(alpha=0.3)

    panels[0].set_ylabel("accuracy (%)")
    panels[0].set_ylim(0, 100)
    panels[1].legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
