"""Model registry and the in-process batched LM."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from nesycd.errors import ModelError
from nesycd.lm import is_remote, resolve_model
from nesycd.lm.local import LocalModel

PROMPTS = [
    "Question: What is two plus two?\nAnswer:",
    "Question: Name a colour.\nAnswer:",
    "Question: Is the sky blue on a clear day? Think about it carefully before you answer.\nAnswer:",
    "Hi",
]


def test_unknown_name_rejected():
    with pytest.raises(ModelError, match="no-such-model"):
        resolve_model("no-such-model")


def test_folder_without_config_rejected(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="local folder"):
        resolve_model("nesycd-test-org/definitely-not-cached")


def test_packaged_model_resolves():
    resolved = resolve_model("smollm2-135m")
    assert resolved.source == "packaged"
    assert (resolved.path / "config.json").exists()


def test_remote_strings():
    assert is_remote("openai/gpt-4o-mini")
    assert not is_remote("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_remote("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_lm(tiny_student):
    return LocalModel(tiny_student, name="tiny")


def test_batched_equals_sequential(tiny_lm):
    sequential = [tiny_lm.generate(prompt, max_new_tokens=12).text for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(lambda prompt: tiny_lm.generate(prompt, max_new_tokens=12).text, PROMPTS))
    assert batched == sequential


def test_per_request_max_tokens(tiny_lm):
    limits = [3, 9, 5, 1]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda pair: tiny_lm.generate(pair[0], max_new_tokens=pair[1]), zip(PROMPTS, limits)))
    for result, limit in zip(results, limits):
        assert result.completion_tokens <= limit


def test_stop_string_cuts_output(tiny_lm):
    full = tiny_lm.generate(PROMPTS[0], max_new_tokens=16).text
    assert len(full) > 2
    stop = full[1:3]
    cut = tiny_lm.generate(PROMPTS[0], max_new_tokens=16, stop=(stop,)).text
    assert stop not in cut
    assert full.startswith(cut)


def test_unknown_adapter_rejected(tiny_lm):
    with pytest.raises(ModelError, match="not attached"):
        tiny_lm.generate("x", adapter="missing")


def test_adapter_switch(tiny_student, tmp_path):
    from nesycd.training.sft import LoraTrainingConfig, train_lora

    rows = [{"prompt": "Question: colour?\nAnswer:", "completion": " green green green", "view": "cot"}] * 8
    result = train_lora(tiny_student, rows, tmp_path / "job", config=LoraTrainingConfig(epochs=10, batch_size=8, learning_rate=5e-2))
    model = LocalModel(tiny_student, name="tiny-adapters")
    base_before = model.generate("Question: colour?\nAnswer:", max_new_tokens=6).text
    model.add_adapter("green", result.adapter_dir)
    tuned = model.generate("Question: colour?\nAnswer:", max_new_tokens=6, adapter="green").text
    base_after = model.generate("Question: colour?\nAnswer:", max_new_tokens=6).text
    model.close()
    assert "green" in tuned
    assert base_after == base_before
