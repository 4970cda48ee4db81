"""A compile killed with SIGKILL during teacher generation and during fine-tuning resumes without redoing work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nesycd.tracing import query_file

REPO = Path(__file__).resolve().parents[1]
TRAIN_QUESTIONS = 12


def compile_command(data_dir: Path, student: Path, teacher: Path, runs: Path, run_id: str) -> list[str]:
    return [
        sys.executable, "-m", "nesycd.cli.main", "compile", str(REPO / "programs" / "bbh.py"),
        "--data-dir", str(data_dir), "--student", str(student), "--teacher", str(teacher),
        "--tasks", "boolean_expressions", "--train-per-task", str(TRAIN_QUESTIONS), "--test-per-task", "8",
        "--runs-dir", str(runs), "--run-id", run_id,
        # Enough Std-CoT steps (12 epochs of 2 or 3 steps) to kill the fine-tuning between two checkpoints.
        "--epochs", "12", "--kb-epochs", "1", "--batch-size", "4",
        "--threads", "1", "--max-tokens", "24", "--teacher-max-tokens", "40",
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def kill_when(process: subprocess.Popen, log: Path, condition, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the compile exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
            return
        time.sleep(0.005)
    process.kill()
    raise AssertionError(f"timed out waiting for {what}")


def journal_ids(run_dir: Path) -> list[str]:
    path = run_dir / "journal" / "teacher_rationales.jsonl"
    if not path.exists():
        return []
    ids = []
    for line in path.read_text().splitlines():
        try:
            ids.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            pass
    return ids


def checkpoint_steps(run_dir: Path) -> list[int]:
    found = (run_dir / "adapters" / "std_cot" / "checkpoints").glob("checkpoint-*/trainer_state.json")
    return [int(path.parent.name.split("-")[1]) for path in found]


def rows(run_dir: Path, sql: str) -> list[tuple]:
    return query_file(run_dir / "traces.duckdb", sql)[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, boolean_data_dir, tiny_student, tiny_teacher):
    """An uninterrupted compile and one killed twice and resumed twice, on the same options."""
    root = tmp_path_factory.mktemp("resume")
    log = root / "compile.log"
    facts = {"live_reads": []}
    reference_log = root / "reference.log"
    process = start(compile_command(boolean_data_dir, tiny_student, tiny_teacher, root, "reference"), reference_log)
    traces = root / "bbh" / "reference" / "traces.duckdb"
    # Read the traces from this process while the compile process writes them.
    while process.poll() is None:
        if traces.exists():
            _, found = query_file(traces, "select (select status from runs), (select count(*) from stages), "
                                          "(select count(*) from lm_calls)")
            facts["live_reads"].append(found[0])
        time.sleep(0.2)
    assert process.returncode == 0, reference_log.read_text()[-3000:]

    command = compile_command(boolean_data_dir, tiny_student, tiny_teacher, root, "killed")
    run_dir = root / "bbh" / "killed"

    process = start(command, log)
    kill_when(process, log, lambda: len(journal_ids(run_dir)) >= 2, "two teacher answers were journaled")
    facts["journaled_at_first_kill"] = len(set(journal_ids(run_dir)))

    process = start(command, log)
    kill_when(process, log, lambda: any(step >= 6 for step in checkpoint_steps(run_dir)),
              "a Std-CoT checkpoint of step 6 or later")
    facts["checkpoints_at_second_kill"] = checkpoint_steps(run_dir)

    final = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    return root / "bbh" / "reference", run_dir, facts


def test_traces_readable_during_compile(runs):
    _, _, facts = runs
    live = [read for read in facts["live_reads"] if read[0] == "running"]
    assert len(live) >= 3
    stage_counts = [stages for _, stages, _ in live]
    assert stage_counts == sorted(stage_counts)
    assert stage_counts[-1] > stage_counts[0]
    assert max(calls for _, _, calls in live) > 0


def test_first_kill_was_mid_teacher(runs):
    _, _, facts = runs
    assert 2 <= facts["journaled_at_first_kill"] < TRAIN_QUESTIONS


def test_second_kill_was_mid_finetuning(runs):
    _, _, facts = runs
    assert max(facts["checkpoints_at_second_kill"]) >= 6
    # 12 epochs of 2 or 3 steps each: the kill came before the last step.
    assert max(facts["checkpoints_at_second_kill"]) < 24


def test_teacher_items_not_recomputed(runs):
    _, run_dir, facts = runs
    ids = journal_ids(run_dir)
    assert len(ids) == len(set(ids)) == TRAIN_QUESTIONS
    attempts = rows(run_dir, "select stage_id, status from stages where name = 'teacher_rationales' order by started_at")
    assert [status for _, status in attempts] == ["interrupted", "succeeded", "reused"]
    second_attempt = attempts[1][0]
    calls = rows(run_dir, f"select count(*) from lm_calls where role = 'teacher' and stage_id = '{second_attempt}'")
    assert calls[0][0] == TRAIN_QUESTIONS - facts["journaled_at_first_kill"]


def test_finetuning_resumed_from_checkpoint(runs):
    _, run_dir, facts = runs
    jobs = rows(run_dir, "select status, resumed_from_step from finetune_jobs where stage = 'sft_general'")
    assert len(jobs) == 1
    status, resumed_from = jobs[0]
    assert status == "succeeded"
    assert resumed_from == max(facts["checkpoints_at_second_kill"])
    stages = rows(run_dir, "select status from stages where name = 'sft_general' order by started_at")
    assert [status for (status,) in stages] == ["interrupted", "succeeded"]


def test_run_row_counts_attempts(runs):
    _, run_dir, _ = runs
    assert rows(run_dir, "select status, attempts from runs") == [("succeeded", 3)]


def test_results_equal_uninterrupted_run(runs):
    reference, run_dir, _ = runs
    for name in ("teacher_rationales.jsonl", "results.json"):
        assert (run_dir / name).read_text() == (reference / name).read_text(), name
    strip_ids = lambda path: [{k: v for k, v in json.loads(line).items() if k != "failure_id"}
                              for line in path.read_text().splitlines()]
    assert strip_ids(run_dir / "error_cases.jsonl") == strip_ids(reference / "error_cases.jsonl")
    entries = "select task, learning_summary, supplementary_knowledge from kb_entries order by 1, 2, 3"
    assert rows(run_dir, entries) == rows(reference, entries)
    for adapter in ("std_cot", "nesycd"):
        expected = load_file(str(reference / "adapters" / adapter / "adapter" / "adapter_model.safetensors"))
        actual = load_file(str(run_dir / "adapters" / adapter / "adapter" / "adapter_model.safetensors"))
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.allclose(expected[name], actual[name], atol=1e-6), (adapter, name)
