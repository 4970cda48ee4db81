"""The compile's student stages on an OpenAI-compatible server that loads LoRA adapters at runtime.

The server is `nesycd serve <tiny student>` on 127.0.0.1, which speaks vLLM's runtime LoRA protocol.
Greedy decoding on the same weights must give the same outputs as the in-process student.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nesycd.compile import CompileOptions, CompileSummary, run_compile
from nesycd.errors import ConfigError, ModelError
from nesycd.lm.student_server import StudentServer, adapter_name
from nesycd.serve import RequestError, ServedModel, ServerProcess, load_lora_adapter, make_server
from nesycd.tracing import query_file
from nesycd.training.sft import adapter_sha256
from optimizers.nesycd import STAGE_CONFIG_FIELDS, STUDENT_SERVER_FIELDS, NesyCD, NesyCDConfig
from test_serve import post_json, request

REPO = Path(__file__).resolve().parents[1]
PLANTED_KEY = "sk-planted-student-server-key-2468"
PROMPT = "Evaluate the result of a random Boolean expression.\n\nQ: not ( True ) and ( True ) is\nA:"


def compile_options(runs_dir: Path, data_dir: Path, student: Path, teacher: Path, run_id: str, **extra) -> CompileOptions:
    settings = {
        "program_file": REPO / "programs" / "bbh.py",
        "data_dir": data_dir,
        "student": str(student),
        "teacher": str(teacher),
        "tasks": ["boolean_expressions"],
        "train_per_task": 8,
        "test_per_task": 4,
        "runs_dir": runs_dir,
        "run_id": run_id,
        # The random tiny student writes dots. Fine-tuning at this rate makes each adapter write other
        # text, so a request served with the wrong adapter gives other outputs.
        "epochs": 2,
        "learning_rate": 1e-2,
        "batch_size": 4,
        "threads": 4,
        "max_tokens": 16,
        "teacher_max_tokens": 40,
        "show_progress": False,
    }
    return CompileOptions(**{**settings, **extra})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lines(log: str, pattern: str) -> int:
    return len(re.findall(pattern, log))


@pytest.fixture(scope="module")
def student_server(tiny_student, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("logs") / "student-server.log"
    # DSPy's response cache is keyed on the model name, so a fresh base model name per run makes
    # every base-model call reach the server. Adapter names already differ per run folder.
    name = f"tiny-student-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(
        tiny_student, args=["--model-name", name, "--max-requests", "2000", "--max-seconds", "1200"], log_file=log_file
    )
    server.model_name = name
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def local_run(runs_dir, boolean_data_dir, tiny_student, tiny_teacher):
    return run_compile(compile_options(runs_dir, boolean_data_dir, tiny_student, tiny_teacher, "local"))


@dataclass
class ServedRun:
    """A compile whose student stages ran on the student server, and the server's log and /health after it."""

    summary: CompileSummary
    server_log: str
    server_health: dict

    @property
    def run_dir(self) -> Path:
        return self.summary.run_dir


@pytest.fixture(scope="module")
def served_run(runs_dir, boolean_data_dir, tiny_student, tiny_teacher, student_server, local_run) -> ServedRun:
    options = compile_options(
        runs_dir, boolean_data_dir, tiny_student, tiny_teacher, "served", student_api_base=student_server.url + "/v1"
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
    # Later tests send more requests to the same server, so its log is kept as it is now.
    status, _, health = request(student_server.url, "GET", "/health")
    assert status == 200
    return ServedRun(summary, student_server.log_tail(10_000_000), health)


def student_rows(run_dir: Path, sql: str) -> list[tuple]:
    _, rows = query_file(run_dir / "traces.duckdb", sql)
    return rows


# ---------------------------------------------------------------------- compile on the server


def test_served_compile_succeeds(served_run):
    rows = student_rows(served_run.run_dir, "select name, status from stages order by started_at")
    assert [name for name, _ in rows] == [
        "teacher_rationales", "sft_general", "collect_demonstrations", "write_knowledge", "sft_kb", "evaluate"
    ]
    assert {status for _, status in rows} == {"succeeded"}
    assert (served_run.summary.compiled_dir / "manifest.json").is_file()


def test_same_adapters_trained(local_run, served_run):
    # Outputs can only match when both runs fine-tuned the same weights.
    for name in ("std_cot", "nesycd"):
        local = local_run.run_dir / "adapters" / name / "adapter"
        served = served_run.run_dir / "adapters" / name / "adapter"
        assert adapter_sha256(local) == adapter_sha256(served), name


def test_adapters_change_outputs(local_run):
    # Without this, matching outputs would not show that the server applied the right adapter.
    rows = student_rows(local_run.run_dir, "select model_label, output from predictions where stage = 'evaluate'")
    outputs = {label: {output for row_label, output in rows if row_label == label} for label in ("base", "std_cot", "nesycd")}
    assert outputs["base"].isdisjoint(outputs["std_cot"])
    assert outputs["base"].isdisjoint(outputs["nesycd"])
    assert outputs["std_cot"].isdisjoint(outputs["nesycd"])
    collected = student_rows(local_run.run_dir, "select count(distinct output) from predictions where stage = 'collect_demonstrations'")
    assert collected[0][0] > 1


def test_results_match_in_process(local_run, served_run):
    local = json.loads((local_run.run_dir / "results.json").read_text())
    served = json.loads((served_run.run_dir / "results.json").read_text())
    assert set(served) == {"base", "std_cot", "nesycd"}
    assert served == local


def test_error_cases_match_in_process(local_run, served_run):
    def cases(run_dir: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run_dir / "error_cases.jsonl").read_text().splitlines() if line.strip()]
        return sorted((row["id"], row["kind"], row["response"]) for row in rows)

    assert cases(served_run.run_dir)
    assert cases(served_run.run_dir) == cases(local_run.run_dir)


def test_predictions_match_in_process(local_run, served_run):
    sql = ("select stage, model_label, example_id, output, answer, correct from predictions "
           "where model_label != 'teacher' order by stage, model_label, example_id")
    local = student_rows(local_run.run_dir, sql)
    served = student_rows(served_run.run_dir, sql)
    assert {row[1] for row in served} == {"base", "std_cot", "nesycd"}
    assert served == local


def test_student_calls_traced_with_served_names(served_run, local_run, student_server):
    run_dir = served_run.run_dir
    std_cot = adapter_name("std_cot", run_dir / "adapters" / "std_cot" / "adapter")
    nesycd = adapter_name("nesycd", run_dir / "adapters" / "nesycd" / "adapter")
    by_stage = student_rows(
        run_dir, "select stage, model, count(*), count(error) from lm_calls where role = 'student' "
        "group by stage, model order by stage, model",
    )
    assert by_stage == sorted([
        ("collect_demonstrations", f"openai/{std_cot}", 8, 0),
        ("evaluate", f"openai/{nesycd}", 4, 0),
        ("evaluate", f"openai/{std_cot}", 4, 0),
        ("evaluate", f"openai/{student_server.model_name}", 4, 0),
    ])
    local_calls = student_rows(local_run.run_dir, "select count(*) from lm_calls where role = 'student'")
    assert local_calls == [(20,)]


def test_server_received_student_calls(served_run, student_server):
    run_dir = served_run.run_dir
    log = served_run.server_log
    std_cot = adapter_name("std_cot", run_dir / "adapters" / "std_cot" / "adapter")
    nesycd = adapter_name("nesycd", run_dir / "adapters" / "nesycd" / "adapter")
    # std_cot is loaded for collect_demonstrations and again for evaluate. nesycd is loaded for the
    # returned program and again for evaluate. The second load of each gets "already loaded".
    assert lines(log, r"POST /v1/load_lora_adapter 200 ") == 2
    assert lines(log, r"POST /v1/load_lora_adapter rejected with 400 .*has already been loaded") == 2
    assert f"Loaded LoRA adapter {std_cot} from {(run_dir / 'adapters' / 'std_cot' / 'adapter').resolve()}" in log
    assert f"Loaded LoRA adapter {nesycd} from {(run_dir / 'adapters' / 'nesycd' / 'adapter').resolve()}" in log
    assert served_run.server_health["adapters"] == sorted([std_cot, nesycd])

    # DSPy's cache answers repeated prompts (the fixture data repeats questions) without a request.
    distinct = student_rows(run_dir, "select count(distinct (model, messages::varchar)) from lm_calls where role = 'student'")
    traced = student_rows(run_dir, "select count(*) from lm_calls where role = 'student'")
    served_calls = lines(log, r"POST /v1/chat/completions 200 ")
    assert served_calls >= distinct[0][0]
    assert served_calls <= traced[0][0]
    assert lines(log, r"POST /v1/chat/completions (4|5)\d\d ") == 0


def test_api_key_not_written(served_run):
    assert PLANTED_KEY not in served_run.server_log
    for path in served_run.run_dir.rglob("*"):
        if path.is_file():
            assert PLANTED_KEY.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------- a server without runtime LoRA


class NoLoraServer:
    """A loopback server that lists one model and returns 404 for every other request, like vLLM without runtime LoRA."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append(("GET", self.path))
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": "tiny-base", "object": "model"}]})
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests.append(("POST", self.path))
                self.reply(404, {"detail": "Not Found"})

            def reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_missing_lora_route_fails_then_resumes(
    tmp_path, boolean_data_dir, tiny_student, tiny_teacher, student_server, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake = NoLoraServer()
    try:
        options = compile_options(tmp_path, boolean_data_dir, tiny_student, tiny_teacher, "no-lora", baselines=False,
                                  student_api_base=fake.root + "/v1")
        with pytest.raises(ModelError) as caught:
            run_compile(options)
    finally:
        fake.close()

    message = str(caught.value)
    assert f"POST {fake.root}/v1/load_lora_adapter" in message
    assert f"POST {fake.root}/load_lora_adapter" in message
    assert "returned 404" in message
    assert "--enable-lora" in message
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message
    assert ("POST", "/v1/load_lora_adapter") in fake.requests
    assert not [path for method, path in fake.requests if "completions" in path]

    run_dir = tmp_path / "bbh" / "no-lora"
    stages = student_rows(run_dir, "select name, status from stages order by started_at")
    assert stages == [("teacher_rationales", "succeeded"), ("sft_general", "succeeded"),
                      ("collect_demonstrations", "failed")]
    assert student_rows(run_dir, "select count(*) from lm_calls where role = 'student'") == [(0,)]
    assert (run_dir / "adapters" / "std_cot" / "adapter" / "adapter_model.safetensors").is_file()

    # The same run id against a server that loads adapters reuses the finished stages. No
    # OPENAI_API_KEY is set, which a server without authentication does not need.
    resumed = run_compile(compile_options(tmp_path, boolean_data_dir, tiny_student, tiny_teacher, "no-lora",
                                          baselines=False, student_api_base=student_server.url + "/v1"))
    stages = student_rows(resumed.run_dir, "select name, status from stages order by started_at")
    assert stages[:3] == [("teacher_rationales", "succeeded"), ("sft_general", "succeeded"),
                          ("collect_demonstrations", "failed")]
    assert stages[3:] == [("teacher_rationales", "reused"), ("sft_general", "reused"),
                          ("collect_demonstrations", "succeeded"), ("write_knowledge", "succeeded"),
                          ("sft_kb", "succeeded"), ("evaluate", "succeeded")]
    assert student_rows(resumed.run_dir, "select count(*), count(error) from lm_calls where role = 'student'") == [(12, 0)]


def test_unreachable_server_fails_before_teacher(tmp_path, boolean_data_dir, tiny_student, tiny_teacher):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "compile", str(REPO / "programs" / "bbh.py"),
         "--data-dir", str(boolean_data_dir), "--student", str(tiny_student), "--teacher", str(tiny_teacher),
         "--tasks", "boolean_expressions", "--train-per-task", "4", "--test-per-task", "2",
         "--runs-dir", str(tmp_path), "--run-id", "unreachable", "--student-api-base", url],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert f"Cannot reach the student server at {url}" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert student_rows(tmp_path / "bbh" / "unreachable", "select count(*) from stages") == [(0,)]


def test_unknown_served_model_lists_ids(student_server):
    server = StudentServer(student_server.url + "/v1", served_model="no-such-model")
    with pytest.raises(ModelError) as caught:
        server.base_model()
    assert "'no-such-model'" in str(caught.value)
    assert repr(student_server.model_name) in str(caught.value)
    assert "--student-served-model" in str(caught.value)


def test_adaptive_retriever_rejected(tmp_path, boolean_data_dir, tiny_student, tiny_teacher):
    options = compile_options(tmp_path, boolean_data_dir, tiny_student, tiny_teacher, "adaptive",
                              retriever="adaptive", student_api_base=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ConfigError) as caught:
        run_compile(options)
    assert "adaptive retriever" in str(caught.value)
    assert "--retriever" in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "phrase"),
    [
        ({"student_api_base": "127.0.0.1:8000/v1"}, "http:// or https://"),
        ({"student_served_model": "tiny"}, "needs --student-api-base"),
        ({"student_api_base": "http://127.0.0.1:8000/v1", "student_served_model": " "}, "is empty"),
    ],
)
def test_invalid_server_settings_rejected(tmp_path, settings, phrase):
    with pytest.raises(ConfigError) as caught:
        NesyCD(lambda example, prediction, trace=None: True, run_dir=tmp_path, store=None,
               config=NesyCDConfig(**settings))
    assert phrase in str(caught.value)


# ---------------------------------------------------------------------- fingerprints


def fingerprinter(tmp_path, **settings) -> NesyCD:
    return NesyCD(lambda example, prediction, trace=None: True, run_dir=tmp_path, store=None,
                  config=NesyCDConfig(**settings))


def test_fingerprints_without_server_unchanged(tmp_path):
    optimizer = fingerprinter(tmp_path)
    config = optimizer.config
    for stage, stage_fields in STAGE_CONFIG_FIELDS.items():
        before = tuple(name for name in stage_fields if name not in STUDENT_SERVER_FIELDS)
        assert optimizer._fingerprint(stage, "inputs") == config.fingerprint(stage, "inputs", fields=before), stage
    every = tuple(field.name for field in fields(config) if field.name not in STUDENT_SERVER_FIELDS)
    assert optimizer._fingerprint("sft_answer", "inputs") == config.fingerprint("sft_answer", "inputs", fields=every)


def test_fingerprints_with_server(tmp_path):
    local = fingerprinter(tmp_path)
    served = fingerprinter(tmp_path, student_api_base="http://127.0.0.1:8000/v1")
    named = fingerprinter(tmp_path, student_api_base="http://127.0.0.1:8000/v1", student_served_model="base")
    for stage in ("collect_demonstrations", "evaluate"):
        fingerprints = {local._fingerprint(stage, "x"), served._fingerprint(stage, "x"), named._fingerprint(stage, "x")}
        assert len(fingerprints) == 3, stage
    for stage in ("teacher_rationales", "sft_general", "write_knowledge", "sft_kb", "sft_answer", "sft_step_by_step"):
        assert served._fingerprint(stage, "x") == local._fingerprint(stage, "x"), stage
        assert named._fingerprint(stage, "x") == local._fingerprint(stage, "x"), stage


# ---------------------------------------------------------------------- the load endpoint of nesycd serve


@pytest.fixture(scope="module")
def random_adapter(tiny_student, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny student with random A and B, so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapters") / "random"
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_server(tiny_student):
    served = ServedModel.load(str(tiny_student), name="tiny-plain", default_max_tokens=8)
    server = make_server(served, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, name="plain-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=30)


LOAD_CASES = [
    # (body given the adapter folder and an empty folder, expected phrase of the 400 message)
    (lambda adapter, empty: {}, "lora_name is missing"),
    (lambda adapter, empty: {"lora_name": "a"}, "lora_path is missing"),
    (lambda adapter, empty: {"lora_name": "", "lora_path": str(adapter)}, "lora_name must be a non-empty string"),
    (lambda adapter, empty: {"lora_name": 7, "lora_path": str(adapter)}, "lora_name must be a non-empty string"),
    (lambda adapter, empty: {"lora_name": "a", "lora_path": ["x"]}, "lora_path must be a non-empty string"),
    (lambda adapter, empty: {"lora_name": "a", "lora_path": "adapters/random"}, "must be an absolute path"),
    (lambda adapter, empty: {"lora_name": "a", "lora_path": str(empty / "missing")}, "is not a folder on this server"),
    (lambda adapter, empty: {"lora_name": "a", "lora_path": str(empty)}, "has no adapter_config.json"),
    (lambda adapter, empty: {"lora_name": "tiny-plain", "lora_path": str(adapter)}, "the served model's id"),
    (lambda adapter, empty: {"lora_name": "a", "lora_path": str(adapter), "load_inplace": True},
     "load_inplace is not supported"),
]


@pytest.mark.parametrize(("make_body", "phrase"), LOAD_CASES)
def test_load_rejects_invalid_body(plain_server, random_adapter, tmp_path, make_body, phrase):
    status, _, body = post_json(plain_server.url, "/v1/load_lora_adapter", make_body(random_adapter, tmp_path))
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert phrase in body["error"]["message"]
    assert "a" not in plain_server.served.adapters


def test_load_rejects_bad_json(plain_server):
    status, _, body = request(plain_server.url, "POST", "/v1/load_lora_adapter", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"


def test_load_needs_post(plain_server):
    status, headers, body = request(plain_server.url, "GET", "/v1/load_lora_adapter")
    assert status == 405
    assert headers["Allow"] == "POST"


def test_compiled_program_has_no_load():
    served = ServedModel(name="nesycd-bbh-r1", kind="compiled", engine=None, compiled=None, default_max_tokens=8,
                         source="runs/bbh/r1/compiled")
    with pytest.raises(RequestError) as caught:
        load_lora_adapter(served, {"lora_name": "a", "lora_path": "/tmp"})
    assert caught.value.status == 404
    assert "compiled program" in str(caught.value)


def test_unknown_route_lists_load(plain_server):
    status, _, body = request(plain_server.url, "GET", "/v1/nothing")
    assert status == 404
    assert "POST /v1/load_lora_adapter" in body["error"]["message"]


def test_loaded_adapter_serves_chat(plain_server, random_adapter, tmp_path):
    url = plain_server.url
    messages = [{"role": "user", "content": PROMPT}]
    status, _, loaded = post_json(url, "/v1/load_lora_adapter", {"lora_name": "unit-random", "lora_path": str(random_adapter)})
    assert status == 200
    assert loaded["id"] == "unit-random"

    _, _, models = request(url, "GET", "/v1/models")
    assert [model["id"] for model in models["data"]] == ["tiny-plain", "unit-random"]
    assert models["data"][1]["root"] == str(random_adapter)
    assert models["data"][1]["parent"] == "tiny-plain"
    status, _, model = request(url, "GET", "/v1/models/unit-random")
    assert status == 200
    assert model["id"] == "unit-random"

    status, _, with_adapter = post_json(url, "/v1/chat/completions", {"model": "unit-random", "messages": messages})
    assert status == 200
    assert with_adapter["model"] == "unit-random"
    _, _, base = post_json(url, "/v1/chat/completions", {"model": "tiny-plain", "messages": messages})
    assert base["model"] == "tiny-plain"
    local = plain_server.served.engine.model
    assert with_adapter["choices"][0]["message"]["content"] == local.generate(PROMPT, max_new_tokens=8,
                                                                               adapter="unit-random").text
    assert base["choices"][0]["message"]["content"] == local.generate(PROMPT, max_new_tokens=8).text
    assert with_adapter["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]

    # A second load of the name is rejected as vLLM rejects it, whatever the folder.
    copy = tmp_path / "copy"
    shutil.copytree(random_adapter, copy)
    for folder in (random_adapter, copy):
        status, _, body = post_json(url, "/v1/load_lora_adapter", {"lora_name": "unit-random", "lora_path": str(folder)})
        assert status == 400
        assert "has already been loaded" in body["error"]["message"]
    assert plain_server.served.adapters["unit-random"] == random_adapter

    status, _, body = post_json(url, "/v1/chat/completions", {"model": "unit-other", "messages": messages})
    assert status == 404
    assert body["error"]["type"] == "model_not_found"
    assert "'unit-random'" in body["error"]["message"]


def test_client_loads_adapter_twice(plain_server, random_adapter):
    server = StudentServer(plain_server.url + "/v1")
    name = adapter_name("unit", random_adapter)
    first = server.lm(("unit", random_adapter), max_tokens=8)
    second = server.lm(("unit", random_adapter), max_tokens=8)
    assert first.model == second.model == f"openai/{name}"
    assert plain_server.served.adapters[name] == random_adapter.resolve()
    assert server.lm(None, max_tokens=8).model == "openai/tiny-plain"


def test_client_rejects_name_held_elsewhere(plain_server, random_adapter, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(random_adapter, copy)
    name = adapter_name("held", copy)
    status, _, _ = post_json(plain_server.url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(random_adapter)})
    assert status == 200
    with pytest.raises(ModelError) as caught:
        StudentServer(plain_server.url + "/v1").load_adapter("held", copy)
    assert f"has already loaded a LoRA adapter named {name} from {random_adapter}" in str(caught.value)


def test_client_reports_rejected_load(plain_server, tmp_path):
    # The folder passes the client's check but contains no weights, so the server fails to load it.
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError) as caught:
        StudentServer(plain_server.url + "/v1").load_adapter("broken", tmp_path)
    message = str(caught.value)
    assert f"POST {plain_server.url}/v1/load_lora_adapter returned HTTP 400" in message
    assert str(tmp_path) in message


def test_load_rejects_pickled_weights(plain_server, random_adapter, tmp_path):
    """A folder whose weights are adapter_model.bin (a pickle) is rejected before PEFT opens it."""
    import shutil

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(random_adapter / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"not read")
    status, _, body = post_json(plain_server.url, "/v1/load_lora_adapter", {"lora_name": "p", "lora_path": str(folder)})
    assert status == 400
    assert "has no adapter_model.safetensors" in body["error"]["message"]
    assert "p" not in plain_server.served.adapters
