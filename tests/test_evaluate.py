"""`nesycd evaluate` on tiny models: every benchmark, predictions in DuckDB, resume after an interruption."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nesycd.compile import CompileOptions, run_compile
from nesycd.errors import ConfigError, DataError
from nesycd.evaluate import BENCHMARKS, EvaluateOptions, dataset_of, run_evaluate
from nesycd.tracing import query_file

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
AGIEVAL_SUBSETS = ["lsat-lr", "logiqa-en", "sat-math", "sat-en-without-passage"]
PER_TASK = 2
# Questions per data set at PER_TASK=2 in the fixture data: BBH has one task, the ARC-Challenge dev
# file has one question, and logiqa-en is the only AGIEval subset with two.
EXPECTED_COUNTS = {"bbh": 2, "gsm8k": 2, "arc_easy": 2, "arc_challenge": 1, "agieval": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, boolean_data_dir) -> Path:
    """BBH boolean_expressions from the shared fixture, plus the GSM8K, ARC and AGIEval fixture files."""
    root = tmp_path_factory.mktemp("eval-data")
    shutil.copytree(boolean_data_dir / "bbh", root / "bbh")
    for folder in ("gsm8k", "arc", "agieval"):
        shutil.copytree(FIXTURES / folder, root / folder)
    return root


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory, data_dir, tiny_student) -> Path:
    """An answer-only program compiled with programs/paper.py on BBH and GSM8K (no teacher needed)."""
    options = CompileOptions(
        program_file=REPO / "programs" / "paper.py",
        method="answer_only",
        data_dir=data_dir,
        student=str(tiny_student),
        tasks=["boolean_expressions", "gsm8k"],
        train_per_task=3,
        test_per_task=0,
        runs_dir=tmp_path_factory.mktemp("runs"),
        run_id="answer-only",
        epochs=1,
        batch_size=4,
        threads=4,
        max_tokens=8,
        show_progress=False,
    )
    return run_compile(options).compiled_dir


def evaluate(target, data_dir, **overrides):
    options = EvaluateOptions(
        target=str(target), data_dir=data_dir, per_task=PER_TASK, agieval_subsets=AGIEVAL_SUBSETS, threads=4,
        show_progress=False,
    )
    for name, value in overrides.items():
        setattr(options, name, value)
    return run_evaluate(options)


@pytest.fixture(scope="module")
def evaluation(compiled_dir, data_dir):
    return evaluate(compiled_dir, data_dir)


def scalar(traces: Path, sql: str):
    return query_file(traces, sql)[1][0][0]


def traces_of(summary) -> Path:
    return summary.out_dir / "traces.duckdb"


def test_program_defaults_pick_benchmarks(evaluation):
    assert list(evaluation.datasets) == list(BENCHMARKS)
    assert {name: score.n for name, score in evaluation.datasets.items()} == EXPECTED_COUNTS


def test_default_folder_next_to_compiled(evaluation, compiled_dir):
    assert evaluation.out_dir == compiled_dir.parent / "evaluation"
    assert evaluation.label == "answer_only"


def test_one_prediction_per_question(evaluation):
    traces = traces_of(evaluation)
    total = sum(EXPECTED_COUNTS.values())
    assert scalar(traces, "select count(*) from predictions where model_label = 'answer_only'") == total
    assert scalar(traces, "select count(distinct example_id) from predictions") == total
    assert scalar(traces, "select count(*) from predictions where output is null") == 0


def test_stage_per_dataset(evaluation):
    _, rows = query_file(traces_of(evaluation), "select name, status from stages order by started_at")
    assert [name for name, _ in rows] == [f"evaluate_{name}" for name in BENCHMARKS]
    assert {status for _, status in rows} == {"succeeded"}


def test_evaluations_rows_match_predictions(evaluation):
    traces = traces_of(evaluation)
    _, rows = query_file(traces, "select task, n, correct from evaluations order by task")
    recorded = {task: (n, correct) for task, n, correct in rows}
    for name, count in EXPECTED_COUNTS.items():
        assert recorded[name][0] == count
    assert recorded["bbh/boolean_expressions"][0] == 2
    assert recorded["agieval/logiqa-en"][0] == 2
    assert recorded["agieval/sat-math"][0] == 1
    correct = scalar(traces, "select count(*) from predictions where correct")
    assert sum(recorded[name][1] for name in EXPECTED_COUNTS) == correct


def test_scores_match_metric(evaluation):
    from nesycd.benchmarks.answers import answers_match

    _, rows = query_file(traces_of(evaluation), "select answer, gold, correct, task from predictions")
    types = {"gsm8k": "number", "boolean_expressions": "true_false"}
    for answer, gold, correct, task in rows:
        assert correct == answers_match(answer, gold, types.get(task, "choice"))


def test_trained_datasets_are_in_domain(evaluation):
    assert evaluation.in_domain == ["bbh", "gsm8k"]
    (config,) = query_file(traces_of(evaluation), "select config from runs")[1][0]
    config = json.loads(config)
    assert config["kind"] == "evaluation"
    assert config["method"] == "answer_only"
    assert config["training"]["examples"] == 3 + 3


def test_ood_prompt_uses_its_description(evaluation):
    from nesycd.benchmarks.arc import SUBSETS

    _, rows = query_file(traces_of(evaluation), "select messages from lm_calls where stage = 'evaluate_arc_easy'")
    assert len(rows) == 2
    for (messages,) in rows:
        prompt = json.loads(messages)[0]["content"]
        assert prompt.startswith(SUBSETS["ARC-Easy"][1])
        assert prompt.endswith("Answer:")


def test_rerun_skips_recorded(evaluation, compiled_dir, data_dir):
    again = evaluate(compiled_dir, data_dir)
    traces = traces_of(again)
    assert again.resumed == sum(EXPECTED_COUNTS.values())
    assert scalar(traces, "select count(*) from predictions") == sum(EXPECTED_COUNTS.values())
    assert {name: (s.n, s.correct) for name, s in again.datasets.items()} == {
        name: (s.n, s.correct) for name, s in evaluation.datasets.items()
    }
    assert scalar(traces, "select count(*) from runs where status = 'succeeded'") == 2


def test_interrupted_run_resumes(compiled_dir, data_dir, tmp_path, monkeypatch):
    import nesycd.evaluate as evaluate_module

    out = tmp_path / "interrupted"
    real_record = evaluate_module._record_prediction
    calls = {"count": 0}

    def record_until_third(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the third prediction was recorded
        real_record(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "_record_prediction", record_until_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(compiled_dir, data_dir, out_dir=out, threads=1, benchmarks=["gsm8k", "arc_easy"])
    traces = out / "traces.duckdb"
    assert scalar(traces, "select count(*) from predictions") == 2
    assert scalar(traces, "select status from runs") == "failed"

    monkeypatch.setattr(evaluate_module, "_record_prediction", real_record)
    resumed = evaluate(compiled_dir, data_dir, out_dir=out, threads=1, benchmarks=["gsm8k", "arc_easy"])
    assert resumed.resumed == 2
    assert scalar(traces, "select count(*) from predictions") == 4
    assert scalar(traces, "select count(distinct example_id) from predictions") == 4
    assert resumed.datasets["gsm8k"].n == 2
    assert resumed.datasets["arc_easy"].n == 2


def test_call_error_counted_and_retried(compiled_dir, data_dir, tmp_path, monkeypatch):
    import nesycd.evaluate as evaluate_module

    out = tmp_path / "errors"
    real_open = evaluate_module._open_target

    def failing_open(options):
        target = real_open(options)
        target.answer = lambda example: (_ for _ in ()).throw(RuntimeError("server down"))
        return target

    monkeypatch.setattr(evaluate_module, "_open_target", failing_open)
    failed = evaluate(compiled_dir, data_dir, out_dir=out, benchmarks=["gsm8k"])
    traces = out / "traces.duckdb"
    assert failed.datasets["gsm8k"].n == 2
    assert failed.datasets["gsm8k"].errors == 2
    assert failed.datasets["gsm8k"].correct == 0
    assert scalar(traces, "select count(*) from failures where detail like '%server down%'") == 2
    assert scalar(traces, "select count(*) from predictions") == 0

    monkeypatch.setattr(evaluate_module, "_open_target", real_open)
    retried = evaluate(compiled_dir, data_dir, out_dir=out, benchmarks=["gsm8k"])
    assert retried.resumed == 0
    assert retried.datasets["gsm8k"].errors == 0
    assert scalar(traces, "select count(*) from predictions") == 2


def test_other_target_same_label_rejected(evaluation, tiny_student, data_dir):
    with pytest.raises(ConfigError, match="already contains evaluation 'answer_only'"):
        evaluate(tiny_student, data_dir, out_dir=evaluation.out_dir, label="answer_only", benchmarks=["gsm8k"])


def test_base_model_target(tiny_student, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = evaluate(tiny_student, data_dir, benchmarks=["gsm8k", "arc_challenge"], per_task=1, max_tokens=8)
    assert summary.label == tiny_student.name
    assert summary.out_dir == Path("runs") / "evaluate" / tiny_student.name
    assert summary.in_domain == ["bbh", "gsm8k"]
    assert {name: score.n for name, score in summary.datasets.items()} == {"gsm8k": 1, "arc_challenge": 1}
    prompt = json.loads(scalar(traces_of(summary), "select messages from lm_calls where stage = 'evaluate_gsm8k'"))
    assert prompt[0]["content"].endswith("Answer: Let's think step by step.")


def test_in_domain_override(tiny_student, data_dir, tmp_path):
    summary = evaluate(tiny_student, data_dir, benchmarks=["gsm8k"], per_task=1, max_tokens=4,
                       out_dir=tmp_path / "override", in_domain=["arc_easy"])
    assert summary.in_domain == ["arc_easy"]
    assert "OOD" in summary.report


def test_arc_test_split_preferred(tiny_student, data_dir, tmp_path):
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    dev = data / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    test_lines = [line.replace("Fixture_Easy", "Fixture_Test") for line in dev.read_text().splitlines()]
    (dev.parent / "ARC-Easy-Test.jsonl").write_text("\n".join(test_lines) + "\n")
    summary = evaluate(tiny_student, data, benchmarks=["arc_easy", "arc_challenge"], per_task=1, max_tokens=4,
                       out_dir=tmp_path / "arc")
    _, rows = query_file(traces_of(summary), "select example_id from predictions order by example_id")
    ids = [row[0] for row in rows]
    assert ids == ["arc_challenge/Fixture_Challenge_3", "arc_easy/Fixture_Test_4"]


def test_unknown_benchmark_rejected(tiny_student, data_dir):
    with pytest.raises(ConfigError, match="Unknown benchmark 'mmlu'.*bbh, gsm8k, arc_easy, arc_challenge, agieval"):
        evaluate(tiny_student, data_dir, benchmarks=["gsm8k", "mmlu"])


def test_invalid_per_task_rejected(tiny_student, data_dir):
    with pytest.raises(ConfigError, match="--per-task is 0"):
        evaluate(tiny_student, data_dir, per_task=0)


def test_missing_data_names_path(tiny_student, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/gsm8k/test.jsonl"):
        evaluate(tiny_student, tmp_path / "empty", benchmarks=["gsm8k"])


def test_dataset_of_tasks():
    assert dataset_of("web_of_lies") == "bbh"
    assert dataset_of("lsat-ar") == "agieval"
    assert dataset_of("arc_challenge") == "arc_challenge"
    assert dataset_of("gsm8k") == "gsm8k"
    with pytest.raises(ConfigError, match="mmlu"):
        dataset_of("mmlu")


def test_cli_evaluate(compiled_dir, data_dir, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "evaluate", str(compiled_dir), "--data-dir", str(data_dir),
         "--benchmarks", "gsm8k,arc_challenge", "--per-task", "1", "--out", str(out), "--label", "cli-run"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "GSM8K" in result.stdout
    assert "ARC-Challenge" in result.stdout
    assert f"nesycd compare {out}" in result.stdout
    assert scalar(out / "traces.duckdb", "select count(*) from predictions where model_label = 'cli-run'") == 2

    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "evaluate", str(compiled_dir), "--data-dir", str(data_dir),
         "--benchmarks", "mmlu", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Unknown benchmark 'mmlu'" in result.stderr


def test_take_in_turn_spreads_tasks():
    import dspy

    from nesycd.evaluate import take_in_turn

    examples = [dspy.Example(id=f"{task}/{index}", task=task) for task, count in (("a", 3), ("b", 1), ("c", 2))
                for index in range(count)]
    assert [ex.id for ex in take_in_turn(examples, 4)] == ["a/0", "a/1", "b/0", "c/0"]
    assert [ex.id for ex in take_in_turn(examples, 5)] == ["a/0", "a/1", "b/0", "c/0", "c/1"]
    assert len(take_in_turn(examples, 50)) == 6


def test_per_dataset_limit(tiny_student, data_dir, tmp_path):
    summary = evaluate(tiny_student, data_dir, benchmarks=["agieval"], per_task=None, per_dataset=3, max_tokens=4,
                       out_dir=tmp_path / "per-dataset")
    assert summary.datasets["agieval"].n == 3
    assert sorted(summary.tasks["agieval"]) == ["logiqa-en", "lsat-lr", "sat-math"]
    with pytest.raises(ConfigError, match="--per-dataset is 0"):
        evaluate(tiny_student, data_dir, per_dataset=0)
