"""`nesycd serve` over real HTTP on loopback: both endpoints, validation errors, and a compile whose teacher is served."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import uuid
from pathlib import Path

import openai
import pytest

from nesycd.adapter import STOP_STRINGS, format_prompt
from nesycd.artifact import load
from nesycd.compile import CompileOptions, run_compile
from nesycd.lm import make_lm
from nesycd.serve import ServerProcess
from nesycd.tracing import query_file

REPO = Path(__file__).resolve().parents[1]
PLANTED_KEY = "sk-planted-serve-test-key-9876543210"
QUESTION = "not ( True ) and ( True ) is"
TASK_DESCRIPTION = "Evaluate the result of a random Boolean expression."
# nesycd-<program file stem>-<run id> of the compiled_dir fixture.
SERVED_NAME = "nesycd-bbh-serve"


def compile_options(runs_dir: Path, data_dir: Path, student: Path, teacher: str, run_id: str, **extra) -> CompileOptions:
    return CompileOptions(
        program_file=REPO / "programs" / "bbh.py",
        data_dir=data_dir,
        student=str(student),
        teacher=teacher,
        tasks=["boolean_expressions"],
        train_per_task=8,
        test_per_task=2,
        runs_dir=runs_dir,
        run_id=run_id,
        epochs=1,
        batch_size=4,
        threads=4,
        max_tokens=16,
        teacher_max_tokens=40,
        baselines=False,
        show_progress=False,
        **extra,
    )


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory, boolean_data_dir, tiny_student, tiny_teacher) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    return run_compile(compile_options(runs, boolean_data_dir, tiny_student, str(tiny_teacher), "serve")).compiled_dir


@pytest.fixture(scope="module")
def program_server(compiled_dir, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("logs") / "program-server.log"
    server = ServerProcess(compiled_dir, args=["--max-requests", "300", "--max-seconds", "1200"], log_file=log_file)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def teacher_server(tiny_teacher, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("logs") / "teacher-server.log"
    # DSPy's response cache is keyed on the model, not the URL, so a fresh model name per run makes
    # every teacher call reach the server.
    name = f"tiny-teacher-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(
        tiny_teacher, args=["--model-name", name, "--max-requests", "300", "--max-seconds", "1200"], log_file=log_file
    )
    server.model_name = name
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(program_server):
    return openai.OpenAI(base_url=program_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Send one request with http.client and return (status, headers, decoded JSON or text)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    except json.JSONDecodeError:
        return response.status, dict(response.getheaders()), data.decode(errors="replace")


def post_json(url: str, path: str, payload) -> tuple[int, dict, dict]:
    return request(url, "POST", path, json.dumps(payload).encode())


def in_process_completion(compiled_dir: Path, messages: list[dict], **options) -> str:
    lm = make_lm(
        str(compiled_dir / "base"), role="student", adapter=("serve-check", str(compiled_dir / "adapter")), max_tokens=16
    )
    output = lm(messages=messages, **options)[0]
    return output["text"] if isinstance(output, dict) else output


def test_health_ok(program_server):
    status, _, body = request(program_server.url, "GET", "/health")
    assert status == 200
    assert body["status"] == "ok"
    assert body["kind"] == "compiled"
    assert body["endpoints"] == {"answer": True, "chat": True}


def test_models_lists_served_name(client, compiled_dir):
    models = client.models.list()
    assert [model.id for model in models.data] == [SERVED_NAME]


def test_answer_matches_in_process(client, compiled_dir):
    served = client.post("/answer", cast_to=object, body={"question": QUESTION, "task": "boolean_expressions"})
    with load(compiled_dir) as compiled:
        expected = compiled(QUESTION, task="boolean_expressions")
    assert served["reasoning"] == expected.reasoning
    assert served["answer"] == expected.answer
    assert served["knowledge"] == list(expected.knowledge)
    assert len(served["knowledge"]) == 1
    assert served["latency_s"] > 0


def test_answer_task_optional(program_server):
    status, _, body = post_json(program_server.url, "/v1/answer", {"question": QUESTION})
    assert status == 200
    assert body["task"] == "boolean_expressions"


def test_chat_matches_in_process(client, compiled_dir):
    messages = [{"role": "user", "content": format_prompt(TASK_DESCRIPTION, QUESTION)}]
    expected = in_process_completion(compiled_dir, messages, max_tokens=12, stop=list(STOP_STRINGS))
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=12, stop=list(STOP_STRINGS)
    )
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_template_path_matches(client, compiled_dir):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}]
    expected = in_process_completion(compiled_dir, messages, max_tokens=8)
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=8)
    assert response.choices[0].message.content == expected


def test_chat_usage_counts_prompt(client, compiled_dir):
    from transformers import AutoTokenizer

    prompt = format_prompt(TASK_DESCRIPTION, QUESTION)
    tokenizer = AutoTokenizer.from_pretrained(compiled_dir / "base")
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=4
    )
    assert response.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_chat_honors_max_tokens(client, compiled_dir):
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=3
    )
    tokens = response.usage.completion_tokens
    assert tokens <= 3
    assert (response.choices[0].finish_reason == "length") == (tokens == 3)


def test_chat_honors_stop(client, compiled_dir):
    messages = [{"role": "user", "content": format_prompt(TASK_DESCRIPTION, QUESTION)}]
    full = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16)
    text = full.choices[0].message.content
    windows = [text[i : i + 3] for i in range(1, len(text) - 3) if text[i : i + 3].isascii() and text[i : i + 3].strip()]
    assert windows, f"no ASCII stop string candidate in {text!r}"
    stop = windows[len(windows) // 2]
    cut = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_stream_joins_to_text(client, compiled_dir):
    messages = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=6)
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=6, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "model_not_found"


VALIDATION_CASES = [
    # (method, path, raw body, expected status, expected error type)
    ("POST", "/v1/answer", b"{not json", 400, "invalid_request_error"),
    ("POST", "/v1/answer", b"[1, 2]", 400, "invalid_request_error"),
    ("POST", "/v1/answer", b'{"question": ""}', 422, "invalid_request_error"),
    ("POST", "/v1/answer", b'{"question": "   "}', 422, "invalid_request_error"),
    ("POST", "/v1/answer", b'{"question": 7}', 422, "invalid_request_error"),
    ("POST", "/v1/answer", b'{"question": "True is", "task": "navigate"}', 422, "invalid_request_error"),
    ("POST", "/v1/answer", b'{"question": "True is", "task": 3}', 422, "invalid_request_error"),
    ("POST", "/v1/answer", b'{"question": "True is", "model": "other"}', 404, "model_not_found"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 422, "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 422, "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": ""}]}', 422, "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 422, "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 422,
     "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 422,
     "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": [""]}', 422,
     "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 422,
     "invalid_request_error"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}', 422,
     "invalid_request_error"),
    ("GET", "/v1/answer", None, 405, "method_not_allowed"),
    ("DELETE", "/health", None, 405, "method_not_allowed"),
    ("GET", "/v1/nothing", None, 404, "not_found_error"),
    ("GET", "/v1/models/other", None, 404, "model_not_found"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "error_type"), VALIDATION_CASES)
def test_invalid_request_rejected(program_server, method, path, body, status, error_type):
    actual_status, _, payload = request(program_server.url, method, path, body)
    assert actual_status == status
    assert payload["error"]["type"] == error_type
    assert isinstance(payload["error"]["message"], str)
    assert payload["error"]["message"]


def test_wrong_method_lists_allowed(program_server):
    _, headers, _ = request(program_server.url, "GET", "/v1/chat/completions")
    assert headers["Allow"] == "POST"


def test_large_body_is_413(program_server):
    body = json.dumps({"question": "x" * (1 << 20)}).encode()
    status, _, payload = request(program_server.url, "POST", "/v1/answer", body)
    assert status == 413
    assert payload["error"]["type"] == "request_too_large"


def test_missing_length_is_411(program_server):
    host, port = program_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411")
    assert "Content-Length" in json.loads(body)["error"]["message"]


def test_unknown_method_is_json(program_server):
    status, _, payload = request(program_server.url, "BREW", "/health")
    assert status == 501
    assert payload["error"]["type"] == "not_implemented_error"


def test_server_logs_requests(program_server):
    request(program_server.url, "GET", "/health")
    log = program_server.log_tail(200_000)
    assert re.search(r"GET /health 200 [\d.]+ ms", log)
    assert re.search(r"POST /v1/chat/completions 200 [\d.]+ ms", log)
    assert "rejected with 422" in log


def test_plain_model_has_no_answer(teacher_server):
    status, _, body = post_json(teacher_server.url, "/v1/answer", {"question": QUESTION})
    assert status == 404
    assert "plain model" in body["error"]["message"]
    assert "/v1/chat/completions" in body["error"]["message"]


def test_plain_model_listed(teacher_server):
    _, _, body = request(teacher_server.url, "GET", "/v1/models")
    assert [model["id"] for model in body["data"]] == [teacher_server.model_name]


def test_compile_with_served_teacher(teacher_server, tmp_path, boolean_data_dir, tiny_student):
    model = f"openai/{teacher_server.model_name}"
    options = compile_options(
        tmp_path / "runs", boolean_data_dir, tiny_student, model, "remote-teacher",
        teacher_api_base=teacher_server.url + "/v1",
    )
    previous = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = PLANTED_KEY
    try:
        summary = run_compile(options)
    finally:
        if previous is None:
            del os.environ["OPENAI_API_KEY"]
        else:
            os.environ["OPENAI_API_KEY"] = previous

    traces = summary.run_dir / "traces.duckdb"
    _, stages = query_file(traces, "select name, status from stages")
    _, rows = query_file(traces, "select model, cache_hit, error, output from lm_calls where role = 'teacher'")
    # DSPy's cache returns repeated prompts (the fixture data repeats some questions) without a request.
    _, distinct = query_file(traces, "select count(distinct messages::varchar) from lm_calls where role = 'teacher'")
    served_calls = len(re.findall(r"POST /v1/chat/completions 200", teacher_server.log_tail(10_000_000)))
    assert {status for _, status in stages} == {"succeeded"}
    assert (summary.compiled_dir / "manifest.json").is_file()
    assert rows
    assert {row[0] for row in rows} == {model}
    assert not any(row[1] for row in rows)
    assert not any(row[2] for row in rows)
    assert any("Evaluate leftwards." in (row[3] or "") for row in rows)
    assert served_calls >= distinct[0][0]
    assert served_calls <= len(rows)
    for path in summary.run_dir.rglob("*"):
        if path.is_file():
            assert PLANTED_KEY.encode() not in path.read_bytes(), path
