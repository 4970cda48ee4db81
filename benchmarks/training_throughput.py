"""Measure trained tokens/s and peak RSS of nesycd's LoRA SFT against a plain PyTorch loop on the same batches.

Usage: python benchmarks/training_throughput.py [--data-dir DIR] [--rows 32] [--epochs 1] [--batch-size 8]

The rows are the three fine-tuning views (knowledge + question -> rationale, question ->
rationale, question -> answer) of the BBH chain-of-thought exemplars of the tasks in --tasks,
built with `nesycd.adapter.training_row` as a compile builds them. Two child processes run
one after the other, so that each one's peak RSS is its own:

1. `sft`: `nesycd.training.sft.train_lora` with the compile's settings. The script records
   every batch that TRL's collator builds, the torch thread count, whether bf16 autocast was
   on, and the wall time of `trainer.train()`.
2. `plain`: the same base model with the same LoRA config (PEFT `get_peft_model`), trained by a
   plain loop of forward, backward, `AdamW.step` and `zero_grad` over the very batches that
   step 1 recorded, with the same autocast setting.
3. `plain, sorted batches` (unless --skip-sorted): the same loop over the same rows regrouped
   into batches of similar length (all rows sorted by length, then cut into batches), which
   shows how much of the time padding costs.

Trained tokens are the non-padding tokens of the batches (prompt and completion), summed over
steps. All runs train on the same tokens, so the ratio of tokens/s is the inverse ratio of
train time. The script also prints how much of each batch is padding, and what share
random batches or one batch padded to the longest row would pad.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

for variable, value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(variable, value)

logger = logging.getLogger("benchmarks.training_throughput")

DEFAULT_TASKS = "boolean_expressions,navigate,sports_understanding,web_of_lies,causal_judgement,date_understanding"
# A stand-in for a retrieved knowledge-base entry, about as long as the ones a teacher writes.
KNOWLEDGE = (
    "Learning Summary: Work through the statements one at a time and keep track of every value, "
    "instead of guessing from the last statement.\n"
    "Supplementary Knowledge:\n"
    "1. A statement that calls a liar's claim false is true.\n"
    "2. Evaluate 'not' before 'and', and 'and' before 'or'.\n"
    "3. Count steps in each direction separately and compare the totals at the end."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("NESYCD_DATA_DIR"),
                        help="Folder that contains bbh/ (default: NESYCD_DATA_DIR).")
    parser.add_argument("--model", default="smollm2-135m", help="Base model name or folder.")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="Comma-separated BBH tasks whose exemplars become rows.")
    parser.add_argument("--rows", type=int, default=32, help="Number of training rows.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Passes over the rows.")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per optimizer step.")
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                        help="bf16 autocast; auto lets train_lora decide (on with AVX512-BF16).")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Turn on gradient checkpointing in both runs.")
    parser.add_argument("--group-by-length", action="store_true",
                        help="Train nesycd's SFT on length-sorted batches (LoraTrainingConfig.group_by_length).")
    parser.add_argument("--checkpoint-steps", type=int, default=None,
                        help="Passed to LoraTrainingConfig.checkpoint_steps (default: train_lora's choice); "
                        "a number above the step count turns resumable checkpoints off.")
    parser.add_argument("--skip-plain", action="store_true", help="Run only nesycd's SFT (for its peak RSS).")
    parser.add_argument("--skip-sorted", action="store_true", help="Skip the plain loop over length-sorted batches.")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads in the workers (default: torch's choice, one per core).")
    parser.add_argument("--worker", choices=["sft", "plain", "sorted"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.worker is not None and args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.worker == "sft":
        run_sft_worker(args)
        return
    if args.worker in ("plain", "sorted"):
        run_plain_worker(args, sort_rows=args.worker == "sorted")
        return
    if args.data_dir is None:
        sys.exit("Pass --data-dir (the folder that contains bbh/) or set NESYCD_DATA_DIR.")

    with tempfile.TemporaryDirectory(prefix="nesycd-train-bench-") as folder:
        workdir = Path(folder)
        rows = build_rows(args.data_dir, args.tasks.split(","), args.rows)
        (workdir / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
        print(f"Machine: {machine()}")
        print(f"Load average before: {load_average()}")
        sft = run_worker("sft", args, workdir)
        plain = None if args.skip_plain else run_worker("plain", args, workdir)
        ordered = None if args.skip_plain or args.skip_sorted else run_worker("sorted", args, workdir)
        print_report(args, sft, plain, ordered)
        print(f"Load average after: {load_average()}")


def build_rows(data_dir: Path, tasks: list[str], count: int) -> list[dict]:
    """Return `count` rows: each exemplar in three views, exemplars taken task by task in turn."""
    from nesycd.adapter import training_row
    from nesycd.benchmarks import bbh

    demos_by_task = [bbh.load_cot_demos(data_dir, task) for task in tasks]
    rows = []
    for index in range(max(len(demos) for demos in demos_by_task)):
        for demos in demos_by_task:
            if index >= len(demos):
                continue
            demo = demos[index]
            for view in ("kb_cot", "cot", "answer"):
                row = training_row(
                    view,
                    task_description=demo.task_description,
                    question=demo.question,
                    reasoning=demo.reasoning,
                    answer=demo.answer,
                    knowledge=[KNOWLEDGE],
                )
                rows.append({**row, "view": view})
    if len(rows) < count:
        raise SystemExit(f"The tasks {tasks} give only {len(rows)} rows. Pass more --tasks or fewer --rows.")
    return random.Random(0).sample(rows, count)


def run_worker(kind: str, args: argparse.Namespace, workdir: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", kind, "--workdir", str(workdir), "--model", args.model,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--bf16", args.bf16,
    ]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    if args.group_by_length:
        command.append("--group-by-length")
    if args.torch_threads is not None:
        command += ["--torch-threads", str(args.torch_threads)]
    if args.checkpoint_steps is not None:
        command += ["--checkpoint-steps", str(args.checkpoint_steps)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"The {kind} worker failed (exit {finished.returncode}):\n{finished.stderr[-4000:]}")
    result = json.loads((workdir / f"{kind}.json").read_text())
    result["process_seconds"] = time.perf_counter() - started
    return result


def training_config(args: argparse.Namespace):
    from nesycd.training.sft import LoraTrainingConfig

    bf16 = {"auto": None, "true": True, "false": False}[args.bf16]
    extra = {} if args.checkpoint_steps is None else {"checkpoint_steps": args.checkpoint_steps}
    return LoraTrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        bf16=bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        group_by_length=args.group_by_length,
        **extra,
    )


def run_sft_worker(args: argparse.Namespace) -> None:
    """Train with train_lora, recording the collated batches and the time spent in trainer.train()."""
    import torch
    from safetensors.torch import save_file

    from nesycd.lm import resolve_model
    from nesycd.training import sft

    if not hasattr(sft, "_WeightedCollator") or not hasattr(sft, "_weighted_trainer_class"):
        sys.exit("nesycd.training.sft no longer has _WeightedCollator and _weighted_trainer_class; update this benchmark.")
    rows = [json.loads(line) for line in (args.workdir / "rows.jsonl").read_text().splitlines() if line.strip()]
    batches: list[dict] = []
    observed: dict = {}

    collate = sft._WeightedCollator.__call__

    def recording_collate(self, examples):
        batch = collate(self, examples)
        batches.append({key: value.clone() for key, value in batch.items() if isinstance(value, torch.Tensor)})
        observed.setdefault("torch_threads_in_training", torch.get_num_threads())
        return batch

    sft._WeightedCollator.__call__ = recording_collate
    trainer_class = sft._weighted_trainer_class()
    train = trainer_class.train

    def timed_train(self, *train_args, **train_kwargs):
        started, cpu_started = time.perf_counter(), time.process_time()
        output = train(self, *train_args, **train_kwargs)
        observed["train_seconds"] = time.perf_counter() - started
        observed["train_cpu_seconds"] = time.process_time() - cpu_started
        observed["bf16"] = bool(self.args.bf16)
        observed["gradient_checkpointing"] = bool(self.args.gradient_checkpointing)
        observed["steps"] = int(self.state.global_step)
        observed["checkpoint_steps"] = self.args.save_steps if self.args.save_strategy != "no" else None
        observed["trainer_metrics"] = {key: float(value) for key, value in output.metrics.items()}
        return output

    trainer_class.train = timed_train
    base = resolve_model(args.model).path
    started = time.perf_counter()
    result = sft.train_lora(base, rows, args.workdir / "sft-job", config=training_config(args))
    observed["train_lora_seconds"] = time.perf_counter() - started

    batches = batches[: observed["steps"]]
    save_file(
        {f"{index}.{key}": value.contiguous() for index, batch in enumerate(batches) for key, value in batch.items()},
        str(args.workdir / "batches.safetensors"),
    )
    observed.update(
        batch_shapes=[list(batch["input_ids"].shape) for batch in batches],
        row_tokens=[batch["attention_mask"].sum(dim=1).tolist() for batch in batches],
        batch_keys=sorted(batches[0]) if batches else [],
        loss_first=result.loss_curve[0]["loss"] if result.loss_curve else None,
        loss_last=result.loss_curve[-1]["loss"] if result.loss_curve else None,
        peak_rss_mib=peak_rss_mib(),
        torch_threads=torch.get_num_threads(),
        sft_module=sft.__file__,
    )
    (args.workdir / "sft.json").write_text(json.dumps(observed))


def run_plain_worker(args: argparse.Namespace, *, sort_rows: bool) -> None:
    """Train the same LoRA model with a plain forward/backward/step loop over the recorded batches.

    With `sort_rows`, the recorded rows are regrouped into batches of similar length first.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nesycd.lm import resolve_model
    from nesycd.training.sft import _resolve_bf16

    recorded = json.loads((args.workdir / "sft.json").read_text())
    tensors = load_file(str(args.workdir / "batches.safetensors"))
    batches = [
        {key: tensors[f"{index}.{key}"] for key in ("input_ids", "attention_mask", "labels")}
        for index in range(len(recorded["batch_shapes"]))
    ]
    if sort_rows:
        batches = length_sorted_batches(batches, args.batch_size)
    config = training_config(args)
    bf16 = _resolve_bf16(config.bf16)
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model).path, dtype=torch.float32)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(
        model,
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    model.train()

    losses = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    (args.workdir / f"{args.worker}.json").write_text(
        json.dumps(
            {
                "train_seconds": seconds,
                "train_cpu_seconds": cpu_seconds,
                "steps": len(batches),
                "batch_shapes": [list(batch["input_ids"].shape) for batch in batches],
                "bf16": bf16,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "peak_rss_mib": peak_rss_mib(),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def length_sorted_batches(batches: list[dict], batch_size: int) -> list[dict]:
    """Return the rows of `batches` regrouped longest first into batches of `batch_size`, right-padded."""
    import torch

    rows = []
    for batch in batches:
        for index in range(batch["input_ids"].shape[0]):
            real = batch["attention_mask"][index].bool()
            rows.append((batch["input_ids"][index][real], batch["labels"][index][real]))
    rows.sort(key=lambda row: len(row[0]), reverse=True)
    regrouped = []
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        width = len(group[0][0])
        input_ids = torch.zeros((len(group), width), dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(group):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = row_labels
            attention_mask[row, : len(ids)] = 1
        regrouped.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return regrouped


def print_report(args: argparse.Namespace, sft: dict, plain: dict | None, ordered: dict | None) -> None:
    shapes = sft["batch_shapes"]
    real_tokens = sum(sum(row) for row in sft["row_tokens"])
    padded_tokens = sum(rows * width for rows, width in shapes)
    lengths = [tokens for batch in sft["row_tokens"] for tokens in batch]

    print(
        f"{len(lengths)} rows per epoch x {args.epochs:g} epochs, batch size {args.batch_size}, rows of "
        f"{min(lengths)}-{max(lengths)} tokens; bf16 autocast: {sft['bf16']}; gradient checkpointing: "
        f"{sft['gradient_checkpointing']}; torch threads in training: {sft['torch_threads_in_training']}; "
        f"checkpoint_steps: {sft['checkpoint_steps']}"
    )
    print()
    print(
        "| run | steps | trained tokens | padded positions | seconds in training loop | trained tokens/s | "
        "CPU seconds | vs plain loop (wall / CPU) | loss first -> last | peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")

    runs = [("nesycd SFT (trainer.train)", sft)]
    runs += [("plain PyTorch loop, same batches", plain)] if plain else []
    runs += [("plain PyTorch loop, length-sorted batches", ordered)] if ordered else []
    for label, run in runs:
        positions = sum(rows * width for rows, width in run.get("batch_shapes", shapes))
        ratio = "-"
        if plain:
            ratio = (
                f"{plain['train_seconds'] / run['train_seconds']:.2f}x / "
                f"{plain['train_cpu_seconds'] / run['train_cpu_seconds']:.2f}x"
            )
        print(
            f"| {label} | {run['steps']} | {real_tokens} | {positions} | {run['train_seconds']:.1f} | "
            f"{real_tokens / run['train_seconds']:.1f} | {run['train_cpu_seconds']:.1f} | {ratio} | "
            f"{run['loss_first']:.3f} -> {run['loss_last']:.3f} | {run['peak_rss_mib']:.0f} |"
        )

    print()
    print(f"train_lora wall time including model load and adapter save: {sft['train_lora_seconds']:.1f} s "
          f"({sft['sft_module']})")

    print()
    print("Padding (share of batch positions that are padding):")
    print(f"- the batches nesycd's SFT trained on (each padded to its longest row): {1 - real_tokens / padded_tokens:.1%} "
          f"of {padded_tokens} positions; batch shapes {shapes}")
    print(f"- the same rows in random batches (seed 0): {padding_share(lengths, args.batch_size, order='random'):.1%}")
    print(f"- the same rows sorted by length: {padding_share(lengths, args.batch_size, order='sorted'):.1%}")
    longest = max(lengths)
    print(f"- every row padded to the longest row ({longest} tokens): {1 - sum(lengths) / (longest * len(lengths)):.1%}")


def padding_share(lengths: list[int], batch_size: int, *, order: str) -> float:
    ordered = list(lengths)
    if order == "random":
        random.Random(0).shuffle(ordered)
    else:
        ordered.sort(reverse=True)
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    positions = sum(len(batch) * max(batch) for batch in batches)
    return 1 - sum(ordered) / positions


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        logger.debug("No /proc/cpuinfo, so the CPU model comes from platform.processor()")
    versions = ", ".join(f"{package} {metadata.version(package)}" for package in ("torch", "transformers", "trl", "peft"))
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}; {versions}"


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
