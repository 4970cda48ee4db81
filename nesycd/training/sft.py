"""LoRA supervised fine-tuning with TRL and PEFT: completion-only loss with per-view loss weights."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nesycd.errors import TrainingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTrainingConfig:
    """LoRA fine-tuning settings.

    Args:
        rank: LoRA rank r.
        alpha: LoRA scaling alpha.
        dropout: dropout on the LoRA input.
        target_modules: PEFT target modules; "all-linear" adapts every linear layer but the head.
        learning_rate: peak learning rate (constant after `warmup_steps`).
        epochs: passes over the rows.
        batch_size: rows per optimizer step.
        max_length: longer rows are cut to this many tokens.
        warmup_steps: linear warm-up steps.
        seed: seed for the LoRA initialisation and the row order.
        bf16: bf16 autocast. None picks it when the hardware has native bf16 (a CUDA GPU that supports
            it, or a CPU with AVX512-BF16), where it is faster; LoRA master weights stay fp32.
        gradient_checkpointing: trade compute for memory.
        checkpoint_steps: save a resumable checkpoint (adapter, optimizer, scheduler and RNG state)
            every this many optimizer steps. None saves about ten per job, and at least one every step
            for jobs of ten steps or fewer.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "all-linear"
    learning_rate: float = 1e-3
    epochs: float = 2.0
    batch_size: int = 8
    max_length: int = 1024
    warmup_steps: int = 0
    seed: int = 42
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    checkpoint_steps: int | None = None


@dataclass
class TrainingResult:
    """The adapter, its hash, row counts and loss curve of one LoRA job."""

    adapter_dir: Path
    adapter_sha256: str
    n_rows: int
    rows_by_view: dict[str, int]
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    resumed_from_step: int | None = None


def train_lora(
    base_model: str | Path,
    rows: list[dict],
    output_dir: str | Path,
    *,
    config: LoraTrainingConfig | None = None,
    view_weights: dict[str, float] | None = None,
) -> TrainingResult:
    """Train a fresh LoRA adapter on prompt/completion rows and save it to `output_dir`.

    Each row is a dict with `prompt`, `completion` and `view`. The loss covers completion tokens
    only. Each row's token losses are multiplied by the weight of its view (default 1.0), and the
    batch loss is their sum divided by the number of completion tokens.

    Checkpoints go to `output_dir/checkpoints` every `config.checkpoint_steps` steps. When that
    folder holds a complete checkpoint of the same job (same base model, rows, config and weights),
    training restarts from the newest one instead of from step 0; the checkpoints of another job
    are deleted. They are deleted after a successful job too.

    Raises:
        TrainingError: no rows, a row without prompt/completion, or a negative weight.
    """
    config = config or LoraTrainingConfig()
    view_weights = dict(view_weights or {})
    _check_rows(rows, view_weights)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    checkpoint_dir = output_dir / "checkpoints"
    resume_from = _resumable_checkpoint(checkpoint_dir, _job_fingerprint(base_model, rows, config, view_weights))
    total_steps = math.ceil(len(rows) / config.batch_size) * max(1, math.ceil(config.epochs))
    checkpoint_steps = config.checkpoint_steps or max(1, total_steps // 10)

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)

    dataset = Dataset.from_list(
        [
            {"prompt": row["prompt"], "completion": row["completion"], "loss_weight": float(view_weights.get(row["view"], 1.0))}
            for row in rows
        ]
    )
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=config.warmup_steps,
        max_length=config.max_length,
        logging_steps=1,
        save_strategy="steps",
        save_steps=checkpoint_steps,
        # Two, because a kill during a save leaves the newest one incomplete.
        save_total_limit=2,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        bf16=_resolve_bf16(config.bf16),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.gradient_checkpointing,
        completion_only_loss=True,
        # Batches of similar lengths waste less compute on padding than random batches.
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    peft_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    trainer = _weighted_trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.data_collator = _WeightedCollator(trainer.data_collator)
    resumed_from_step = None
    if resume_from is not None:
        resumed_from_step = int(resume_from.name.split("-")[-1])
        logger.info("Resuming LoRA training from %s (step %d)", resume_from, resumed_from_step)
    try:
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    except RuntimeError as error:
        raise TrainingError(f"LoRA training on {len(rows)} rows from {base_model} failed: {error}") from error

    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    loss_curve = [
        {"step": entry["step"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry
    ]
    (output_dir / "loss_curve.json").write_text(json.dumps(loss_curve, indent=1))
    (output_dir / "training_config.json").write_text(
        json.dumps({"base_model": str(base_model), "config": asdict(config), "view_weights": view_weights}, indent=1)
    )
    rows_by_view: dict[str, int] = {}
    for row in rows:
        rows_by_view[row["view"]] = rows_by_view.get(row["view"], 0) + 1
    seconds = time.perf_counter() - started
    logger.info("Trained LoRA on %d rows in %.1f s; adapter in %s", len(rows), seconds, adapter_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)

    del trainer, model
    return TrainingResult(
        adapter_dir=adapter_dir,
        adapter_sha256=adapter_sha256(adapter_dir),
        n_rows=len(rows),
        rows_by_view=rows_by_view,
        loss_curve=loss_curve,
        train_seconds=seconds,
        resumed_from_step=resumed_from_step,
    )


def _job_fingerprint(base_model, rows: list[dict], config: LoraTrainingConfig, view_weights: dict) -> str:
    payload = json.dumps([str(base_model), rows, asdict(config), view_weights], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _resumable_checkpoint(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """Return the newest complete checkpoint of the job `fingerprint`, after clearing what cannot be resumed.

    The folder's job.json names the job that wrote its checkpoints. Checkpoints of another job are
    deleted, and so is a checkpoint that lacks one of the files the Trainer writes (a kill during
    the save).
    """
    job_file = checkpoint_dir / "job.json"
    if checkpoint_dir.exists():
        try:
            same_job = json.loads(job_file.read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            same_job = False
        if not same_job:
            shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps({"fingerprint": fingerprint}))

    complete = []
    for candidate in checkpoint_dir.glob("checkpoint-*"):
        required = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors")
        if candidate.name.split("-")[-1].isdigit() and all((candidate / name).exists() for name in required):
            complete.append(candidate)
        else:
            logger.warning("Deleting incomplete checkpoint %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
    if not complete:
        return None
    return max(complete, key=lambda path: int(path.name.split("-")[-1]))


def _resolve_bf16(requested: bool | None) -> bool:
    import torch

    if requested is not None:
        return requested
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(native and native())


def adapter_sha256(adapter_dir: str | Path) -> str:
    """Return the sha256 of the adapter weights file (adapter_model.safetensors)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_rows(rows: list[dict], view_weights: dict[str, float]) -> None:
    if not rows:
        raise TrainingError("No training rows. The previous stage produced nothing to fine-tune on.")
    for index, row in enumerate(rows):
        for key in ("prompt", "completion", "view"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise TrainingError(f"Training row {index} has no {key!r} text: {str(row)[:200]}")
    for view, weight in view_weights.items():
        if weight < 0:
            raise TrainingError(f"Loss weight for view {view!r} is {weight}; weights must be >= 0.")


class _WeightedCollator:
    """Wraps TRL's collator and adds the per-row `loss_weight` tensor it would drop."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.base([{key: value for key, value in row.items() if key != "loss_weight"} for row in examples])
        batch["loss_weight"] = torch.tensor([float(row.get("loss_weight", 1.0)) for row in examples])
        return batch


_TRAINER_CLASS = None


def _weighted_trainer_class():
    """Build (once) an SFTTrainer subclass whose loss multiplies each row's tokens by its weight."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS

    import torch
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "loss_weight" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "loss_weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("loss_weight", None)
            if weights is None or bool(torch.all(weights == 1.0)):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            outputs = model(**inputs, fused_lm_head=True)
            per_token_loss = -outputs.log_probs * weights.to(outputs.log_probs.dtype)[:, None]
            num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
            return (loss, outputs) if return_outputs else loss

    _TRAINER_CLASS = WeightedSFTTrainer
    return _TRAINER_CLASS
