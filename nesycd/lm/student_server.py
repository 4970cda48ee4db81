"""Student generation on an OpenAI-compatible server that loads LoRA adapters at runtime (vLLM, SGLang, nesycd serve)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from nesycd.errors import ModelError

logger = logging.getLogger(__name__)

# Seconds to wait for the server to list its models or to load one adapter.
REQUEST_TIMEOUT_S = 300.0
# How to start a server that loads adapters at runtime. Every error about the server ends with this text.
SERVER_FIX = (
    "Start vLLM with --enable-lora, a --max-lora-rank of at least the adapter's rank (--lora-rank), and the "
    "environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; or SGLang with --enable-lora; or serve the "
    "student with `nesycd serve <student>`. Then run the same compile command again: stages that finished are "
    "reused."
)
# Files whose bytes decide which weights an adapter folder contains.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class StudentServer:
    """The student's base model on an OpenAI-compatible server, with LoRA adapters loaded at runtime.

    An adapter is loaded with POST `{api_base}/load_lora_adapter` and the JSON body
    `{"lora_name": NAME, "lora_path": FOLDER}`. That is vLLM's route, which vLLM serves when started
    with `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and the route of
    `nesycd serve MODEL`. Requests then pass NAME as their model. When that route returns 404 and
    `api_base` ends in /v1, the server root's `/load_lora_adapter` is tried, which is SGLang's
    route, and requests pass `BASE:NAME` as their model.

    The server reads the adapter folder itself, so it must see FOLDER at the same absolute path:
    run it on the same machine, or mount the run folder at the same path.

    Args:
        api_base: the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1.
        served_model: the base model id on the server; None means the first id of GET {api_base}/models.
        timeout_s: seconds to wait for the model list or for one adapter load.

    Raises:
        ModelError: from `base_model`, `load_adapter` and `lm` when the server cannot be reached,
            rejects the request, or has no runtime LoRA route. The message names the URL and the fix.

    Example:
        >>> server = StudentServer("http://127.0.0.1:8000/v1")
        >>> lm = server.lm(("std_cot", "runs/bbh/r1/adapters/std_cot/adapter"), max_tokens=160)
    """

    def __init__(self, api_base: str, *, served_model: str | None = None, timeout_s: float = REQUEST_TIMEOUT_S):
        self.api_base = api_base.rstrip("/")
        self.served_model = served_model
        self.timeout_s = timeout_s
        self._base_model: str | None = None

    def base_model(self) -> str:
        """Return the served base model id, checking on first use that the server lists it."""
        if self._base_model is not None:
            return self._base_model
        ids = [model["id"] for model in self._models()]
        if self.served_model is None:
            if not ids:
                raise ModelError(
                    f"The student server at {self.api_base} lists no models (GET {self.api_base}/models). "
                    "Pass the base model's id with --student-served-model."
                )
            self._base_model = ids[0]
        elif self.served_model in ids:
            self._base_model = self.served_model
        else:
            raise ModelError(
                f"The student server at {self.api_base} does not serve {self.served_model!r}; it lists "
                f"{', '.join(repr(i) for i in ids) or 'no models'}. Pass one of those as --student-served-model."
            )
        return self._base_model

    def load_adapter(self, label: str, adapter_dir: str | Path) -> str:
        """Load the adapter in `adapter_dir` onto the server and return the model id that requests pass.

        The adapter is loaded under `adapter_name(label, adapter_dir)`. A reply that the name is
        already loaded counts as success, unless the server lists that name with another folder.
        """
        folder = Path(adapter_dir).resolve()
        if not (folder / "adapter_config.json").is_file():
            raise ModelError(f"No LoRA adapter in {folder} (adapter_config.json is missing), so none can be loaded "
                             "onto the student server.")
        name = adapter_name(label, folder)
        payload = {"lora_name": name, "lora_path": str(folder)}

        url = f"{self.api_base}/load_lora_adapter"
        status, text = self._request("POST", url, payload)
        model_id = name
        if status == 404 and self.api_base.endswith("/v1"):
            # NOTE: the SGLang route and its BASE:NAME model ids follow SGLang's documentation and are
            # untested against an SGLang server.
            tried = url
            url = f"{self.api_base.removesuffix('/v1')}/load_lora_adapter"
            status, text = self._request("POST", url, payload)
            model_id = f"{self.base_model()}:{name}"
            if status == 404:
                raise ModelError(
                    f"The student server at {self.api_base} cannot load LoRA adapters at runtime: POST {tried} and "
                    f"POST {url} returned 404. {SERVER_FIX}"
                )
        if status == 404:
            raise ModelError(
                f"The student server at {self.api_base} cannot load LoRA adapters at runtime: POST {url} returned "
                f"404. {SERVER_FIX}"
            )

        if 200 <= status < 300:
            logger.info("Loaded LoRA adapter %s from %s onto the student server %s", name, folder, self.api_base)
        elif _already_loaded(status, text):
            self._check_loaded_folder(name, folder)
            logger.info("LoRA adapter %s from %s was already loaded on the student server %s", name, folder,
                        self.api_base)
        else:
            raise ModelError(
                f"The student server at {self.api_base} failed to load LoRA adapter {name} from {folder}: POST {url} "
                f"returned HTTP {status}: {_error_message(text)}. Check that the server runs the same base model as "
                f"--student and can read {folder}. {SERVER_FIX}"
            )
        return model_id

    def lm(self, adapter: tuple[str, str | Path] | None, *, max_tokens: int):
        """Return a `dspy.LM` for the base model (`adapter` None) or for (label, folder) loaded onto the server."""
        from nesycd.lm import make_lm

        model_id = self.base_model() if adapter is None else self.load_adapter(*adapter)
        # DSPy requires a key for openai/ models. A server started without one ignores the placeholder.
        api_key = None if os.environ.get("OPENAI_API_KEY") else "unused"
        return make_lm(f"openai/{model_id}", role="student", api_base=self.api_base, api_key=api_key,
                       max_tokens=max_tokens)

    # Helpers ---------------------------------------------------------------------------------

    def _models(self) -> list[dict]:
        url = f"{self.api_base}/models"
        status, text = self._request("GET", url)
        if status in (401, 403):
            raise ModelError(
                f"The student server at {self.api_base} rejected GET {url} with HTTP {status}: {_error_message(text)}. "
                "Set OPENAI_API_KEY to the key the server was started with (vLLM: --api-key)."
            )
        if status != 200:
            raise ModelError(
                f"GET {url} returned HTTP {status}: {_error_message(text)}. Check --student-api-base: it is the "
                f"server's OpenAI base URL, which usually ends in /v1. {SERVER_FIX}"
            )
        try:
            models = json.loads(text)["data"]
            return [model for model in models if isinstance(model, dict) and isinstance(model.get("id"), str)]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelError(
                f"GET {url} returned no OpenAI model list ({type(error).__name__}: {error}); the reply starts with "
                f"{text[:200]!r}. Check --student-api-base: it is the server's OpenAI base URL, which usually ends "
                "in /v1."
            ) from error

    def _check_loaded_folder(self, name: str, folder: Path) -> None:
        """Raise when the server lists the adapter `name` with a folder other than `folder`."""
        listed = next((model for model in self._models() if model["id"] == name), None)
        root = None if listed is None else listed.get("root")
        if isinstance(root, str) and Path(root).resolve() != folder:
            raise ModelError(
                f"The student server at {self.api_base} has already loaded a LoRA adapter named {name} from {root}, "
                f"not from {folder}. Unload it (POST {self.api_base}/unload_lora_adapter) or restart the server."
            )

    def _request(self, method: str, url: str, payload: dict | None = None) -> tuple[int, str]:
        """Send one request and return (HTTP status, body text). Raise ModelError when no response arrives."""
        headers = {"Accept": "application/json"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", errors="replace")
        except urllib.error.URLError as error:
            raise ModelError(
                f"Cannot reach the student server at {self.api_base}: {method} {url} failed ({error.reason}). "
                f"Start the server, or fix --student-api-base. {SERVER_FIX}"
            ) from error
        except TimeoutError as error:
            raise ModelError(
                f"{method} {url} timed out after {self.timeout_s:.0f} s. Check that the student server at "
                f"{self.api_base} is running and not overloaded."
            ) from error
        except (ConnectionError, http.client.HTTPException) as error:
            raise ModelError(
                f"The student server at {self.api_base} closed the connection during {method} {url} "
                f"({type(error).__name__}: {error}). Check the server's log, then run the same command again."
            ) from error


def adapter_name(label: str, adapter_dir: str | Path) -> str:
    """Return the name an adapter is loaded under: `label`-<hash of the folder's absolute path and its files>.

    The files are hashed because a stage that trains again writes new weights into the same folder.
    A server that has loaded the old weights under the same name would reply "already loaded" and
    keep generating with them. DSPy's response cache, which is keyed on the model name, would also
    return the old outputs.
    """
    from nesycd.artifact import file_sha256

    folder = Path(adapter_dir).resolve()
    digest = hashlib.sha256(str(folder).encode())
    for file_name in ADAPTER_FILES:
        path = folder / file_name
        if path.is_file():
            digest.update(f"{file_name}:{file_sha256(path)}".encode())
    return f"{label}-{digest.hexdigest()[:12]}"


def _already_loaded(status: int, text: str) -> bool:
    # vLLM replies 400 "The lora adapter '<name>' has already been loaded.", and nesycd serve replies the same.
    message = _error_message(text).lower()
    return status in (400, 409) and "already" in message and "loaded" in message


def _error_message(text: str) -> str:
    """Return the message of an OpenAI-style, vLLM-style or FastAPI-style error body, else the start of the text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for key in ("message", "detail"):
            if isinstance(body.get(key), str):
                return body[key]
    return text.strip()[:300]
