"""`nesycd compare`: the side-by-side table, the Markdown report and its plots, from real DuckDB files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nesycd.compare import comparison_rows, find_traces, format_comparison, load_results, task_rows
from nesycd.errors import ConfigError
from nesycd.report import DATASETS_PLOT, REPORT_FILE, TASKS_PLOT, TRAINING_SIZE_PLOT, write_report
from nesycd.tracing import TraceStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIXTURES = Path(__file__).parent / "fixtures"


def write_evaluation(folder: Path, label: str, datasets: dict, *, tasks: dict | None = None, status="succeeded",
                     method: str | None = None, training_examples: int | None = 12, in_domain=("bbh", "gsm8k")):
    """Record one evaluation run the way `nesycd evaluate` does: a runs row and evaluations rows."""
    folder.mkdir(parents=True, exist_ok=True)
    store = TraceStore(folder / "traces.duckdb")
    try:
        config = {
            "kind": "evaluation", "label": label, "method": method or label, "model": "tiny", "target": str(folder),
            "in_domain": list(in_domain),
            "training": None if training_examples is None else {"examples": training_examples, "teacher": "t"},
        }
        store.start_run(f"{label}-{uuid.uuid4().hex[:8]}", program="p", command="nesycd evaluate", config=config)
        for name, (n, correct) in datasets.items():
            store.record("evaluations", {"model_label": label, "task": name, "n": n, "correct": correct,
                                         "accuracy": correct / n})
        for task, (n, correct) in (tasks or {}).items():
            store.record("evaluations", {"model_label": label, "task": task, "n": n, "correct": correct,
                                         "accuracy": correct / n})
        store.finish_run(status)
    finally:
        store.close()
    return folder


FULL = {"bbh": (10, 6), "gsm8k": (4, 1), "arc_easy": (4, 2), "arc_challenge": (4, 3), "agieval": (8, 4)}
BBH_TASKS = {"bbh/navigate": (5, 4), "bbh/web_of_lies": (5, 2)}


@pytest.fixture()
def two_methods(tmp_path):
    first = write_evaluation(tmp_path / "a" / "evaluation", "std_cot", FULL, tasks=BBH_TASKS)
    second = write_evaluation(
        tmp_path / "b" / "evaluation", "zero_shot",
        {"bbh": (10, 3), "gsm8k": (4, 0), "arc_easy": (4, 4), "arc_challenge": (4, 1), "agieval": (8, 2)},
        tasks={"bbh/navigate": (5, 1), "bbh/web_of_lies": (5, 2)}, training_examples=None,
    )
    return [first.parent, second.parent]


def rows_by_name(results):
    return {name: values for name, _, _, values in comparison_rows(results)}


def test_dataset_rows_and_averages(two_methods):
    results = load_results(two_methods)
    rows = rows_by_name(results)
    assert [run.label for run in results] == ["std_cot", "zero_shot"]
    assert rows["BBH"] == [0.6, 0.3]
    assert rows["GSM8K"] == [0.25, 0.0]
    assert rows["ID average"] == pytest.approx([(0.6 + 0.25) / 2, (0.3 + 0.0) / 2])
    assert rows["OOD average"] == pytest.approx([(0.5 + 0.75 + 0.5) / 3, (1.0 + 0.25 + 0.25) / 3])
    assert rows["BBH mean over tasks"] == pytest.approx([(0.8 + 0.4) / 2, (0.2 + 0.4) / 2])


def test_domains_and_counts(two_methods):
    summary = {name: (domain, n) for name, domain, n, _ in comparison_rows(load_results(two_methods))}
    assert summary["BBH"] == ("ID", "10")
    assert summary["AGIEval"] == ("OOD", "8")
    assert summary["ARC-Challenge"] == ("OOD", "4")


def test_task_rows(two_methods):
    rows = task_rows(load_results(two_methods), "bbh")
    assert rows == [("navigate", "5", [0.8, 0.2]), ("web_of_lies", "5", [0.4, 0.4])]


def test_latest_succeeded_run_wins(tmp_path):
    folder = tmp_path / "run" / "evaluation"
    write_evaluation(folder, "nesycd", {"bbh": (10, 1), "gsm8k": (4, 1)})
    write_evaluation(folder, "nesycd", {"bbh": (10, 7)})
    write_evaluation(folder, "nesycd", {"bbh": (10, 10)}, status="failed")
    (run,) = load_results([folder])
    assert run.datasets["bbh"].correct == 7
    assert run.datasets["gsm8k"].correct == 1


def test_runs_of_separate_datasets_merge(tmp_path):
    folder = tmp_path / "evaluation"
    write_evaluation(folder, "nesycd", {"bbh": (10, 5)})
    write_evaluation(folder, "nesycd", {"agieval": (8, 2)})
    (run,) = load_results([folder])
    assert list(run.datasets) == ["bbh", "agieval"]


def test_two_labels_in_one_folder(tmp_path):
    folder = tmp_path / "evaluation"
    write_evaluation(folder, "first", {"bbh": (10, 5)})
    write_evaluation(folder, "second", {"bbh": (10, 6)})
    results = load_results([folder])
    assert sorted(run.label for run in results) == ["first", "second"]


def test_duplicate_labels_get_folder(tmp_path):
    write_evaluation(tmp_path / "r1" / "evaluation", "nesycd", {"bbh": (10, 5)})
    write_evaluation(tmp_path / "r2" / "evaluation", "nesycd", {"bbh": (10, 6)})
    results = load_results([tmp_path / "r1", tmp_path / "r2"])
    assert [run.label for run in results] == ["nesycd (r1)", "nesycd (r2)"]


def test_find_traces_paths(tmp_path):
    traces = write_evaluation(tmp_path / "run" / "evaluation", "nesycd", {"bbh": (1, 1)}) / "traces.duckdb"
    (tmp_path / "run" / "compiled").mkdir()
    (tmp_path / "run" / "compiled" / "manifest.json").write_text("{}")
    assert find_traces(tmp_path / "run") == traces
    assert find_traces(tmp_path / "run" / "evaluation") == traces
    assert find_traces(tmp_path / "run" / "compiled") == traces
    assert find_traces(traces) == traces


def test_compile_traces_rejected(tmp_path):
    store = TraceStore(tmp_path / "traces.duckdb")
    store.start_run("compile", program="p", command="nesycd compile", config={"method": "nesycd"})
    store.finish_run("succeeded")
    store.close()
    with pytest.raises(ConfigError, match=f"Run `nesycd evaluate {tmp_path}` first"):
        load_results([tmp_path])
    with pytest.raises(ConfigError, match="No evaluation given"):
        load_results([])


def test_text_table(two_methods):
    text = format_comparison(load_results(two_methods))
    lines = text.splitlines()
    assert lines[0].split() == ["data", "set", "domain", "n", "std_cot", "zero_shot"]
    assert any(line.split()[:2] == ["ID", "average"] and line.split()[-2:] == ["42.5", "15.0"] for line in lines)
    assert "BBH per task (accuracy %)" in text
    assert any(line.split() == ["navigate", "5", "80.0", "20.0"] for line in lines)


def test_report_files(two_methods, tmp_path):
    out = tmp_path / "report"
    report = write_report(load_results(two_methods), out, command="python make_table.py", title="Six methods")
    text = report.read_text()
    assert report == out / REPORT_FILE
    for plot in (DATASETS_PLOT, TASKS_PLOT, TRAINING_SIZE_PLOT):
        data = (out / plot).read_bytes()
        assert data.startswith(PNG_SIGNATURE), plot
        assert len(data) > 5000, plot
        assert f"]({plot})" in text
    assert text.startswith("# Six methods")
    assert "| BBH | ID | 10 | **60.0** | 30.0 |" in text
    assert "| navigate | 5 | **80.0** | 20.0 |" in text
    assert "| web_of_lies | 5 | 40.0 | 40.0 |" in text  # equal values: nothing is bold
    assert "```bash\npython make_table.py\n```" in text
    assert "one question moves its accuracy by 25.0 points" in text


def test_report_without_trained_program(tmp_path):
    folder = write_evaluation(tmp_path / "evaluation", "zero_shot", {"gsm8k": (4, 1)}, training_examples=None)
    out = tmp_path / "report"
    text = write_report(load_results([folder]), out).read_text()
    assert (out / DATASETS_PLOT).is_file()
    assert not (out / TASKS_PLOT).exists()
    assert not (out / TRAINING_SIZE_PLOT).exists()
    assert TRAINING_SIZE_PLOT not in text


def test_cli_compare(two_methods, tmp_path):
    out = tmp_path / "cli-report"
    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "compare", *map(str, two_methods), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "OOD average" in result.stdout
    assert f"Report: {out / REPORT_FILE}" in result.stdout
    assert "nesycd compare" in (out / REPORT_FILE).read_text()

    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "compare", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "No `nesycd evaluate` results found" in result.stderr


def test_compare_real_evaluations(tiny_student, tmp_path):
    """Two evaluations made by run_evaluate on the tiny model, compared end to end."""
    from nesycd.evaluate import EvaluateOptions, run_evaluate

    data = tmp_path / "data"
    for folder in ("gsm8k", "arc"):
        shutil.copytree(FIXTURES / folder, data / folder)
    summaries = {}
    for label, max_tokens in (("short", 2), ("long", 8)):
        summaries[label] = run_evaluate(EvaluateOptions(
            target=str(tiny_student), benchmarks=["gsm8k", "arc_easy"], data_dir=data, per_task=2,
            out_dir=tmp_path / "evaluation", label=label, max_tokens=max_tokens, show_progress=False,
        ))
    results = load_results([tmp_path / "evaluation"])
    by_label = {run.label: run for run in results}
    assert set(by_label) == {"short", "long"}
    for label, summary in summaries.items():
        assert {name: (s.n, s.correct) for name, s in by_label[label].datasets.items()} == {
            name: (s.n, s.correct) for name, s in summary.datasets.items()
        }
    assert by_label["long"].domain_average(True) == summaries["long"].datasets["gsm8k"].accuracy
    write_report(results, tmp_path / "report")
    assert (tmp_path / "report" / DATASETS_PLOT).read_bytes().startswith(PNG_SIGNATURE)


def test_methods_table_steps(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import methods_table

    args = methods_table.parse_args(["--data-dir", "data", "--out", str(tmp_path / "out"),
                                     "--runs-dir", str(tmp_path / "runs"), "--train-per-task", "2,4"])
    steps = methods_table.build_steps(args)
    names = [name for name, _ in steps]
    assert names[:4] == ["compile zero_shot", "evaluate zero_shot", "compile teacher", "evaluate teacher"]
    assert "compile nesycd-n2" in names
    assert "compile nesycd-n4" in names
    assert "compile zero_shot-n4" not in names
    assert names[-1] == "compare"
    assert len(names) == 2 * (2 + 4 * 2) + 1
    compare = steps[-1][1]
    assert compare[compare.index("--out") + 1] == str(tmp_path / "out")
    compile_std = dict(steps)["compile std_cot-n4"]
    assert compile_std[compile_std.index("--method") + 1] == "std_cot"
    assert compile_std[compile_std.index("--train-per-task") + 1] == "4"

    (tmp_path / "runs" / "paper" / "zero_shot" / "compiled").mkdir(parents=True)
    (tmp_path / "runs" / "paper" / "zero_shot" / "compiled" / "manifest.json").write_text("{}")
    names = [name for name, _ in methods_table.build_steps(args)]
    assert "compile zero_shot" not in names
    assert "evaluate zero_shot" in names
