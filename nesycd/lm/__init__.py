"""Teacher and student LMs: packaged offline models, local folders, hub ids and litellm model strings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nesycd.lm.registry import PACKAGED_MODELS, ResolvedModel, is_remote, resolve_model

__all__ = ["PACKAGED_MODELS", "ResolvedModel", "is_remote", "make_lm", "resolve_model"]


def make_lm(
    name: str,
    *,
    role: str,
    adapter: tuple[str, str] | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 256,
    timeout_s: float = 120.0,
):
    """Build a `dspy.LM` for `name`, tagged with its role for the traces.

    Args:
        name: a packaged model (`smollm2-135m`, `gemma3-270m`), a local folder, a Hugging Face id, or
            a litellm model string such as `openai/<model>`.
        role: "teacher" or "student"; recorded with every LM call.
        adapter: (adapter name, adapter folder) of a LoRA adapter to apply without merging; local
            models only.
        api_base: the base URL of an OpenAI-compatible server for a litellm model string. The API key
            comes from the provider's usual variable (for example OPENAI_API_KEY) and is never traced.
        api_key: the API key for a litellm model string, used instead of the provider's variable;
            never traced.
        max_tokens: the default generation limit.
        timeout_s: seconds before a request to a server times out (litellm model strings only).

    Decoding is greedy (temperature 0) so that runs can be compared and resumed.
    """
    import dspy

    if is_remote(name) or api_base:
        # Timeouts, rate limits and 5xx responses are retried 3 times. Measured with dspy 3.4 against a
        # loopback server: 1, 2 and 4 s between tries after a 500, none after a 429 with "Retry-After: 0".
        key = {} if api_key is None else {"api_key": api_key}
        lm = dspy.LM(name, api_base=api_base, temperature=0.0, max_tokens=max_tokens, cache=True, num_retries=3,
                     timeout=timeout_s, **key)
    else:
        from nesycd.lm.local import LocalEngine, LocalModel

        resolved = resolve_model(name)
        model = LocalModel.load(resolved.path, name=name)
        adapter_name = None
        if adapter is not None:
            label, adapter_dir = adapter
            # One process may load several runs' adapters of the same label, so the folder is part of the name.
            folder_hash = hashlib.sha1(str(Path(adapter_dir).resolve()).encode()).hexdigest()[:10]
            adapter_name = f"{label}-{folder_hash}"
            model.add_adapter(adapter_name, adapter_dir)
        engine = LocalEngine(model, adapter=adapter_name, default_max_tokens=max_tokens)
        label = f"local/{name}" if adapter is None else f"local/{name}+{adapter[0]}"
        lm = dspy.LM(label, engine=engine, temperature=0.0, max_tokens=max_tokens, cache=False)
    lm.nesycd_role = role
    return lm


def offline_environment() -> None:
    """Set the variables that stop hub, telemetry and litellm price-map lookups, unless already set."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
