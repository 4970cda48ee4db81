"""The compiled artifact: a folder with a JSON manifest, the LoRA adapter, a KB snapshot and the program."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from nesycd.errors import ArtifactError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GENERIC_TASK_DESCRIPTION = "Answer the question."


def save_compiled(
    out_dir: str | Path,
    *,
    program,
    program_file: str | Path,
    base_model: str,
    adapter_dir: str | Path,
    kb_dir: str | Path,
    kb_collection: str,
    embedder_id: str,
    embedder: str | None,
    tasks: dict[str, str],
    max_tokens: int,
    run_id: str,
) -> Path:
    """Write the compiled folder: manifest.json, adapter/, kb/, program.py and program_state.json.

    The knowledge-base folder must be closed (no open Qdrant client) while it is copied.
    """
    from nesycd.training.sft import adapter_sha256

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copytree(adapter_dir, out_dir / "adapter")
    shutil.copytree(kb_dir, out_dir / "kb")
    shutil.copy2(program_file, out_dir / "program.py")
    (out_dir / "program_state.json").write_text(json.dumps(_program_state(program), indent=1, default=str))

    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": run_id,
        "base_model": base_model,
        "adapter": {"path": "adapter", "type": "lora", "sha256": adapter_sha256(out_dir / "adapter")},
        "retriever": program.retriever.config(),
        "embedder": {"id": embedder_id, "model": embedder},
        "kb": {"path": "kb", "collection": kb_collection},
        "program": {"file": "program.py", "state": "program_state.json", "source_name": Path(program_file).name},
        "tasks": tasks,
        "generation": {"max_tokens": max_tokens},
        "versions": _versions(),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("Wrote compiled program to %s", out_dir)
    return out_dir


@dataclass
class CompiledProgram:
    """A loaded compiled program; call it with a question (and a task when it has several)."""

    path: Path
    manifest: dict
    program: Any
    store: Any

    def __call__(self, question: str, task: str | None = None, task_description: str | None = None):
        tasks = self.manifest.get("tasks", {})
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
        """Close the knowledge base so its folder can be opened elsewhere."""
        if self.store is not None:
            self.store.close()


def load(path: str | Path) -> CompiledProgram:
    """Load a compiled folder written by `nesycd compile` and return a callable program.

    Raises:
        ArtifactError: no manifest, a newer format, or an adapter whose sha256 differs from the manifest.
    """
    from nesycd.knowledge import Embedder, KnowledgeStore, make_retriever
    from nesycd.lm import make_lm
    from nesycd.program import load_program
    from nesycd.training.sft import adapter_sha256

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() and (path / "compiled" / MANIFEST).is_file():
        path, manifest_path = path / "compiled", path / "compiled" / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"No {MANIFEST} in {path}. Pass the compiled/ folder of a run written by `nesycd compile`.")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} has format version {manifest['format_version']}, newer than this nesycd "
            f"({FORMAT_VERSION}). Upgrade nesycd."
        )
    adapter_dir = path / manifest["adapter"]["path"]
    actual = adapter_sha256(adapter_dir)
    if actual != manifest["adapter"]["sha256"]:
        raise ArtifactError(
            f"Adapter {adapter_dir} has sha256 {actual}, but the manifest records {manifest['adapter']['sha256']}. "
            "The artifact was modified or copied incompletely; copy it again from the run folder."
        )

    spec = load_program(path / manifest["program"]["file"])
    program = spec.program
    state = json.loads((path / manifest["program"]["state"]).read_text())
    program.load_state(state)
    lm = make_lm(
        manifest["base_model"],
        role="student",
        adapter=(f"compiled-{manifest['adapter']['sha256'][:12]}", str(adapter_dir)),
        max_tokens=manifest["generation"]["max_tokens"],
    )
    program.set_lm(lm)

    store = None
    retriever = make_retriever(manifest["retriever"])
    if manifest["retriever"].get("kind") != "none":
        store = KnowledgeStore(
            path / manifest["kb"]["path"],
            collection=manifest["kb"]["collection"],
            embedder=Embedder(manifest["embedder"].get("model")),
        )
        retriever.bind(store)
    program.retriever = retriever
    return CompiledProgram(path=path, manifest=manifest, program=program, store=store)


def _program_state(program) -> dict:
    """Return the program's DSPy state without LM settings (the manifest records the model)."""
    saved = [(predictor, predictor.lm) for predictor in program.predictors()]
    for predictor, _ in saved:
        predictor.lm = None
    try:
        state = program.dump_state()
    finally:
        for predictor, lm in saved:
            predictor.lm = lm
    return state


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("nesycd", "dspy", "torch", "transformers", "peft", "trl", "qdrant-client", "sentence-transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
