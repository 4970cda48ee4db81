"""Tests of the student confidence probe and the threshold sweep on a compiled program with a tiny model."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nesycd.cli.main import app
from nesycd.knowledge import Embedder, KnowledgeEntry, KnowledgeStore, PACKAGED_MODEL_ID

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tiny_student):
    from nesycd.lm.local import LocalModel

    # A private instance: the process-wide one may carry LoRA adapters from other tests' compiles.
    return LocalModel(tiny_student, name="tiny-probe")


def test_probe_one_token_margin(tiny_model):
    import torch

    prompt = "Question: not ( True ) is\nAnswer: Let's think step by step."
    ids = tiny_model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = tiny_model.model(input_ids=ids).logits[0, -1]
    first, second = torch.topk(torch.softmax(logits.float(), dim=-1), 2).values.tolist()
    assert tiny_model.probe_confidence(prompt, max_new_tokens=1) == pytest.approx(100 * (first - second), abs=1e-4)


def test_probe_range_and_repeatable(tiny_model):
    prompt = "Evaluate the expression.\n\nQuestion: True and False is\nAnswer: Let's think step by step."
    value = tiny_model.probe_confidence(prompt, max_new_tokens=16)
    assert 0.0 <= value <= 100.0
    assert tiny_model.probe_confidence(prompt, max_new_tokens=16) == value


def test_probe_rejects_unknown_adapter(tiny_model):
    from nesycd.errors import ModelError

    with pytest.raises(ModelError, match="not attached"):
        tiny_model.probe_confidence("Question: x", adapter="missing")


def test_attach_lm_uses_local_engine(tiny_student):
    import dspy

    from nesycd.knowledge import AdaptiveRetriever, DenseRetriever, attach_lm
    from nesycd.lm import make_lm

    class Program(dspy.Module):
        def __init__(self):
            super().__init__()
            self.retriever = AdaptiveRetriever(DenseRetriever(), max_new_tokens=2)

    program = Program()
    assert attach_lm(program, make_lm(str(tiny_student), role="student", max_tokens=8)) == 1
    value = program.retriever.confidence("Describe.\nTrue and False is")
    assert 0.0 <= value <= 100.0


@pytest.fixture
def compiled_dir(tmp_path, tiny_student, boolean_data_dir):
    """A compiled BBH program on the tiny student, with a zero-initialised LoRA adapter and a small KB."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nesycd.artifact import save_compiled
    from nesycd.benchmarks import bbh
    from nesycd.program import load_program

    adapter_dir = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter_dir)

    train, _ = bbh.load_bbh(boolean_data_dir, ["boolean_expressions"])
    description = train[0].task_description
    with KnowledgeStore(tmp_path / "kb", embedder=Embedder()) as store:
        store.add([
            KnowledgeEntry(task="boolean_expressions", learning_summary="Apply not before and.",
                           supplementary_knowledge="1. not True is False.", key=f"{description}\n{train[0].question}"),
            KnowledgeEntry(task="boolean_expressions", learning_summary="Evaluate parentheses first.",
                           supplementary_knowledge="1. Inner parentheses come first.", key=f"{description}\n{train[1].question}"),
        ])

    spec = load_program(REPO / "programs" / "bbh.py")
    return save_compiled(
        tmp_path / "compiled", program=spec.program, program_file=REPO / "programs" / "bbh.py",
        base_model=str(tiny_student), adapter_dir=adapter_dir, kb_dir=tmp_path / "kb", kb_collection="nesycd_kb",
        embedder_id=PACKAGED_MODEL_ID, embedder=None, tasks={"boolean_expressions": description},
        max_tokens=12, run_id="test-run",
    )


def test_sweep_command(compiled_dir, boolean_data_dir):
    result = CliRunner().invoke(app, [
        "kb", "sweep", str(compiled_dir), "--data-dir", str(boolean_data_dir), "--test-per-task", "3",
        "--thresholds", "-1,68,100", "--max-new-tokens", "4", "--json",
    ])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    rows = {row["threshold"]: row for row in json.loads(result.stdout)}
    assert rows[-1.0]["questions"] == 3
    assert rows[-1.0]["retrieved"] == 0
    assert rows[100.0]["retrieved"] == 3
    assert 0 <= rows[68.0]["retrieved"] <= 3
    assert 0.0 <= rows[68.0]["accuracy"] <= 1.0
