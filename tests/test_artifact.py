"""The compiled artifact: manifest contents, relocation, and clear errors on tampering or a newer format."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from nesycd.artifact import FORMAT_VERSION, KB_ENTRIES, load
from nesycd.compile import CompileOptions, run_compile
from nesycd.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory, boolean_data_dir, tiny_student, tiny_teacher) -> Path:
    options = CompileOptions(
        program_file=REPO / "programs" / "bbh.py",
        data_dir=boolean_data_dir,
        student=str(tiny_student),
        teacher=str(tiny_teacher),
        tasks=["boolean_expressions"],
        train_per_task=8,
        test_per_task=2,
        runs_dir=tmp_path_factory.mktemp("runs"),
        run_id="artifact",
        epochs=1,
        batch_size=4,
        threads=4,
        max_tokens=16,
        teacher_max_tokens=40,
        baselines=False,
        show_progress=False,
    )
    return run_compile(options).compiled_dir


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_of(compiled_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(compiled_dir, tmp_path / "elsewhere" / "copied"))


def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_provenance(compiled_dir, tiny_student):
    manifest = json.loads((compiled_dir / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert manifest["versions"]["dspy"] == metadata.version("dspy")
    assert manifest["base_model"] == str(tiny_student)
    assert manifest["base_weights"]["source"] == "local"
    assert manifest["base_weights"]["path"] == "base"
    assert manifest["base_weights"]["files"] == {"model.safetensors": sha256(tiny_student / "model.safetensors")}
    assert manifest["adapter"]["sha256"] == sha256(compiled_dir / "adapter" / "adapter_model.safetensors")
    assert manifest["program"]["file_sha256"] == sha256(compiled_dir / "program.py")
    assert manifest["retriever"]["kind"] == "dense"
    assert manifest["embedder"]["id"]


def test_kb_snapshot_written(compiled_dir):
    manifest = json.loads((compiled_dir / "manifest.json").read_text())
    lines = (compiled_dir / KB_ENTRIES).read_text().splitlines()
    assert manifest["kb"]["count"] > 0
    assert len(lines) == manifest["kb"]["count"]
    assert json.loads(lines[0])["learning_summary"]
    assert (compiled_dir / "kb").is_dir()


def test_no_pickle_weights(compiled_dir):
    suffixes = {path.suffix for path in compiled_dir.rglob("*") if path.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".bin", ".pt", ".pth"}


def test_relocated_copy_answers(compiled_dir, tmp_path):
    moved = copy_of(compiled_dir, tmp_path)
    compiled = load(moved)
    try:
        prediction = compiled("True and not False is")
        model_path = compiled.lm.engine.model.path
    finally:
        compiled.close()
    assert compiled.path == moved
    assert model_path.resolve() == (moved / "base").resolve()
    assert isinstance(prediction.reasoning, str)
    assert len(prediction.knowledge) == 1


def test_loads_while_original_loaded(compiled_dir):
    first = load(compiled_dir)
    try:
        second = load(compiled_dir)
        second.close()
    finally:
        first.close()
    assert second.store is not first.store


def test_tampered_adapter_rejected(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    weights = copied / "adapter" / "adapter_model.safetensors"
    recorded = json.loads((copied / "manifest.json").read_text())["adapter"]["sha256"]
    flip_last_byte(weights)
    with pytest.raises(ArtifactError) as caught:
        load(copied)
    message = str(caught.value)
    assert str(weights) in message
    assert recorded in message
    assert sha256(weights) in message
    assert "copy it again" in message


def test_tampered_base_file_hash_rejected(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    fake = "0" * 64
    rewrite_manifest(copied, lambda manifest: manifest["base_weights"]["files"].update({"model.safetensors": fake}))
    with pytest.raises(ArtifactError) as caught:
        load(copied)
    message = str(caught.value)
    assert str(copied / "base" / "model.safetensors") in message
    assert fake in message
    assert sha256(copied / "base" / "model.safetensors") in message
    assert "verify_base=False" in message


def test_tampered_base_combined_hash_rejected(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    fake = "f" * 64
    rewrite_manifest(copied, lambda manifest: manifest["base_weights"].update({"sha256": fake}))
    with pytest.raises(ArtifactError) as caught:
        load(copied)
    message = str(caught.value)
    assert str(copied / "manifest.json") in message
    assert fake in message


def test_changed_base_weights_rejected(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    flip_last_byte(copied / "base" / "model.safetensors")
    with pytest.raises(ArtifactError) as caught:
        load(copied)
    assert "model.safetensors" in str(caught.value)


def test_skip_base_check_loads(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    rewrite_manifest(copied, lambda manifest: manifest["base_weights"].update({"sha256": "f" * 64}))
    compiled = load(copied, verify_base=False)
    compiled.close()
    assert compiled.manifest["base_weights"]["sha256"] == "f" * 64


def test_tampered_entries_rejected(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    with (copied / KB_ENTRIES).open("a") as handle:
        handle.write("\n")
    with pytest.raises(ArtifactError) as caught:
        load(copied)
    assert KB_ENTRIES in str(caught.value)


def test_newer_format_rejected(compiled_dir, tmp_path):
    copied = copy_of(compiled_dir, tmp_path)
    rewrite_manifest(copied, lambda manifest: manifest.update({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError) as caught:
        load(copied)
    message = str(caught.value)
    assert f"format version {FORMAT_VERSION + 1}" in message
    assert "Upgrade nesycd" in message


def test_format_one_still_loads(compiled_dir, tmp_path, tiny_student):
    copied = copy_of(compiled_dir, tmp_path)

    def downgrade(manifest):
        manifest["format_version"] = 1
        for key in ("base_weights",):
            del manifest[key]
        manifest["kb"] = {"path": "kb", "collection": manifest["kb"]["collection"]}

    rewrite_manifest(copied, downgrade)
    compiled = load(copied)
    try:
        prediction = compiled("False or True is")
    finally:
        compiled.close()
    assert len(prediction.knowledge) == 1


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(ArtifactError) as caught:
        load(tmp_path)
    assert "No manifest.json" in str(caught.value)
