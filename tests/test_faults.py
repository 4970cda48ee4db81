"""Faults during a compile: a flaky teacher server, and a disk that fills up."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nesycd.benchmarks import bbh
from nesycd.compile import CompileOptions, run_compile
from nesycd.serve import ServerProcess
from nesycd.tracing import query_file

REPO = Path(__file__).resolve().parents[1]


class FlakyProxy:
    """A loopback proxy in front of an OpenAI-compatible server that fails chosen requests.

    Teacher rationale requests (the chain-of-thought prompt) get, per distinct body: 429, then 503,
    then no reply within the client timeout, then the real reply. A request that contains
    `always_fail` always gets 500. Every other request is forwarded at once.
    """

    def __init__(self, upstream: str, always_fail: str, slow_s: float):
        self.upstream = upstream
        self.always_fail = always_fail
        self.slow_s = slow_s
        self.attempts: dict[str, list[int]] = {}
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, handler, body: bytes) -> None:
        text = json.dumps(json.loads(body)["messages"])
        key = hashlib.sha256(text.encode()).hexdigest()
        faulty = "think step by step" in text
        with self.lock:
            statuses = self.attempts.setdefault(key, [])
            attempt = len(statuses) + 1
            if self.always_fail in text:
                status = 500
            elif faulty and attempt == 1:
                status = 429
            elif faulty and attempt == 2:
                status = 503
            else:
                status = 200
            statuses.append(status)
            self.times.setdefault(key, []).append(time.monotonic())
        if status != 200:
            self.reply(handler, status, json.dumps({"error": {"message": f"injected {status}", "type": "server_error"}}).encode())
            return
        if faulty and attempt == 3:
            time.sleep(self.slow_s)  # the client times out meanwhile and retries
            self.reply(handler, 504, b'{"error": {"message": "too late", "type": "server_error"}}')
            return
        request = urllib.request.Request(self.upstream + handler.path.removeprefix("/v1"), data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            self.reply(handler, response.status, response.read())

    @staticmethod
    def reply(handler, status: int, payload: bytes) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            if status == 429:
                handler.send_header("Retry-After", "0")
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow reply

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def teacher_server(tiny_teacher, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("logs") / "teacher-server.log"
    name = f"tiny-teacher-{uuid.uuid4().hex[:8]}"  # DSPy's cache is keyed on the model name
    server = ServerProcess(tiny_teacher, args=["--model-name", name, "--max-requests", "500", "--max-seconds", "1200"],
                           log_file=log_file)
    server.model_name = name
    try:
        yield server
    finally:
        server.stop()


PLANTED_KEY = "sk-planted-fault-test-key-5555"


def test_teacher_faults_retried_then_recorded(teacher_server, tmp_path, boolean_data_dir, tiny_student, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED_KEY)
    train, _ = bbh.load_bbh(boolean_data_dir, ["boolean_expressions"], train_per_task=8, test_per_task=2)
    questions = [example.question for example in train]
    # A question that is not part of any other question, so that only its own requests fail.
    doomed = next(example for example in train if sum(example.question in other for other in questions) == 1)
    # The timeout leaves room for a real reply on a busy machine; the slow reply outlasts it.
    proxy = FlakyProxy(teacher_server.url + "/v1", always_fail=doomed.question, slow_s=8.0)
    try:
        summary = run_compile(CompileOptions(
            program_file=REPO / "programs" / "bbh.py", data_dir=boolean_data_dir, student=str(tiny_student),
            teacher=f"openai/{teacher_server.model_name}", teacher_api_base=proxy.url, teacher_timeout_s=5.0,
            tasks=["boolean_expressions"], train_per_task=8, test_per_task=2, runs_dir=tmp_path, run_id="flaky",
            epochs=1, batch_size=4, threads=8, max_tokens=16, teacher_max_tokens=40, baselines=False,
            show_progress=False,
        ))
    finally:
        proxy.close()

    traces = summary.run_dir / "traces.duckdb"
    _, stages = query_file(traces, "select name, status from stages")
    assert {status for _, status in stages} == {"succeeded"}
    assert (summary.compiled_dir / "manifest.json").is_file()

    _, failures = query_file(
        traces, "select example_id, detail from failures where kind = 'teacher_error' and stage = 'teacher_rationales'"
    )
    assert [row[0] for row in failures] == [doomed.id]
    assert "injected 500" in failures[0][1]

    doomed_keys = [key for key, statuses in proxy.attempts.items() if set(statuses) == {500}]
    assert doomed_keys
    for key in doomed_keys:
        # The first try and 3 retries, each wait longer than the one before (exponential backoff).
        assert proxy.attempts[key] == [500, 500, 500, 500]
        times = proxy.times[key]
        waits = [later - earlier for earlier, later in zip(times, times[1:])]
        assert waits[0] >= 0.5
        assert waits[1] > waits[0]
        assert waits[2] > waits[1]
    rationale_attempts = [statuses for statuses in proxy.attempts.values() if statuses[:2] == [429, 503]]
    assert len(rationale_attempts) == len(set(questions)) - 1
    # 429, 503 and a timeout were retried until the real reply came.
    assert all(len(statuses) >= 4 and statuses[-1] == 200 for statuses in rationale_attempts)

    _, calls = query_file(traces, "select count(*), count(error) from lm_calls where stage = 'teacher_rationales'")
    assert calls == [(len(train), 1)]
    for path in summary.run_dir.rglob("*"):
        if path.is_file():
            assert PLANTED_KEY.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------- full disk

# Size of the tmpfs that contains the run folder: the teacher stage fits, the Std-CoT checkpoints do not.
SMALL_DISK = "4m"


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def compile_command(data_dir: Path, student: Path, teacher: Path, runs: Path) -> list[str]:
    return [
        sys.executable, "-m", "nesycd.cli.main", "compile", str(REPO / "programs" / "bbh.py"),
        "--data-dir", str(data_dir), "--student", str(student), "--teacher", str(teacher),
        "--tasks", "boolean_expressions", "--train-per-task", "12", "--test-per-task", "4",
        "--runs-dir", str(runs), "--run-id", "disk", "--epochs", "1", "--batch-size", "4",
        "--threads", "4", "--max-tokens", "16", "--teacher-max-tokens", "40", "--no-baselines",
    ]


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs as a full disk")
def test_full_disk_is_one_clear_error(tmp_path, boolean_data_dir, tiny_student, tiny_teacher):
    small, kept, output = tmp_path / "small", tmp_path / "kept", tmp_path / "output.txt"
    small.mkdir()
    kept.mkdir()
    command = shlex.join(compile_command(boolean_data_dir, tiny_student, tiny_teacher, small))
    # The run folder lives on a tmpfs in a private mount namespace; it is copied out before the namespace ends.
    script = (
        f"mount -t tmpfs -o size={SMALL_DISK} tmpfs {small} && "
        f"{{ {command} > {output} 2>&1; echo $? > {tmp_path / 'rc'}; }}; cp -a {small}/. {kept}/"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=900,
                   env={**os.environ, "TQDM_DISABLE": "1"})

    text = output.read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", text[-3000:]
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text[-3000:]
    assert "disk is full" in error_lines[0]
    assert str(small / "bbh" / "disk") in error_lines[0]
    assert "run the same command again" in error_lines[0]
    assert "Traceback" not in text

    run_dir = kept / "bbh" / "disk"
    _, before = query_file(run_dir / "traces.duckdb", "select name, status from stages order by started_at")
    assert ("teacher_rationales", "succeeded") in before, text[-4000:]

    resumed = subprocess.run(compile_command(boolean_data_dir, tiny_student, tiny_teacher, kept),
                             capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _, after = query_file(run_dir / "traces.duckdb", "select name, status from stages order by started_at")
    assert ("teacher_rationales", "reused") in after
    assert (run_dir / "compiled" / "manifest.json").is_file()
