"""Export a compiled program for other servers: merged Hugging Face weights, tokenizer, KB snapshot and a README."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from nesycd.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

ENTRIES_FILE = "kb_entries.jsonl"
EXPORT_RECORD = "nesycd_export.json"

# A chat template that passes one user message through verbatim, as `LocalEngine.render_prompt`
# does, so a server that applies the tokenizer's template (vLLM, SGLang) sends the model the
# prompt layout it was fine-tuned on. Other conversations keep the original template.
_SINGLE_USER = (
    "{% if messages|length == 1 and messages[0]['role'] == 'user' and messages[0]['content'] is string %}"
    "{{ messages[0]['content'] }}{% else %}"
)
# Without an original template the in-process engine joins the message texts with blank lines.
_JOINED = "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ message['content'] }}{% endfor %}"


def passthrough_chat_template(original: str | None) -> str:
    """Return a chat template that renders a lone user message verbatim and other chats as `original` does."""
    return _SINGLE_USER + (original if original else _JOINED) + "{% endif %}"


def export_merged(
    path: str | Path, out_dir: str | Path, *, overwrite: bool = False, verify_base: bool = True
) -> Path:
    """Write merged weights (base + LoRA, `merge_and_unload`), the tokenizer, the KB snapshot and a README.

    The folder loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and serves with
    `vllm serve out_dir`. Its tokenizer's chat template passes a lone user message through
    verbatim (see `passthrough_chat_template`).

    Raises:
        ConfigError: `out_dir` is not empty and `overwrite` is False, or it is inside `path`.
        ArtifactError: the compiled folder is invalid or does not match its manifest.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nesycd.artifact import MANIFEST, base_model_folder, read_manifest, verify
    from nesycd.serve import default_compiled_name

    compiled_dir, manifest = read_manifest(path)
    if manifest.get("adapter") is None:
        raise ArtifactError(
            f"{compiled_dir} contains no LoRA adapter (method {manifest.get('method') or 'nesycd'!r}), so there is nothing "
            f"to merge. Serve its base model {manifest['base_model']!r} directly (for example `vllm serve` on its folder)."
        )
    verify(compiled_dir, manifest, base=verify_base)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, compiled_dir, overwrite)
    started = time.perf_counter()

    base_dir = base_model_folder(compiled_dir, manifest)
    adapter_dir = compiled_dir / manifest["adapter"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir)
    original_template = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = passthrough_chat_template(original_template)
    tokenizer.save_pretrained(out_dir)
    _check_template(tokenizer, original_template)

    entries = _export_knowledge(compiled_dir, manifest, out_dir)
    shutil.copy2(compiled_dir / MANIFEST, out_dir / "nesycd_manifest.json")
    name = default_compiled_name(manifest)
    record = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "compiled": str(compiled_dir.resolve()),
        "served_model_name": name,
        "base_model": manifest["base_model"],
        "adapter_sha256": manifest["adapter"]["sha256"],
        "kb_entries": entries,
    }
    (out_dir / EXPORT_RECORD).write_text(json.dumps(record, indent=1))
    (out_dir / "README.md").write_text(_readme(out_dir, compiled_dir, name, manifest, entries))
    logger.info("Exported merged weights of %s to %s in %.1f s", compiled_dir, out_dir, time.perf_counter() - started)
    return out_dir


def _prepare_out_dir(out_dir: Path, compiled_dir: Path, overwrite: bool) -> None:
    resolved = out_dir.resolve()
    if resolved == compiled_dir.resolve() or compiled_dir.resolve() in resolved.parents:
        raise ConfigError(f"Export folder {out_dir} is inside the compiled folder {compiled_dir}. Pick another folder.")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"Export folder {out_dir} is a file. Pass a folder path.")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise ConfigError(f"Export folder {out_dir} is not empty. Pass --overwrite, or pick an empty folder.")
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_template(tokenizer, original: str | None) -> None:
    """Warn when the wrapped template renders a multi-message chat differently from the original."""
    chat = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello?"}]
    lone = [{"role": "user", "content": "Question: 1 + 1?\nAnswer:"}]
    if tokenizer.apply_chat_template(lone, tokenize=False, add_generation_prompt=True) != lone[0]["content"]:
        logger.warning("The exported chat template does not pass a lone user message through verbatim")
    if original:
        wrapped = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        tokenizer_template = tokenizer.chat_template
        tokenizer.chat_template = original
        try:
            expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        finally:
            tokenizer.chat_template = tokenizer_template
        if wrapped != expected:
            logger.warning("The exported chat template renders multi-message chats differently from the original")


def _export_knowledge(compiled_dir: Path, manifest: dict, out_dir: Path) -> int | None:
    """Copy kb/ and write one JSON line per entry; return the entry count, or None without a KB."""
    from nesycd.artifact import read_entries

    if manifest.get("kb") is None:
        return None
    kb_dir = compiled_dir / manifest["kb"]["path"]
    if not kb_dir.is_dir():
        raise ArtifactError(f"Knowledge base folder {kb_dir} is missing. Copy the compiled folder again from the run folder.")
    shutil.copytree(kb_dir, out_dir / "kb")
    entries_file = manifest["kb"].get("entries_file")
    if entries_file:
        entries = read_entries(compiled_dir / entries_file)
    else:
        entries = _read_qdrant_copy(out_dir / "kb", manifest)
    with (out_dir / ENTRIES_FILE).open("w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry.to_dict()) + "\n")
    return len(entries)


def _read_qdrant_copy(kb_copy: Path, manifest: dict) -> list:
    """Read the entries of a format 1 folder from the copy of kb/, which no running server holds locked."""
    from nesycd.knowledge import Embedder, KnowledgeStore

    embedder = Embedder(manifest["embedder"].get("model"))
    with KnowledgeStore(kb_copy, collection=manifest["kb"]["collection"], embedder=embedder) as store:
        return store.entries()


def _readme(out_dir: Path, compiled_dir: Path, name: str, manifest: dict, entries: int | None) -> str:
    compiled = compiled_dir.resolve()
    kb_rows = (
        "| (no knowledge base) | the method that built this program uses none |\n"
        if entries is None
        else f"| `kb/` | copy of the Qdrant knowledge base (local mode folder) |\n"
        f"| `{ENTRIES_FILE}` | the {entries} knowledge entries, one JSON object per line |\n"
    )
    return f"""# {name}: merged weights for OpenAI-compatible servers

Written by `nesycd export` from `{compiled}` (base model `{manifest['base_model']}`, LoRA adapter
sha256 `{manifest['adapter']['sha256']}`). The LoRA adapter is merged into the base weights, so any
server that loads Hugging Face models serves the distilled student without PEFT.

| file | content |
|---|---|
| `model.safetensors`, `config.json` | merged weights (float32) |
| tokenizer files | the base tokenizer; its chat template passes a lone user message through verbatim |
{kb_rows}| `nesycd_manifest.json` | the manifest of the compiled program |

## Serve with vLLM

```bash
vllm serve {out_dir.resolve()} --served-model-name {name} --dtype float32 --port 8000
```

`--dtype float32` keeps the numbers of the in-process model; `bfloat16` is faster and may change
some greedy outputs. nesycd sends one user message whose text is the whole prompt, and the chat
template passes it through unchanged, so the model receives the layout it was fine-tuned on.

`nesycd serve {out_dir.resolve()} --model-name {name} --port 8000` serves the same folder with the
same OpenAI-compatible API on a machine without vLLM.

## Call the program against the server

Retrieval runs in your process on the compiled folder's knowledge base; generation runs on the
server. litellm needs an API key variable even when the server checks none:

```bash
export OPENAI_API_KEY=unused
nesycd serve {compiled} --student-model openai/{name} --student-api-base http://127.0.0.1:8000/v1 --port 8001
curl -s http://127.0.0.1:8001/v1/answer -H 'Content-Type: application/json' -d '{{"question": "<question>", "task": "<task>"}}'
```

From Python:

```python
import nesycd

program = nesycd.load("{compiled}", model="openai/{name}", api_base="http://127.0.0.1:8000/v1")
prediction = program("<question>", task="<task>")
print(prediction.answer, prediction.knowledge)
```

Or call the model directly with DSPy:

```python
import dspy

lm = dspy.LM("openai/{name}", api_base="http://127.0.0.1:8000/v1", api_key="unused", temperature=0.0)
```
"""
