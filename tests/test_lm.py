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


@pytest.fixture(scope="module")
def sharp_lm(tmp_path_factory):
    """A tiny random Llama with larger initial weights, whose greedy output changes with positions and padding.

    With the usual 0.02 initialisation a 2-layer model repeats one token whatever its inputs, so
    a wrong position id or an unmasked pad would go unnoticed.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "tiny-sharp"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = LocalModel(folder, name="tiny-sharp")
    yield model
    model.close()


def _generate_alone(model: LocalModel, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy `model.generate` on one unpadded prompt, outside LocalModel's batching."""
    import torch

    ids = model.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        output = model.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    new_ids = output[0, ids.shape[1] :].tolist()
    if model.tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(model.tokenizer.eos_token_id)]
    return model.tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids)


def test_continuous_batching_used(sharp_lm):
    sharp_lm.generate(PROMPTS[0], max_new_tokens=2)
    assert sharp_lm._continuous is True


def test_batched_equals_plain_generate(sharp_lm):
    limits = [12, 5, 16, 9]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda pair: sharp_lm.generate(pair[0], max_new_tokens=pair[1]), zip(PROMPTS, limits)))
    for prompt, limit, result in zip(PROMPTS, limits, results):
        text, tokens = _generate_alone(sharp_lm, prompt, limit)
        assert result.text == text, prompt
        assert result.completion_tokens == tokens, prompt


def test_requests_join_running_batch(sharp_lm):
    import time

    prompts = PROMPTS * 3
    sequential = [sharp_lm.generate(prompt, max_new_tokens=24).text for prompt in prompts]

    def delayed(index: int) -> str:
        # Staggered arrivals make requests join and leave a batch that is already decoding.
        time.sleep(0.003 * index)
        return sharp_lm.generate(prompts[index], max_new_tokens=24).text

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(delayed, range(len(prompts))))
    assert batched == sequential


def test_sliding_window_model_uses_fixed_batches(tmp_path):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(tmp_path / "sliding")
    tokenizer.save_pretrained(tmp_path / "sliding")
    model = LocalModel(tmp_path / "sliding", name="tiny-sliding")
    sequential = [model.generate(prompt, max_new_tokens=8).text for prompt in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(lambda prompt: model.generate(prompt, max_new_tokens=8).text, PROMPTS))
    model.close()
    assert model._continuous is False
    assert batched == sequential


def test_decode_error_reaches_caller(sharp_lm, monkeypatch):
    from nesycd.lm import local

    original = local._DecodeBatch.forward
    calls = {"count": 0}

    def failing_once(self, model):
        calls["count"] += 1
        if calls["count"] == 1:
            raise RuntimeError("injected decode failure")
        return original(self, model)

    monkeypatch.setattr(local._DecodeBatch, "forward", failing_once)
    with pytest.raises(RuntimeError, match="injected decode failure"):
        sharp_lm.generate(PROMPTS[0], max_new_tokens=6)
    recovered = sharp_lm.generate(PROMPTS[0], max_new_tokens=6)
    assert recovered.completion_tokens == 6


def test_growing_cache_layer_equals_concatenation():
    """The decode loop's cache layer returns what DynamicLayer's concatenation returns, through reallocations."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from nesycd.lm.local import _growing_layer_class

    torch.manual_seed(0)
    plain, growing = DynamicLayer(), DynamicLayer()
    prompt = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    plain.update(*prompt)
    growing.update(*prompt)
    growing.__class__ = _growing_layer_class()
    for step in range(150):
        if step == 70:  # a row leaves: the batch replaces the tensors, as _DecodeBatch.remove does
            for layer in (plain, growing):
                layer.keys, layer.values = layer.keys[1:], layer.values[1:]
        new = torch.randn(plain.keys.shape[0], 3, 1, 4), torch.randn(plain.keys.shape[0], 3, 1, 4)
        expected = plain.update(*new)
        actual = growing.update(*new)
        assert all(torch.equal(a, e) for a, e in zip(actual, expected)), step
    assert growing.get_seq_length() == plain.get_seq_length() == 155


def test_long_generations_equal_plain_generate(sharp_lm):
    """Generations longer than the cache's spare room, with rows joining and leaving, match `generate`."""
    import time

    limits = [150, 90, 130, 40]

    def delayed(index: int):
        time.sleep(0.02 * index)
        return sharp_lm.generate(PROMPTS[index], max_new_tokens=limits[index])

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(delayed, range(len(PROMPTS))))
    assert max(result.completion_tokens for result in results) > 100
    for prompt, limit, result in zip(PROMPTS, limits, results):
        text, tokens = _generate_alone(sharp_lm, prompt, limit)
        assert result.text == text, prompt
        assert result.completion_tokens == tokens, prompt
