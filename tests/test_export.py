"""`nesycd export --merged`: merged weights match the PEFT model, and the folder serves the program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nesycd.artifact import load
from nesycd.compile import CompileOptions, run_compile
from nesycd.errors import ConfigError
from nesycd.export import ENTRIES_FILE, export_merged
from nesycd.serve import ServerProcess

REPO = Path(__file__).resolve().parents[1]
PROMPT = (
    "Evaluate the result of a random Boolean expression.\n\nQuestion: not ( True ) and ( True ) is\n"
    "Answer: Let's think step by step."
)


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
        run_id="export",
        epochs=1,
        batch_size=4,
        threads=4,
        max_tokens=16,
        teacher_max_tokens=40,
        baselines=False,
        show_progress=False,
    )
    return run_compile(options).compiled_dir


@pytest.fixture(scope="module")
def merged_dir(compiled_dir, tmp_path_factory) -> Path:
    return export_merged(compiled_dir, tmp_path_factory.mktemp("export") / "merged")


def logits(model, tokenizer, text: str):
    import torch

    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_logits_match_peft(compiled_dir, merged_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(compiled_dir / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(compiled_dir / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()

    expected = logits(peft_model, tokenizer, PROMPT)
    with peft_model.disable_adapter():
        base_logits = logits(peft_model, tokenizer, PROMPT)
    actual = logits(merged, tokenizer, PROMPT)
    assert float((actual - expected).abs().max()) < 1e-4
    # The adapter must change the logits, or the comparison above would pass for an unmerged export.
    assert float((expected - base_logits).abs().max()) > 1e-3


def test_export_writes_files(compiled_dir, merged_dir):
    manifest = json.loads((compiled_dir / "manifest.json").read_text())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "nesycd_manifest.json", "nesycd_export.json", ENTRIES_FILE):
        assert (merged_dir / name).is_file(), name
    assert (merged_dir / "kb").is_dir()
    lines = (merged_dir / ENTRIES_FILE).read_text().splitlines()
    assert len(lines) == manifest["kb"]["count"]
    assert not list(merged_dir.glob("adapter_*"))


def test_no_pickle_weights(merged_dir):
    suffixes = {path.suffix for path in merged_dir.rglob("*") if path.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".bin", ".pt", ".pth"}


def test_readme_has_commands(merged_dir):
    readme = (merged_dir / "README.md").read_text()
    assert f"vllm serve {merged_dir.resolve()}" in readme
    assert "--served-model-name nesycd-bbh-export" in readme
    assert 'api_base="http://127.0.0.1:8000/v1"' in readme
    assert "--student-api-base http://127.0.0.1:8000/v1" in readme


def test_template_passes_prompt_through(merged_dir, tiny_student):
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(merged_dir)
    original = AutoTokenizer.from_pretrained(tiny_student)
    lone = [{"role": "user", "content": PROMPT}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert exported.apply_chat_template(lone, tokenize=False, add_generation_prompt=True) == PROMPT
    assert exported.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )


def test_nonempty_output_rejected(compiled_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError) as caught:
        export_merged(compiled_dir, tmp_path)
    assert "--overwrite" in str(caught.value)


def test_program_on_served_merged_model(compiled_dir, merged_dir, tmp_path):
    # DSPy's response cache is keyed on the model, so a fresh name per run makes the calls reach the server.
    name = f"merged-{uuid.uuid4().hex[:8]}"
    with load(compiled_dir, model=str(merged_dir)) as local:
        expected = local("not ( True ) and ( True ) is")

    previous = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = "unused"
    try:
        with ServerProcess(merged_dir, args=["--model-name", name, "--max-requests", "20",
                                             "--max-seconds", "600"], log_file=tmp_path / "server.log") as server:
            with load(compiled_dir, model=f"openai/{name}", api_base=server.url + "/v1") as remote:
                actual = remote("not ( True ) and ( True ) is")
            log = server.log_tail(100_000)
    finally:
        if previous is None:
            del os.environ["OPENAI_API_KEY"]
        else:
            os.environ["OPENAI_API_KEY"] = previous
    assert "POST /v1/chat/completions 200" in log
    assert actual.reasoning == expected.reasoning
    assert actual.knowledge == expected.knowledge


def test_cli_export(compiled_dir, tmp_path):
    out = tmp_path / "cli-merged"
    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "export", str(compiled_dir), "--merged", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file()
    assert "vllm serve" in result.stdout


def _compile_method(method: str, root: Path, data_dir: Path, student: Path, teacher: Path) -> Path:
    options = CompileOptions(
        program_file=REPO / "programs" / "bbh.py", data_dir=data_dir, student=str(student), teacher=str(teacher),
        tasks=["boolean_expressions"], train_per_task=4, test_per_task=1, runs_dir=root, run_id=method, epochs=1,
        batch_size=4, threads=4, max_tokens=8, teacher_max_tokens=24, baselines=False, show_progress=False,
        method=method,
    )
    return run_compile(options).compiled_dir


def test_export_without_knowledge_base(tmp_path, boolean_data_dir, tiny_student, tiny_teacher):
    compiled = _compile_method("std_cot", tmp_path / "runs", boolean_data_dir, tiny_student, tiny_teacher)
    out = export_merged(compiled, tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    assert not (out / "kb").exists()
    assert not (out / ENTRIES_FILE).exists()
    assert json.loads((out / "nesycd_export.json").read_text())["kb_entries"] is None
    assert "(no knowledge base)" in (out / "README.md").read_text()


def test_export_without_adapter_says_nothing_to_merge(tmp_path, boolean_data_dir, tiny_student, tiny_teacher):
    from nesycd.errors import ArtifactError

    compiled = _compile_method("zero_shot", tmp_path / "runs", boolean_data_dir, tiny_student, tiny_teacher)
    with pytest.raises(ArtifactError, match="no LoRA adapter .*'zero_shot'.*nothing to merge"):
        export_merged(compiled, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
