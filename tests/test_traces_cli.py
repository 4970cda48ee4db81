"""`nesycd traces` subcommands, the documented views and the schema migration, on real DuckDB files."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from nesycd.cli.main import app
from nesycd.errors import TraceStoreError
from nesycd.tracing import SCHEMA_VERSION, TraceStore, query_file

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder whose traces hold two stages, three LM calls, predictions, failures and an evaluation."""
    store = TraceStore(tmp_path / "traces.duckdb", flush_interval_s=0.1)
    store.start_run("r1", program="programs/bbh.py", command="nesycd compile programs/bbh.py", config={})
    with store.stage("teacher_rationales", "fp1"):
        store.record("lm_calls", {"call_id": "aaaa1111", "role": "teacher", "model": "m", "latency_s": 2.0,
                                  "prompt_tokens": 100, "completion_tokens": 20,
                                  "messages": [{"role": "user", "content": "What is 2 + 2?"}], "output": "4"})
        store.record("lm_calls", {"call_id": "aaaa2222", "role": "teacher", "model": "m", "latency_s": 5.0,
                                  "prompt_tokens": 50, "completion_tokens": 10, "error": "Timeout: read timed out"})
        store.record("predictions", {"model_label": "teacher", "example_id": "e1", "task": "t1", "correct": True})
        store.record("predictions", {"model_label": "teacher", "example_id": "e2", "task": "t1", "correct": False})
        store.record("failures", {"kind": "teacher_error", "task": "t1", "example_id": "e2", "detail": "Timeout"})
    with store.stage("collect_demonstrations", "fp2"):
        store.record("lm_calls", {"call_id": "bbbb3333", "role": "student", "model": "s", "latency_s": 0.5})
        store.record("failures", {"kind": "wrong", "task": "t1", "example_id": "e1", "gold": "4", "output": "5"})
        store.record("failures", {"kind": "wrong", "task": "t2", "example_id": "e3", "gold": "1", "output": "2"})
    store.record("evaluations", {"model_label": "nesycd", "task": "ALL", "n": 4, "correct": 3, "accuracy": 0.75})
    store.finish_run("succeeded")
    store.close()
    return tmp_path


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_summary_text(run_dir):
    result = invoke("traces", str(run_dir))
    assert result.exit_code == 0, result.output
    for heading in ("Run", "Stages", "LM calls", "Failures", "Test accuracy"):
        assert f"\n{heading}\n" in f"\n{result.output}"
    assert "teacher_rationales" in result.output
    assert "0.75" in result.output


def test_summary_json(run_dir):
    result = invoke("traces", "summary", str(run_dir), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["run"][0]["status"] == "succeeded"
    assert [stage["name"] for stage in summary["stages"]] == ["teacher_rationales", "collect_demonstrations"]
    teacher = [row for row in summary["lm_calls"] if row["role"] == "teacher"][0]
    assert (teacher["calls"], teacher["errors"], teacher["prompt_tokens"]) == (2, 1, 150)


def test_positional_sql_and_sql_command_agree(run_dir):
    query = "select role, count(*) as n from lm_calls group by role order by role"
    positional = invoke("traces", str(run_dir), query, "--json")
    command = invoke("traces", "sql", str(run_dir), query, "--json")
    assert positional.exit_code == command.exit_code == 0
    assert json.loads(positional.output) == json.loads(command.output) == [
        {"role": "student", "n": 1}, {"role": "teacher", "n": 2}
    ]


def test_failures_filter(run_dir):
    everything = json.loads(invoke("traces", "failures", str(run_dir), "--json").output)
    assert len(everything) == 3
    wrong = json.loads(invoke("traces", "failures", str(run_dir), "--kind", "wrong", "--json").output)
    assert {row["example_id"] for row in wrong} == {"e1", "e3"}
    staged = json.loads(invoke("traces", "failures", str(run_dir), "--stage", "teacher_rationales", "--json").output)
    assert [row["kind"] for row in staged] == ["teacher_error"]
    limited = json.loads(invoke("traces", "failures", str(run_dir), "--limit", "1", "--json").output)
    assert len(limited) == 1


def test_show_by_prefix(run_dir):
    result = invoke("traces", "show", str(run_dir), "aaaa1")
    assert result.exit_code == 0, result.output
    assert "call_id: aaaa1111" in result.output
    assert "What is 2 + 2?" in result.output
    assert result.output.rstrip().endswith("4")
    as_json = json.loads(invoke("traces", "show", str(run_dir), "aaaa1111", "--json").output)
    assert as_json["messages"] == [{"role": "user", "content": "What is 2 + 2?"}]


def test_show_ambiguous_or_missing(run_dir):
    ambiguous = invoke("traces", "show", str(run_dir), "aaaa")
    assert isinstance(ambiguous.exception, TraceStoreError)
    assert "several" in str(ambiguous.exception)
    missing = invoke("traces", "show", str(run_dir), "zzzz")
    assert isinstance(missing.exception, TraceStoreError)
    assert "zzzz" in str(missing.exception)


def test_export_parquet(run_dir, tmp_path):
    out = tmp_path / "export"
    result = invoke("traces", "export", str(run_dir), "--parquet", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "lm_calls.parquet").is_file()
    connection = duckdb.connect()
    for table, expected in (("lm_calls", 3), ("failures", 3), ("stages", 2)):
        count = connection.execute(f"select count(*) from read_parquet('{out / (table + '.parquet')}')").fetchall()
        assert count == [(expected,)], table
    connection.close()


def test_export_needs_one_format(run_dir, tmp_path):
    result = invoke("traces", "export", str(run_dir))
    assert result.exit_code != 0
    assert "--parquet" in result.output


def test_views_answer_common_questions(run_dir):
    path = run_dir / "traces.duckdb"
    _, accuracy = query_file(path, "select stage, model_label, task, n, correct, accuracy from accuracy_by_stage")
    assert accuracy == [("teacher_rationales", "teacher", "t1", 2, 1, 0.5)]
    _, tokens = query_file(path, "select stage, calls, errors, prompt_tokens, completion_tokens, seconds from teacher_tokens_by_stage")
    assert tokens == [("teacher_rationales", 2, 1, 150, 30, 7.0)]
    _, reasons = query_file(path, "select stage, kind, task, failures from failure_reasons")
    assert sorted(reasons) == sorted([
        ("collect_demonstrations", "wrong", "t1", 1), ("collect_demonstrations", "wrong", "t2", 1),
        ("teacher_rationales", "teacher_error", "t1", 1),
    ])
    _, slowest = query_file(path, "select call_id from slowest_lm_calls")
    assert [row[0] for row in slowest] == ["aaaa2222", "aaaa1111", "bbbb3333"]


def test_rows_carry_stage_id(run_dir):
    _, rows = query_file(
        run_dir / "traces.duckdb",
        "select count(*) from lm_calls c join stages s on c.stage_id = s.stage_id and c.stage = s.name",
    )
    assert rows == [(3,)]


def test_version_1_file_migrates(tmp_path):
    path = tmp_path / "old.duckdb"
    connection = duckdb.connect(str(path))
    connection.execute((FIXTURES / "trace_schema_v1.sql").read_text())
    connection.execute("insert into runs (run_id, status) values ('old', 'succeeded')")
    connection.execute("insert into lm_calls (call_id, role, latency_s) values ('c1', 'teacher', 1.5)")
    connection.close()

    store = TraceStore(path)
    store.record("lm_calls", {"call_id": "c2", "role": "student", "stage_id": "s1", "span_id": "p1"})
    store.close()

    _, version = query_file(path, "select max(version) from schema_version")
    assert version == [(SCHEMA_VERSION,)]
    _, calls = query_file(path, "select call_id, role, stage_id from lm_calls order by call_id")
    assert calls == [("c1", "teacher", None), ("c2", "student", "s1")]
    _, runs = query_file(path, "select run_id, status, attempts from runs")
    assert runs == [("old", "succeeded", 1)]
    _, views = query_file(path, "select count(*) from information_schema.tables where table_name = 'slowest_lm_calls'")
    assert views == [(1,)]


def test_resumed_run_counts_attempts(tmp_path):
    path = tmp_path / "traces.duckdb"
    first = TraceStore(path)
    assert first.start_run("r", program="p", command="c1", config={}) == 1
    with pytest.raises(KeyboardInterrupt):
        with first.stage("teacher_rationales", "fp"):
            first.flush()
            raise KeyboardInterrupt
    first.close()
    # A killed process leaves its stage 'running'; simulate that on the file.
    connection = duckdb.connect(str(path))
    connection.execute("update stages set status = 'running'")
    connection.close()

    second = TraceStore(path)
    assert second.start_run("r", program="p", command="c2", config={}) == 2
    second.close()
    _, runs = query_file(path, "select status, command, attempts from runs")
    assert runs == [("running", "c2", 2)]
    _, stages = query_file(path, "select status from stages")
    assert stages == [("interrupted",)]


def test_find_stage_matches_fingerprint(tmp_path):
    store = TraceStore(tmp_path / "traces.duckdb")
    store.start_run("r", program="p", command="c", config={})
    with store.stage("sft_general", "fp-a") as stage:
        stage.counts["rows"] = 3
    assert store.find_stage("sft_general", "fp-a")["counts"] == {"rows": 3}
    assert store.find_stage("sft_general", "fp-b") is None
    store.record_reused_stage("sft_general", "fp-a", {"rows": 3})
    store.close()
    _, statuses = query_file(tmp_path / "traces.duckdb", "select status from stages order by started_at")
    assert statuses == [("succeeded",), ("reused",)]
