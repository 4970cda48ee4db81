"""LoRA fine-tuning: weights change where they should and nowhere else; row checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nesycd.errors import TrainingError
from nesycd.training.sft import LoraTrainingConfig, adapter_sha256, train_lora

ROWS = [
    {"prompt": f"Question: {i} + 1?\nAnswer:", "completion": f" {i + 1}", "view": "answer" if i % 2 else "cot"}
    for i in range(8)
]


def test_lora_changes_only_adapter(tiny_student, tmp_path):
    before = load_file(str(tiny_student / "model.safetensors"))
    result = train_lora(tiny_student, ROWS, tmp_path / "job", config=LoraTrainingConfig(epochs=2, batch_size=4))
    after = load_file(str(tiny_student / "model.safetensors"))
    lora = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = [tensor for name, tensor in lora.items() if "lora_B" in name]
    assert lora_b
    assert any(float(tensor.abs().max()) > 0 for tensor in lora_b)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_loss_curve_and_counts(tiny_student, tmp_path):
    result = train_lora(tiny_student, ROWS, tmp_path / "job", config=LoraTrainingConfig(epochs=1, batch_size=4))
    assert len(result.loss_curve) == 2
    assert result.rows_by_view == {"cot": 4, "answer": 4}
    assert result.adapter_sha256 == adapter_sha256(result.adapter_dir)
    saved = json.loads((tmp_path / "job" / "training_config.json").read_text())
    assert saved["config"]["rank"] == 8


def test_zero_weights_zero_loss(tiny_student, tmp_path):
    result = train_lora(
        tiny_student, ROWS, tmp_path / "job", config=LoraTrainingConfig(epochs=1, batch_size=4),
        view_weights={"cot": 0.0, "answer": 0.0},
    )
    assert all(point["loss"] == 0.0 for point in result.loss_curve)


def test_weight_scales_loss(tiny_student, tmp_path):
    config = LoraTrainingConfig(epochs=1, batch_size=8, learning_rate=1e-9)
    plain = train_lora(tiny_student, ROWS, tmp_path / "plain", config=config)
    halved = train_lora(tiny_student, ROWS, tmp_path / "half", config=config, view_weights={"cot": 0.5, "answer": 0.5})
    assert halved.loss_curve[0]["loss"] == pytest.approx(plain.loss_curve[0]["loss"] / 2, rel=1e-3)


def test_empty_rows_rejected(tiny_student, tmp_path):
    with pytest.raises(TrainingError, match="No training rows"):
        train_lora(tiny_student, [], tmp_path / "job")


def test_row_without_completion_rejected(tiny_student, tmp_path):
    with pytest.raises(TrainingError, match="completion"):
        train_lora(tiny_student, [{"prompt": "x", "completion": "", "view": "cot"}], tmp_path / "job")


def test_negative_weight_rejected(tiny_student, tmp_path):
    with pytest.raises(TrainingError, match="-1"):
        train_lora(tiny_student, ROWS, tmp_path / "job", view_weights={"cot": -1.0})


def test_loss_on_completion_positions_equals_trl_loss(tiny_student, tmp_path, caplog, monkeypatch):
    """The trainer's own loss and TRL's loss (its fallback) agree on the same batch."""
    from nesycd.training.sft import _weighted_trainer_class

    config = LoraTrainingConfig(epochs=1, batch_size=8, learning_rate=1e-9)  # bf16 autocast where the CPU has it
    weights = {"cot": 0.25, "answer": 1.0}
    with caplog.at_level("INFO", logger="nesycd.training.sft"):
        own = train_lora(tiny_student, ROWS, tmp_path / "own", config=config, view_weights=weights)
        assert "does not reproduce" not in caplog.text
        # A head that scales the logits, as some architectures do in their forward, fails the
        # trainer's check, and the job falls back to TRL's loss on the very same weights.
        trainer_class = _weighted_trainer_class()
        own_head = trainer_class._output_head
        monkeypatch.setattr(trainer_class, "_output_head", lambda self, model: lambda h: 2 * own_head(self, model)(h))
        fallback = train_lora(tiny_student, ROWS, tmp_path / "fallback", config=config, view_weights=weights)
        assert "does not reproduce" in caplog.text
    assert own.loss_curve[0]["loss"] == pytest.approx(fallback.loss_curve[0]["loss"], rel=1e-5)


def test_length_sorted_sampler():
    from nesycd.training.sft import _LengthSortedSampler

    lengths = [5, 40, 12, 33, 7, 21, 40, 3, 18, 26]
    sampler = _LengthSortedSampler(lengths, batch_size=3, seed=7)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(lengths)))
        assert order == list(sampler)  # the same epoch gives the same order (resuming relies on it)
        batches = [order[start : start + 3] for start in range(0, len(order), 3)]
        assert {lengths[index] for index in batches[0]} == {40, 33}  # the longest rows come first
        spans = sorted(lengths, reverse=True)
        expected = [sorted(spans[start : start + 3]) for start in range(0, len(spans), 3)]
        assert sorted(sorted(lengths[index] for index in batch) for batch in batches) == sorted(expected)
        orders.append(order)
    assert len({tuple(order) for order in orders}) > 1


def test_length_grouping_is_opt_in(tiny_student, tmp_path):
    """Random batches by default; LoraTrainingConfig(group_by_length=True) switches to length-sorted ones."""
    from nesycd.training.sft import _LengthSortedSampler, _weighted_trainer_class

    samplers = []
    trainer_class = _weighted_trainer_class()
    original = trainer_class._get_train_sampler

    def record(self, train_dataset=None):
        samplers.append(original(self, train_dataset))
        return samplers[-1]

    trainer_class._get_train_sampler = record
    try:
        config = LoraTrainingConfig(epochs=1, batch_size=4)
        train_lora(tiny_student, ROWS, tmp_path / "random", config=config)
        train_lora(tiny_student, ROWS, tmp_path / "sorted", config=LoraTrainingConfig(epochs=1, batch_size=4, group_by_length=True))
    finally:
        trainer_class._get_train_sampler = original
    assert not isinstance(samplers[0], _LengthSortedSampler)
    assert isinstance(samplers[-1], _LengthSortedSampler)
