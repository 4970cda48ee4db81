"""Tests of the DuckDB trace store and the DSPy trace callback, on real DuckDB files."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import duckdb
import pytest

for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
):
    os.environ.setdefault(_name, _value)

from nesycd.errors import TraceStoreError  # noqa: E402
from nesycd.tracing import (  # noqa: E402
    SCHEMA_VERSION,
    TraceStore,
    format_table,
    pop_usage,
    query_file,
    redact_secrets,
    set_usage,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def trace_path(tmp_path):
    return tmp_path / "trace.duckdb"


@pytest.fixture
def store(trace_path):
    trace_store = TraceStore(trace_path, flush_interval_s=0.2)
    trace_store.start_run("run-1", program="programs/qa.py", command="nesycd compile", config={"seed": 7})
    yield trace_store
    trace_store.close()


@pytest.fixture
def network_attempts(monkeypatch):
    """Make every outbound connection or DNS lookup fail, and list the attempts."""
    attempts = []

    def reject(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", reject)
    monkeypatch.setattr(socket.socket, "connect_ex", reject)
    monkeypatch.setattr(socket, "create_connection", reject)
    monkeypatch.setattr(socket, "getaddrinfo", reject)
    return attempts


def _subprocess_env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", LITELLM_LOCAL_MODEL_COST_MAP="True")
    return env


def _question_of(text):
    """Return the text after DSPy's question field marker, or the whole text when there is none."""
    marker = "[[ ## question ## ]]\n"
    if marker not in text:
        return text.strip()
    return text.split(marker, 1)[1].split("\n\n", 1)[0].strip()


class EchoEngine:
    """A DSPy engine that returns "echo <question>" in ChatAdapter format and reports token counts."""

    def __init__(self, fail=False):
        self.fail = fail
        self.calls = 0

    def complete(self, request):
        from dspy.lm15 import Message, Response, TextPart, Usage

        self.calls += 1
        time.sleep(0.01)
        if self.fail:
            raise RuntimeError("echo engine is down")
        question = _question_of(request.messages[-1].text or "")
        prompt_tokens = sum(len((message.text or "").split()) for message in request.messages)
        set_usage(prompt_tokens=prompt_tokens, completion_tokens=2)
        text = f"[[ ## answer ## ]]\necho {question}\n\n[[ ## completed ## ]]"
        return Response(
            id=None,
            model="echo",
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=prompt_tokens, output_tokens=2),
        )

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass


def _echo_lm(role="student", fail=False):
    import dspy

    lm = dspy.LM("nesycd-fake/echo", engine=EchoEngine(fail=fail), cache=False, num_retries=0, temperature=0.3)
    lm.nesycd_role = role
    return lm


# ---------------------------------------------------------------------- writing and batching


def test_threads_rows_all_land(trace_path):
    threads_n, rows_per_thread = 4, 2500
    with TraceStore(trace_path, batch_rows=500, flush_interval_s=0.5) as store:
        store.start_run("run-threads", program="p", command="c", config={})

        def produce(thread_index):
            for row_index in range(rows_per_thread):
                store.record(
                    "predictions",
                    {"example_id": f"t{thread_index}-{row_index}", "task": f"t{thread_index}", "correct": True},
                )

        with store.stage("threads"):
            workers = [threading.Thread(target=produce, args=(i,)) for i in range(threads_n)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        store.flush()
        _, total = store.query("SELECT count(*), count(DISTINCT example_id) FROM predictions")
        _, per_task = store.query("SELECT task, count(*) FROM predictions GROUP BY task ORDER BY task")
        _, stages = store.query("SELECT DISTINCT stage, run_id FROM predictions")
        stats = store.write_stats()

    expected = threads_n * rows_per_thread
    assert total[0][0] == expected
    assert total[0][1] == expected
    assert per_task == [(f"t{i}", rows_per_thread) for i in range(threads_n)]
    assert stages == [("threads", "run-threads")]
    assert stats["rows_dropped"] == 0
    # Batched: far fewer appends than rows.
    assert stats["appends"] < expected / 100


def test_flush_timer_writes_without_flush(store, trace_path):
    store.record("failures", {"example_id": "e1", "kind": "wrong_answer"})
    deadline = time.monotonic() + 5.0
    written = 0
    while time.monotonic() < deadline and written == 0:
        time.sleep(0.1)
        written = store.write_stats()["rows_written"]
    assert written >= 1


def test_json_columns_store_json(store):
    store.record(
        "retrievals",
        {"query": "q", "hits": [{"entry_id": "a", "score": 0.5, "rank": 1}], "inserted": ["x"]},
    )
    _, rows = store.query("SELECT typeof(hits), hits->>'$[0].entry_id', json_array_length(inserted) FROM retrievals")
    assert rows == [("JSON", "a", 1)]


def test_lone_surrogate_text_lands(store):
    store.record("failures", {"kind": "decode", "detail": "bad \udcff byte"})
    _, rows = store.query("SELECT detail FROM failures")
    assert rows == [("bad ? byte",)]
    assert store.write_stats()["rows_dropped"] == 0


def test_timestamps_are_filled(store):
    store.record("evaluations", {"model_label": "student", "task": "qa", "n": 4, "correct": 3, "accuracy": 0.75})
    _, rows = store.query("SELECT created_at IS NOT NULL, run_id, accuracy FROM evaluations")
    assert rows == [(True, "run-1", 0.75)]


# ---------------------------------------------------------------------- stages and runs


def test_stage_succeeded(store):
    with store.stage("teacher_cot", fingerprint="abc123") as stage:
        assert store.current_stage == "teacher_cot"
        store.record("failures", {"example_id": "e1", "kind": "wrong_answer"})
        stage.counts["rows"] = 3
    assert store.current_stage is None

    _, rows = store.query("SELECT status, fingerprint, seconds >= 0, counts->>'rows', error FROM stages")
    assert rows == [("succeeded", "abc123", True, "3", None)]
    _, failure_stage = store.query("SELECT stage FROM failures")
    assert failure_stage == [("teacher_cot",)]


def test_stage_failed_propagates(store):
    with pytest.raises(ValueError, match="bad input 42"):
        with store.stage("finetune"):
            raise ValueError("bad input 42")

    _, rows = store.query("SELECT name, status, finished_at IS NOT NULL, error FROM stages")
    assert rows == [("finetune", "failed", True, "ValueError: bad input 42")]


def test_nested_stage_restores_outer(store):
    with store.stage("outer"):
        with store.stage("inner"):
            assert store.current_stage == "inner"
        assert store.current_stage == "outer"


def test_finish_run_sets_status(store):
    store.finish_run("succeeded")
    _, rows = store.query("SELECT run_id, status, finished_at >= started_at, nesycd_version IS NOT NULL FROM runs")
    assert rows == [("run-1", "succeeded", True, True)]


def test_second_run_rejected(store):
    with pytest.raises(TraceStoreError, match="run-2"):
        store.start_run("run-2", program="p", command="c", config={})


# ---------------------------------------------------------------------- validation errors


def test_unknown_table_named(store):
    with pytest.raises(TraceStoreError, match="lm_callz"):
        store.record("lm_callz", {"model": "m"})


def test_unknown_column_named(store):
    with pytest.raises(TraceStoreError, match="tokens_in") as caught:
        store.record("lm_calls", {"model": "m", "tokens_in": 3})
    assert "lm_calls" in str(caught.value)


def test_wrong_type_named(store):
    with pytest.raises(TraceStoreError, match="prompt_tokens") as caught:
        store.record("lm_calls", {"prompt_tokens": "many"})
    assert "'many'" in str(caught.value)


def test_record_after_close_fails(trace_path):
    store = TraceStore(trace_path)
    store.close()
    store.close()
    with pytest.raises(TraceStoreError, match="closed"):
        store.record("failures", {"kind": "x"})


# ---------------------------------------------------------------------- schema version


def test_newer_schema_raises(trace_path):
    TraceStore(trace_path).close()
    connection = duckdb.connect(str(trace_path))
    connection.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION + 1])
    connection.close()

    with pytest.raises(TraceStoreError) as caught:
        TraceStore(trace_path)
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"schema version {SCHEMA_VERSION}" in message


def test_reopen_same_version_appends(trace_path):
    with TraceStore(trace_path) as first:
        first.record("failures", {"kind": "a"})
    with TraceStore(trace_path) as second:
        second.record("failures", {"kind": "b"})
    _, rows = query_file(trace_path, "SELECT count(*), max(version) FROM failures, schema_version")
    assert rows == [(2, SCHEMA_VERSION)]


# ---------------------------------------------------------------------- readers in other processes


def test_other_process_reads_open_store(store, trace_path):
    for index in range(25):
        store.record("predictions", {"example_id": str(index), "correct": index % 2 == 0})
    store.flush()

    script = textwrap.dedent(
        f"""
        import json
        from nesycd.tracing import query_file
        columns, rows = query_file({str(trace_path)!r}, "SELECT count(*), sum(correct::INT) FROM predictions")
        print(json.dumps(rows[0]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_subprocess_env()
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [25, 13]

    store.record("predictions", {"example_id": "after-read"})
    _, rows = store.query("SELECT count(*) FROM predictions")
    assert rows == [(26,)]


def test_writer_waits_for_reader(store, trace_path):
    store.flush()
    hold_s = 1.0
    script = textwrap.dedent(
        f"""
        import sys, time
        import duckdb
        connection = duckdb.connect({str(trace_path)!r}, read_only=True)
        print("locked", flush=True)
        time.sleep({hold_s})
        connection.close()
        """
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_subprocess_env(),
    )
    try:
        assert reader.stdout.readline().strip() == "locked"
        started = time.monotonic()
        store.record("failures", {"kind": "during_lock"})
        store.flush()
        waited = time.monotonic() - started
    finally:
        reader.wait(timeout=30)
    _, rows = store.query("SELECT kind FROM failures")
    assert rows == [("during_lock",)]
    # The flush could only finish once the reader released its lock.
    assert waited >= hold_s / 2


def test_unclosed_store_flushes_at_exit(trace_path):
    script = textwrap.dedent(
        f"""
        from nesycd.tracing import TraceStore
        store = TraceStore({str(trace_path)!r}, flush_interval_s=60)
        for index in range(7):
            store.record("failures", {{"example_id": str(index), "kind": "left_open"}})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_subprocess_env()
    )
    assert result.returncode == 0, result.stderr
    _, rows = query_file(trace_path, "SELECT count(*) FROM failures WHERE kind = 'left_open'")
    assert rows == [(7,)]


def test_query_file_missing_path(tmp_path):
    missing = tmp_path / "nowhere.duckdb"
    with pytest.raises(TraceStoreError, match="nowhere.duckdb"):
        query_file(missing, "SELECT 1")


# ---------------------------------------------------------------------- secrets


def test_redact_nested_keys():
    cleaned = redact_secrets(
        {"teacher": [{"API_KEY": "k1", "max_tokens": 5}], "headers": {"Authorization": "Bearer k2"},
         "hf_token": "k3", "tokenizer": "gpt2", "prompt_tokens": 9}
    )
    assert cleaned["teacher"][0]["API_KEY"] == "[REDACTED]"
    assert cleaned["teacher"][0]["max_tokens"] == 5
    assert cleaned["headers"]["Authorization"] == "[REDACTED]"
    assert cleaned["hf_token"] == "[REDACTED]"
    assert cleaned["tokenizer"] == "gpt2"
    assert cleaned["prompt_tokens"] == 9


def test_api_keys_never_written(tmp_path, network_attempts):
    import dspy

    from nesycd.tracing import TraceCallback

    path = tmp_path / "secret.duckdb"
    config_key = "sk-config-" + "7" * 24
    bearer_key = "sk-bearer-" + "8" * 24
    lm_key = "sk-lmkwargs-" + "9" * 24
    marker = "visible-marker-" + "6" * 16

    with TraceStore(path) as store:
        store.start_run(
            "run-secret",
            program="p",
            command="c",
            config={"teacher": {"api_key": config_key, "note": marker}, "headers": {"Authorization": bearer_key}},
        )
        lm = _echo_lm(role="teacher")
        # A custom engine rejects api_key at construction, so plant it in the LM's kwargs afterwards.
        lm.kwargs["api_key"] = lm_key
        with dspy.context(callbacks=[TraceCallback(store)]):
            lm("what is two plus two?")
        _, params = store.query("SELECT params FROM lm_calls")

    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("secret.duckdb"))
    # The control string proves that the text columns are stored as plain bytes a grep can find.
    marker_found = marker.encode() in data
    config_key_found = config_key.encode() in data
    bearer_key_found = bearer_key.encode() in data
    lm_key_found = lm_key.encode() in data
    assert marker_found
    assert not config_key_found
    assert not bearer_key_found
    assert not lm_key_found
    assert json.loads(params[0][0]) == {"temperature": 0.3, "max_tokens": None}
    assert network_attempts == []


# ---------------------------------------------------------------------- DSPy callback


def test_callback_records_predict(store, network_attempts):
    import dspy

    from nesycd.tracing import TraceCallback

    lm = _echo_lm(role="student")
    with store.stage("evaluate"):
        with dspy.context(lm=lm, callbacks=[TraceCallback(store)]):
            prediction = dspy.Predict("question -> answer")(question="capital of France?")

    columns, rows = store.query(
        "SELECT role, model, stage, messages, output, latency_s, prompt_tokens, completion_tokens, error "
        "FROM lm_calls"
    )
    assert prediction.answer == "echo capital of France?"
    assert len(rows) == 1
    row = dict(zip(columns, rows[0]))
    assert row["role"] == "student"
    assert row["model"] == "nesycd-fake/echo"
    assert row["stage"] == "evaluate"
    assert "capital of France?" in json.loads(row["messages"])[-1]["content"]
    assert "echo capital of France?" in row["output"]
    assert row["latency_s"] >= 0.01
    assert row["prompt_tokens"] > 0
    assert row["completion_tokens"] == 2
    assert row["error"] is None
    assert network_attempts == []


def test_callback_evaluate_threads(store):
    import dspy

    from nesycd.tracing import TraceCallback

    lm = _echo_lm(role="student")
    devset = [dspy.Example(question=f"q{i}", answer=f"echo q{i}").with_inputs("question") for i in range(4)]
    evaluate = dspy.Evaluate(devset=devset, num_threads=2, display_progress=False)

    def exact(example, prediction, trace=None):
        return example.answer == prediction.answer

    with store.stage("eval_threads"):
        with dspy.context(lm=lm, callbacks=[TraceCallback(store)]):
            evaluate(dspy.Predict("question -> answer"), metric=exact)

    _, rows = store.query("SELECT stage, count(*) FROM lm_calls GROUP BY stage")
    assert rows == [("eval_threads", 4)]


def test_callback_records_lm_error(store):
    import dspy

    from nesycd.tracing import TraceCallback

    lm = _echo_lm(role="teacher", fail=True)
    with dspy.context(callbacks=[TraceCallback(store)]):
        with pytest.raises(Exception):
            lm("hello")

    _, rows = store.query("SELECT role, output, error FROM lm_calls")
    assert len(rows) == 1
    assert rows[0][0] == "teacher"
    assert rows[0][1] is None
    assert "echo engine is down" in rows[0][2]


def test_callback_records_retrieval(store):
    import dspy

    from nesycd.tracing import TraceCallback

    class FakeRetriever(dspy.Module):
        nesycd_retriever = True

        def forward(self, query, task, k=2):
            return dspy.Prediction(
                ids=["e1", "e2"], scores=[0.9, 0.4], passages=["p1", "p2"], k=k, inserted_ids=["e9"]
            )

    with store.stage("retrieve"):
        with dspy.context(callbacks=[TraceCallback(store)]):
            FakeRetriever()("why is the sky blue?", task="science", k=2)

    columns, rows = store.query("SELECT stage, query, task, k, hits, inserted, latency_s FROM retrievals")
    assert len(rows) == 1
    row = dict(zip(columns, rows[0]))
    assert row["stage"] == "retrieve"
    assert row["query"] == "why is the sky blue?"
    assert row["task"] == "science"
    assert row["k"] == 2
    assert json.loads(row["hits"]) == [
        {"entry_id": "e1", "score": 0.9, "rank": 1},
        {"entry_id": "e2", "score": 0.4, "rank": 2},
    ]
    assert json.loads(row["inserted"]) == ["e9"]
    assert row["latency_s"] >= 0


def test_callback_skips_plain_modules(store):
    import dspy

    from nesycd.tracing import TraceCallback

    class Plain(dspy.Module):
        def forward(self, query):
            return dspy.Prediction(ids=["x"])

    with dspy.context(callbacks=[TraceCallback(store)]):
        Plain()(query="q")
    _, rows = store.query("SELECT count(*) FROM retrievals")
    assert rows == [(0,)]


# ---------------------------------------------------------------------- usage hand-over, table format, imports


def test_usage_is_thread_local():
    set_usage(prompt_tokens=5, completion_tokens=1, cache_hit=True)
    seen_elsewhere = []
    other = threading.Thread(target=lambda: seen_elsewhere.append(pop_usage()))
    other.start()
    other.join()
    assert seen_elsewhere == [None]
    assert pop_usage() == {"prompt_tokens": 5, "completion_tokens": 1, "cache_hit": True}
    assert pop_usage() is None


def test_format_table_aligns():
    text = format_table(["name", "n"], [("alpha", 3), ("b", 12345), ("line\nbreak " + "x" * 50, None)], max_width=12)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].endswith("    3")
    assert lines[3].endswith("12345")
    # 12 characters at most: 9 of the cell, with the line break turned into a space, then "...".
    assert lines[4] == "line brea..."
    assert len(lines) == 5
    assert len({len(line) for line in lines[:4]}) == 1


def test_import_stays_light():
    script = (
        "import sys, nesycd.tracing\n"
        "print(','.join(m for m in ('dspy', 'torch', 'pandas') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_subprocess_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
