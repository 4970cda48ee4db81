"""HTTP server for a compiled program or a model folder: /v1/answer and OpenAI-compatible chat completions."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nesycd.errors import ConfigError, ModelError, NesycdError

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
# A rejected body up to this size is read and discarded, so the client receives the 413 response
# instead of a connection reset. The server closes the connection on a larger one without reading it.
MAX_DRAIN_BYTES = 16 << 20
CHAT_ROLES = ("system", "developer", "user", "assistant")
# Chat completion fields this server cannot honor; a request that sets them gets a 422.
UNSUPPORTED_CHAT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias")


class RequestError(NesycdError):
    """A rejected request, sent back as a JSON error body: HTTP status, OpenAI-style error type and message."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.headers = dict(headers or {})


@dataclass
class ServerConfig:
    """Limits of one server.

    Args:
        max_body_bytes: request bodies larger than this get a 413 response.
        max_tokens_limit: the largest `max_tokens` a chat request may ask for.
        max_requests: stop after responding to this many requests; None never stops.
        max_seconds: stop this many seconds after starting; None never stops.
    """

    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048
    max_requests: int | None = None
    max_seconds: float | None = None

    def check(self) -> None:
        """Raise ConfigError for a limit that is not a positive number."""
        for name in ("max_body_bytes", "max_tokens_limit", "max_requests", "max_seconds"):
            value = getattr(self, name)
            if value is None and name in ("max_requests", "max_seconds"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"Server setting {name} must be a positive number, got {value!r}.")


@dataclass
class ChatParams:
    """A validated chat completion request: the prompt to continue, the generation settings and the model.

    `model` is the id the response reports. `adapter` is the runtime-loaded LoRA adapter that `model`
    names, or None for the served model itself.
    """

    prompt: str
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str
    adapter: str | None = None


class ServedModel:
    """The model behind a server: a compiled program (both endpoints) or a plain model (chat only).

    Args:
        name: the model id that clients pass as `model` and that GET /v1/models lists.
        kind: "compiled" or "model".
        engine: the in-process `LocalEngine` behind chat completions; None when the compiled
            program generates with a remote model.
        compiled: the loaded `CompiledProgram`, or None for a plain model.
        default_max_tokens: the generation limit when a chat request sets none.
        source: the PATH the server was started with, for /health and the logs.

    A plain model also serves the LoRA adapters loaded with `add_adapter` (POST
    /v1/load_lora_adapter): a chat request whose model is an adapter's name generates with it.
    """

    def __init__(self, *, name: str, kind: str, engine, compiled, default_max_tokens: int, source: str):
        self.name = name
        self.kind = kind
        self.engine = engine
        self.compiled = compiled
        self.default_max_tokens = default_max_tokens
        self.source = source
        self.adapters: dict[str, Path] = {}  # runtime-loaded adapter name -> folder
        self._adapters_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        default_max_tokens: int | None = None,
        student_model: str | None = None,
        student_api_base: str | None = None,
        verify_base: bool = True,
    ) -> ServedModel:
        """Load a compiled folder (or its run folder), a model folder, a packaged id or a cached hub id.

        Raises:
            ConfigError: PATH is not one of these, or --student-model is given for a plain model.
            ArtifactError, ModelError: the compiled folder or the model cannot be loaded.
        """
        from nesycd.artifact import is_compiled
        from nesycd.artifact import load as load_compiled
        from nesycd.lm.local import LocalEngine

        source = str(path)
        if is_compiled(path):
            compiled = load_compiled(path, model=student_model, api_base=student_api_base, verify_base=verify_base)
            engine = getattr(compiled.lm, "engine", None)
            if not isinstance(engine, LocalEngine):
                engine = None
            return cls(
                name=name or default_compiled_name(compiled.manifest),
                kind="compiled",
                engine=engine,
                compiled=compiled,
                default_max_tokens=default_max_tokens or compiled.manifest["generation"]["max_tokens"],
                source=source,
            )

        if student_model is not None or student_api_base is not None:
            raise ConfigError(
                f"--student-model and --student-api-base apply to compiled folders only, and {source} is a plain "
                "model. Serve the model itself, or pass a compiled folder."
            )
        engine = _load_local_engine(source, default_max_tokens or DEFAULT_MAX_TOKENS)
        return cls(
            name=name or default_model_name(source),
            kind="model",
            engine=engine,
            compiled=None,
            default_max_tokens=default_max_tokens or DEFAULT_MAX_TOKENS,
            source=source,
        )

    def chat(self, params: ChatParams):
        """Generate the completion of a validated chat request with the in-process model."""
        adapter = self.engine.adapter if params.adapter is None else params.adapter
        return self.engine.model.generate(
            params.prompt, max_new_tokens=params.max_tokens, stop=params.stop, adapter=adapter
        )

    def add_adapter(self, name: str, folder: Path) -> Path | None:
        """Attach the LoRA adapter in `folder` under `name` and return None.

        When `name` is already loaded, nothing is attached and the folder it was loaded from is returned.

        Raises:
            ModelError: the model already has another adapter named `name`, or `folder` contains no adapter.
        """
        with self._adapters_lock:
            if name in self.adapters:
                return self.adapters[name]
            self.engine.model.add_adapter(name, folder)
            self.adapters[name] = folder
        logger.info("Loaded LoRA adapter %s from %s", name, folder)
        return None

    def close(self) -> None:
        """Close the compiled program's knowledge base; loaded models stay in the process."""
        if self.compiled is not None:
            self.compiled.close()


def default_compiled_name(manifest: dict) -> str:
    """Return the served model id of a compiled program: nesycd-<program file stem>-<run id>."""
    stem = Path(manifest.get("program", {}).get("source_name") or "program").stem
    return f"nesycd-{stem}-{manifest.get('run_id', 'run')}"


def default_model_name(source: str) -> str:
    """Return the served model id of a plain model: the folder name, else the id as given."""
    path = Path(source).expanduser()
    return path.resolve().name if path.is_dir() else source


def _load_local_engine(source: str, default_max_tokens: int):
    from nesycd.lm import resolve_model
    from nesycd.lm.local import LocalEngine, LocalModel

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(
            f"{source} is neither a compiled folder (no manifest.json) nor a model folder (no config.json). "
            "Pass the compiled/ folder of a run, its run folder, or a folder written by save_pretrained."
        )
    if not path.exists() and (path.is_absolute() or source.startswith(".")):
        raise ConfigError(
            f"{source} does not exist. Pass a compiled folder, a model folder written by save_pretrained, "
            "or a packaged model id."
        )
    resolved = resolve_model(source)
    model = LocalModel.load(resolved.path, name=source)
    return LocalEngine(model, default_max_tokens=default_max_tokens)


def parse_chat_request(body: dict, *, served: ServedModel, max_tokens_limit: int) -> ChatParams:
    """Validate an OpenAI chat completion body and render its messages as the in-process engine does.

    The messages go through the conversion DSPy applies before calling an in-process engine
    (`dspy.lm15.request_from_openai_chat`), then through `LocalEngine.render_prompt`, so a request
    sent over HTTP is continued from the same text as the same request made in-process.

    Raises:
        RequestError: 404 for another model, 422 for invalid fields or unsupported features.
    """
    from dspy.lm15 import LM15Error, request_from_openai_chat

    adapter = _check_model(body, served)
    present = [field for field in UNSUPPORTED_CHAT_FIELDS if body.get(field) not in (None, [], {})]
    if present:
        raise RequestError(422, f"{', '.join(present)} is not supported by this server; remove it from the request.")
    if body.get("logprobs") not in (None, False):
        raise RequestError(422, "logprobs is not supported by this server; remove it from the request.")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise RequestError(422, f"n must be 1 (this server returns one choice), got {n!r}.")
    # Decoding is always greedy, so the sampling fields are type-checked and otherwise ignored.
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        if body.get(name) is not None and not _is_number(body[name]):
            raise RequestError(422, f"{name} must be a number, got {_json_type(body[name])}.")
    if body.get("seed") is not None and not _is_int(body["seed"]):
        raise RequestError(422, f"seed must be an integer, got {_json_type(body['seed'])}.")

    messages = _check_messages(body.get("messages"))
    max_tokens = _check_max_tokens(body, served.default_max_tokens, max_tokens_limit)
    stop = _check_stop(body.get("stop"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(422, f"stream must be true or false, got {_json_type(stream)}.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(422, "stream_options must be an object whose include_usage is true or false.")

    try:
        request = request_from_openai_chat({"model": served.name, "messages": messages})
    except (ValueError, TypeError, LM15Error) as error:
        raise RequestError(422, f"Invalid messages: {error}") from error
    prompt = served.engine.render_prompt(request)
    return ChatParams(
        prompt, max_tokens, stop, stream, bool(options.get("include_usage", False)),
        model=served.name if adapter is None else adapter, adapter=adapter,
    )


def _check_model(body: dict, served: ServedModel) -> str | None:
    """Return the runtime-loaded adapter that the body's model names, or None for the served model or no model."""
    model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise RequestError(422, f"model must be a string, got {_json_type(model)}.")
    if model == served.name:
        return None
    if model in served.adapters:
        return model
    raise RequestError(404, f"The model {model!r} does not exist on this server; {_served_models_text(served)}.",
                       "model_not_found")


def _served_models_text(served: ServedModel) -> str:
    adapters = sorted(served.adapters)
    if not adapters:
        return f"it serves {served.name!r} (GET /v1/models)"
    return (f"it serves {served.name!r} and the LoRA adapters {', '.join(repr(name) for name in adapters)} "
            "(GET /v1/models)")


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, f"messages must be a non-empty array of message objects, got {_json_type(messages)}.")
    total_text = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(422, f"messages[{index}] must be an object, got {_json_type(message)}.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(
                422, f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}."
            )
        content = message.get("content")
        if isinstance(content, str):
            total_text += len(content.strip())
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(
                        422, f"messages[{index}].content[{part_index}] must be a text part "
                        '{"type": "text", "text": "..."}; this server reads text only.'
                    )
                total_text += len(part["text"].strip())
        else:
            raise RequestError(
                422, f"messages[{index}].content must be a string or an array of text parts, got {_json_type(content)}."
            )
    if total_text == 0:
        raise RequestError(422, "The messages contain no text; send at least one message with non-empty content.")
    return messages


def _check_max_tokens(body: dict, default: int, limit: int) -> int:
    values = {name: body[name] for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None}
    if len(set(map(repr, values.values()))) > 1:
        raise RequestError(422, f"max_tokens and max_completion_tokens disagree: {values}; send one of them.")
    if not values:
        return default
    name, value = next(iter(values.items()))
    if not _is_int(value) or not 1 <= value <= limit:
        raise RequestError(422, f"{name} must be an integer from 1 to {limit}, got {value!r}.")
    return value


def _check_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise RequestError(422, f"stop must be a non-empty string or an array of non-empty strings, got {stop!r}.")
    if len(strings) > MAX_STOP_STRINGS:
        raise RequestError(422, f"stop has {len(strings)} strings; at most {MAX_STOP_STRINGS} are allowed.")
    return tuple(strings)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def chat_completion(served: ServedModel, params: ChatParams, generation) -> dict:
    """Build an OpenAI `chat.completion` object from one generation."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": params.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": generation.text},
            "logprobs": None,
            "finish_reason": generation.finish_reason,
        }],
        "usage": _usage(generation),
    }


def chat_completion_stream(served: ServedModel, params: ChatParams, generation) -> bytes:
    """Build the server-sent events of a streamed chat completion: the whole text in one chunk."""
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": params.model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": generation.text},
                              "logprobs": None, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": generation.finish_reason}]},
    ]
    if params.include_usage:
        chunks.append({**base, "choices": [], "usage": _usage(generation)})
    events = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return "".join(events).encode()


def _usage(generation) -> dict:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def answer(served: ServedModel, body: dict) -> dict:
    """Answer a /v1/answer body {question, task?} with the compiled program.

    Raises:
        RequestError: 404 for a plain model or another model, 422 for an invalid question or task.
    """
    compiled = served.compiled
    if compiled is None:
        raise RequestError(
            404, f"{served.name} is a plain model, so /v1/answer is not served: it needs a compiled program "
            "(a folder with manifest.json). Use POST /v1/chat/completions, or serve a compiled folder.",
            "not_found_error",
        )
    _check_model(body, served)
    question = body.get("question")
    if not isinstance(question, str):
        raise RequestError(422, f"question must be a string, got {_json_type(question)}.")
    if not question.strip():
        raise RequestError(422, "question is empty; send the question text with its options.")
    task = body.get("task")
    if task is not None and not isinstance(task, str):
        raise RequestError(422, f"task must be a string or null, got {_json_type(task)}.")
    tasks = compiled.tasks
    if task is not None and task not in tasks:
        raise RequestError(
            422, f"Unknown task {task!r}; the program was compiled on: {', '.join(sorted(tasks))}. "
            "Pass one of those, or leave task out.",
        )
    if task is None and len(tasks) == 1:
        task = next(iter(tasks))

    started = time.perf_counter()
    prediction = compiled(question, task=task)
    return {
        "answer": prediction.get("answer"),
        "reasoning": prediction.get("reasoning"),
        "knowledge": list(prediction.get("knowledge") or []),
        "knowledge_ids": list(prediction.get("knowledge_ids") or []),
        "task": task,
        "model": served.name,
        "latency_s": round(time.perf_counter() - started, 4),
    }


def load_lora_adapter(served: ServedModel, body: dict) -> dict:
    """Load a LoRA adapter from a /v1/load_lora_adapter body {lora_name, lora_path}, as vLLM's route does.

    Chat requests whose model is lora_name then generate with the adapter, and GET /v1/models lists
    it. Only a plain model loads adapters. Loading a name a second time is rejected with vLLM's
    "has already been loaded" error, whatever the folder.

    Raises:
        RequestError: 404 for a compiled program; 400 for a missing or invalid field, a folder that
            is missing or has no adapter_config.json, a name that is taken, or an adapter that does
            not fit the model.
    """
    if served.kind != "model":
        raise RequestError(
            404, f"{served.name} is a compiled program, so POST /v1/load_lora_adapter is not served: adapters are "
            "loaded at runtime onto a plain model only. Serve the base model itself (nesycd serve MODEL).",
            "not_found_error",
        )
    for field_name in ("lora_name", "lora_path"):
        value = body.get(field_name)
        if value is None:
            raise RequestError(
                400, f"{field_name} is missing. Send {{\"lora_name\": NAME, \"lora_path\": ABSOLUTE_ADAPTER_FOLDER}}."
            )
        if not isinstance(value, str) or not value.strip():
            raise RequestError(400, f"{field_name} must be a non-empty string, got {value!r}.")
    if body.get("load_inplace"):
        raise RequestError(400, "load_inplace is not supported by this server. Load the new weights under another "
                                "lora_name.")
    name, folder = body["lora_name"], Path(body["lora_path"])
    if name == served.name:
        raise RequestError(400, f"lora_name {name!r} is the served model's id. Pass another name for the adapter.")
    if not folder.is_absolute():
        raise RequestError(400, f"lora_path must be an absolute path on the server's filesystem, got {str(folder)!r}.")
    if not folder.is_dir():
        raise RequestError(
            400, f"lora_path {folder} is not a folder on this server. The server reads the adapter itself, so the "
            "folder must exist on its filesystem at that path.",
        )
    if not (folder / "adapter_config.json").is_file():
        raise RequestError(
            400, f"lora_path {folder} has no adapter_config.json, so it is not a PEFT LoRA adapter folder. Pass the "
            "folder that save_pretrained wrote (in a compile run: adapters/<name>/adapter).",
        )
    if not (folder / "adapter_model.safetensors").is_file():
        # PEFT would fall back to adapter_model.bin, a pickle, which a server never loads from a client's path.
        raise RequestError(
            400, f"lora_path {folder} has no adapter_model.safetensors. This server loads adapter weights in the "
            "safetensors format only; save the adapter with save_pretrained(safe_serialization=True).",
        )

    try:
        loaded_from = served.add_adapter(name, folder)
    except (ModelError, ValueError, RuntimeError, KeyError, OSError) as error:
        # PEFT raises these for an adapter whose modules or shapes do not fit the model.
        raise RequestError(
            400, f"Cannot load the LoRA adapter in {folder} onto {served.name}: {type(error).__name__}: {error}. "
            "Pass an adapter trained on this base model.",
        ) from error
    if loaded_from is not None:
        raise RequestError(400, f"The LoRA adapter {name!r} has already been loaded from {loaded_from}.")
    return {"object": "lora_adapter", "id": name, "root": str(folder), "parent": served.name,
            "message": f"Success: LoRA adapter {name!r} added successfully."}


class NesycdServer(ThreadingHTTPServer):
    """A threaded HTTP server for one `ServedModel`; each request runs in its own thread.

    Requests that generate block in `LocalModel.generate`, whose worker batches the
    generations of concurrent requests.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], served: ServedModel, config: ServerConfig | None = None):
        self.served = served
        self.config = config or ServerConfig()
        self.config.check()
        self.started = time.monotonic()
        self.created = int(time.time())
        self.requests = 0
        self.server_errors = 0
        self._counter_lock = threading.Lock()
        self._stopping = threading.Event()
        self._timer: threading.Timer | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:8000 (the OpenAI base URL adds /v1)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def record(self, status: int) -> None:
        """Count one finished request and stop once the request limit is reached."""
        with self._counter_lock:
            self.requests += 1
            if status >= 500:
                self.server_errors += 1
            done = self.config.max_requests is not None and self.requests >= self.config.max_requests
        if done:
            logger.info("Stopping after %d requests (the request limit)", self.requests)
            self.stop()

    def run(self) -> None:
        """Serve until `stop()`, the request limit or the time limit; then close the socket."""
        if self.config.max_seconds is not None:
            self._timer = threading.Timer(self.config.max_seconds, self._time_up)
            self._timer.daemon = True
            self._timer.start()
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.server_close()

    def stop(self) -> None:
        """Ask the serving loop to stop; safe from any thread, including signal handlers."""
        if not self._stopping.is_set():
            self._stopping.set()
            threading.Thread(target=self.shutdown, name="nesycd-serve-stop", daemon=True).start()

    def _time_up(self) -> None:
        logger.info("Stopping after %.0f s (the time limit)", self.config.max_seconds)
        self.stop()


def make_server(served: ServedModel, host: str = "127.0.0.1", port: int = 8000,
                config: ServerConfig | None = None) -> NesycdServer:
    """Bind a server for `served` on host:port (port 0 picks a free one); call `run()` to serve."""
    if not _is_int(port) or not 0 <= port <= 65535:
        raise ConfigError(f"Port must be an integer from 0 to 65535, got {port!r}.")
    try:
        return NesycdServer((host, port), served, config)
    except OSError as error:
        raise ConfigError(f"Cannot listen on {host}:{port}: {error}. Pick another --port, or 0 for a free one.") from error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nesycd-serve"
    # Seconds an idle keep-alive connection (and its thread) may wait for the next request.
    timeout = 60
    server: NesycdServer

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        path = urlsplit(self.path).path
        headers: dict[str, str] = {}
        content_type = "application/json"
        try:
            route = self._route(path)
            handler = route.get("GET" if method == "HEAD" else method)
            if handler is None:
                allowed = ", ".join(sorted(route))
                raise RequestError(405, f"{method} is not allowed on {path}; use {allowed}.",
                                   "method_not_allowed", {"Allow": allowed})
            body = self._read_json() if method == "POST" else None
            status, payload = 200, handler(body)
            if isinstance(payload, bytes):
                content_type = "text/event-stream"
        except RequestError as error:
            status, payload, headers = error.status, _error_body(str(error), error.error_type), error.headers
            logger.warning("%s %s rejected with %d %s: %s", method, path, status, error.error_type, error)
        except Exception as error:  # any failure becomes a JSON 500; the traceback goes to the log
            logger.exception("%s %s failed", method, path)
            status = 500
            payload = _error_body(
                f"Internal error while handling {method} {path}: {type(error).__name__}: {error}. "
                "The server log has the traceback.", "server_error",
            )
        self._send(status, payload, content_type, headers)
        logger.info("%s %s %d %.1f ms", method, path, status, 1000 * (time.perf_counter() - started))
        self.server.record(status)

    def _route(self, path: str) -> dict:
        served = self.server.served
        routes = {
            "/health": {"GET": lambda body: self._health()},
            "/v1/models": {"GET": lambda body: {"object": "list", "data": self._model_objects()}},
            f"/v1/models/{served.name}": {"GET": lambda body: self._model_object()},
            "/v1/answer": {"POST": lambda body: answer(served, body)},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/load_lora_adapter": {"POST": lambda body: load_lora_adapter(served, body)},
        }
        if path in routes:
            return routes[path]
        if path.startswith("/v1/models/"):
            model = path[len("/v1/models/"):]
            if model in served.adapters:
                return {"GET": lambda body: self._adapter_object(model)}
            raise RequestError(404, f"The model {model!r} does not exist on this server; {_served_models_text(served)}.",
                               "model_not_found")
        raise RequestError(
            404, f"No route {path}. Routes: GET /health, GET /v1/models, POST /v1/answer, POST /v1/chat/completions, "
            "POST /v1/load_lora_adapter.",
            "not_found_error",
        )

    def _health(self) -> dict:
        server = self.server
        return {
            "status": "ok",
            "model": server.served.name,
            "kind": server.served.kind,
            "endpoints": {"answer": server.served.compiled is not None, "chat": server.served.engine is not None},
            "adapters": sorted(server.served.adapters),
            "uptime_s": round(time.monotonic() - server.started, 3),
            "requests": server.requests,
            "server_errors": server.server_errors,
        }

    def _model_object(self) -> dict:
        return {"id": self.server.served.name, "object": "model", "created": self.server.created, "owned_by": "nesycd"}

    def _adapter_object(self, name: str) -> dict:
        # vLLM lists a runtime-loaded adapter with its folder as `root` and the base model as `parent`.
        served = self.server.served
        return {"id": name, "object": "model", "created": self.server.created, "owned_by": "nesycd",
                "root": str(served.adapters[name]), "parent": served.name}

    def _model_objects(self) -> list[dict]:
        """Return the served model, then the runtime-loaded adapters in load order."""
        return [self._model_object(), *(self._adapter_object(name) for name in list(self.server.served.adapters))]

    def _chat(self, body: dict):
        served = self.server.served
        if served.engine is None:
            raise RequestError(
                404, f"{served.name} generates with a remote model, so this server has no local model for chat "
                "completions. Send chat completions to the server behind --student-api-base.", "not_found_error",
            )
        params = parse_chat_request(body, served=served, max_tokens_limit=self.server.config.max_tokens_limit)
        generation = served.chat(params)
        if params.stream:
            return chat_completion_stream(served, params, generation)
        return chat_completion(served, params, generation)

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "Chunked request bodies are not supported; send a Content-Length header.")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError(411, "The request has no Content-Length header; send the JSON body with one.")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"Invalid Content-Length {length_header!r}; send the body's size in bytes.") from None
        limit = self.server.config.max_body_bytes
        if length > limit:
            self._discard_body(length)
            raise RequestError(413, f"The request body is {length} bytes; the limit is {limit} bytes.",
                               "request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise RequestError(400, f"The request body ended after {len(raw)} of {length} bytes.")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(400, f"The request body is not valid UTF-8 JSON: {error}.") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"The request body must be a JSON object, got {_json_type(body)}.")
        return body

    def _discard_body(self, length: int) -> None:
        if length > MAX_DRAIN_BYTES:
            self.close_connection = True
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                self.close_connection = True
                return
            remaining -= len(chunk)

    def _send(self, status: int, payload, content_type: str = "application/json", headers=None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError) as error:
            self.close_connection = True
            logger.warning("Client %s disconnected before the %d response was sent: %s",
                           self.address_string(), status, error)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Send a JSON error for a request that http.server rejects before routing (bad request line, unknown method)."""
        text = message or HTTPStatus(code).phrase
        if explain:
            text = f"{text}: {explain}"
        logger.warning("Rejected request %r from %s with %d: %s", self.requestline, self.address_string(), code, text)
        self.close_connection = True
        if code == 501:
            error_type = "not_implemented_error"
        elif code < 500:
            error_type = "invalid_request_error"
        else:
            error_type = "server_error"
        self._send(code, _error_body(text, error_type))

    def log_request(self, code="-", size="-") -> None:
        """Leave request logging to `_dispatch`, which adds the duration."""

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def _error_body(message: str, error_type: str) -> dict:
    return {"error": {"message": message, "type": error_type}}


class ServerProcess:
    """A `nesycd serve` subprocess on a free port, for scripts and tests; `stop()` or `with` ends it.

    Args:
        path: PATH for `nesycd serve` (a compiled folder, a model folder or a packaged id).
        args: more `nesycd serve` options, e.g. ["--max-requests", "100"].
        log_file: file that receives the server's log (stderr); default: a new temporary file,
            which is kept after `stop()` so the log can be read.
        host: address to bind.
        env: extra environment variables for the subprocess.
        startup_timeout_s: seconds to wait for the server to print its URL.

    Raises:
        ConfigError: the server exited or timed out before printing its URL; the message contains
            the end of its log.
    """

    def __init__(self, path: str | Path, *, args=(), log_file: str | Path | None = None, host: str = "127.0.0.1",
                 env: dict | None = None, startup_timeout_s: float = 300.0):
        if log_file is None:
            handle, log_file = tempfile.mkstemp(prefix="nesycd-serve-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_file)
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "nesycd.cli.main", "serve", str(path), "--host", host, "--port", "0", *args]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, env=environment)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, name="nesycd-serve-stdout", daemon=True).start()
        try:
            self.url = self._wait_for_url(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info("Started nesycd serve (pid %d) at %s", self.process.pid, self.url)

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigError(
                    f"nesycd serve printed no URL within {timeout_s:.0f} s. End of its log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                code = self.process.wait()
                raise ConfigError(
                    f"nesycd serve exited with code {code} before it printed its URL. End of its log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            match = re.search(r" at (http://\S+)$", line.strip())
            if match:
                return match.group(1)

    def log_tail(self, chars: int = 3000) -> str:
        """Return the end of the server's log."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Send SIGTERM, wait up to `timeout_s`, then kill; return the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("nesycd serve (pid %d) did not stop within %.0f s; killing it", self.process.pid, timeout_s)
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if not self._log.closed:
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
