"""Measure generated tokens/s of nesycd's in-process LM against raw `model.generate` on the same prompts.

Usage: python benchmarks/generation_throughput.py [--data-dir DIR] [--prompts 16] [--max-tokens 64]

Every mode generates greedily for the same zero-shot BBH prompts (the exact text that
`ReasonStep` sends), with the same stop strings and token limit:

- raw generate, batch 8: `model.generate` on left-padded chunks of 8 prompts, in prompt order;
- nesycd, 8 DSPy threads: `ReasonStep().batch(examples, num_threads=8)` on `make_lm(...)`, so
  the LM's worker groups concurrent requests into batched `generate` calls;
- nesycd, sequential: the same program with one thread, so every request is a batch of one;
- raw generate, batch 1 (unless --no-raw-sequential): one `model.generate` per prompt.

Tokens are the generated tokens of each request up to the end of text or the stop string,
summed over requests. Padding after a finished row is not counted. The script also checks
that the nesycd modes return the same texts as raw generation.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

for variable, value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(variable, value)

logger = logging.getLogger("benchmarks.generation_throughput")

DEFAULT_TASKS = "boolean_expressions,navigate,sports_understanding,web_of_lies,causal_judgement,date_understanding"


@dataclass
class ModeResult:
    """Tokens and wall time of one generation mode, with the texts it produced."""

    mode: str
    requests: int
    tokens: int
    seconds: float
    cpu_seconds: float
    texts: list[str]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.tokens / self.cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("NESYCD_DATA_DIR"),
                        help="Folder that contains bbh/ (default: NESYCD_DATA_DIR).")
    parser.add_argument("--model", default="smollm2-135m", help="Model name or folder, as for `--student`.")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="Comma-separated BBH tasks the prompts come from.")
    parser.add_argument("--prompts", type=int, default=16, help="Number of prompts (a multiple of 8 keeps batches full).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Generation limit per request, in tokens.")
    parser.add_argument("--threads", type=int, default=8, help="DSPy threads and raw batch size.")
    parser.add_argument("--no-raw-sequential", action="store_true", help="Skip the raw batch-1 mode.")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # DSPy warns on every response cut at max_tokens, which is most responses here.
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
    if args.data_dir is None:
        sys.exit("Pass --data-dir (the folder that contains bbh/) or set NESYCD_DATA_DIR.")

    import dspy
    import torch

    from nesycd.lm import make_lm, resolve_model
    from nesycd.lm.local import LocalModel

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    examples = load_examples(args.data_dir, args.tasks.split(","), args.prompts)
    prompts = [prompt_of(example) for example in examples]
    lm = make_lm(args.model, role="student", max_tokens=args.max_tokens)
    model = LocalModel.load(resolve_model(args.model).path, name=args.model)
    counter = CountingModel(model)
    print(f"Machine: {machine()}")
    print(f"torch threads: {torch.get_num_threads()}; model {args.model}; {len(prompts)} prompts of "
          f"{min(counter.prompt_tokens(prompts))}-{max(counter.prompt_tokens(prompts))} tokens; "
          f"max {args.max_tokens} new tokens; greedy; load average before: {load_average()}")

    warm_up(model, prompts[: args.threads])
    results = [run_raw(model, prompts, args.threads, args.max_tokens, f"raw generate, batch {args.threads}")]
    with dspy.context(lm=lm):
        results.append(run_nesycd(counter, examples, args.threads, f"nesycd, {args.threads} DSPy threads"))
        results.append(run_nesycd(counter, examples, 1, "nesycd, sequential"))
    if not args.no_raw_sequential:
        results.append(run_raw(model, prompts, 1, args.max_tokens, "raw generate, batch 1"))
    if counter.prompts_seen and set(counter.prompts_seen) != set(prompts):
        print("WARNING: the prompts nesycd generated for differ from the raw prompts.")
    print_table(results, args.threads)
    print(f"Load average after: {load_average()}")
    # Stops the model's worker thread, which would otherwise still run while the interpreter exits.
    LocalModel.unload_all()


def load_examples(data_dir: Path, tasks: list[str], count: int) -> list:
    """Return `count` BBH test examples, taken round-robin from `tasks` so lengths vary."""
    from nesycd.benchmarks import bbh

    per_task = -(-count // len(tasks))
    _, test = bbh.load_bbh(data_dir, tasks, train_per_task=0, test_per_task=per_task)
    by_task: dict[str, list] = {}
    for example in test:
        by_task.setdefault(example.task, []).append(example)
    ordered = [group[index] for index in range(per_task) for group in by_task.values() if index < len(group)]
    return [example.with_inputs("task_description", "question", "knowledge", "task")
            .copy(knowledge=[]) for example in ordered[:count]]


def prompt_of(example) -> str:
    from nesycd.adapter import format_prompt

    return format_prompt(example.task_description, example.question)


class CountingModel:
    """Wrap a `LocalModel` instance's `generate` to count generated tokens and keep the texts."""

    def __init__(self, model):
        self.model = model
        self.original = model.generate
        self.tokens = 0
        self.texts: dict[str, str] = {}
        self.prompts_seen: list[str] = []
        model.generate = self._generate

    def _generate(self, prompt, **kwargs):
        generation = self.original(prompt, **kwargs)
        self.tokens += generation.completion_tokens
        self.texts[prompt] = generation.text
        self.prompts_seen.append(prompt)
        return generation

    def reset(self) -> None:
        self.tokens = 0
        self.texts = {}
        self.prompts_seen = []

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        return [len(self.model.tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]


def warm_up(model, prompts: list[str]) -> None:
    raw_generate(model, prompts, 4)


def run_raw(model, prompts: list[str], batch_size: int, max_tokens: int, label: str) -> ModeResult:
    texts: list[str] = []
    tokens = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, len(prompts), batch_size):
        chunk_texts, chunk_tokens = raw_generate(model, prompts[start : start + batch_size], max_tokens)
        texts += chunk_texts
        tokens += chunk_tokens
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return ModeResult(label, len(prompts), tokens, seconds, cpu_seconds, texts)


def raw_generate(model, prompts: list[str], max_tokens: int) -> tuple[list[str], int]:
    """Run one plain `model.generate` on `prompts`, left-padded, with the adapter's stop strings."""
    import torch

    from nesycd.adapter import STOP_STRINGS

    tokenizer = model.tokenizer
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
        output = model.model.generate(
            **encoded,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=list(STOP_STRINGS),
            tokenizer=tokenizer,
        )
    width = encoded["input_ids"].shape[1]
    texts, tokens = [], 0
    for row in output[:, width:].tolist():
        generated = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        tokens += len(generated)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        texts.append(cut_at_stop(text))
    return texts, tokens


def cut_at_stop(text: str) -> str:
    from nesycd.adapter import STOP_STRINGS

    cuts = [text.find(stop) for stop in STOP_STRINGS if stop in text]
    return text[: min(cuts)] if cuts else text


def run_nesycd(counter: CountingModel, examples: list, threads: int, label: str) -> ModeResult:
    from nesycd.adapter import ReasonStep

    step = ReasonStep()
    counter.reset()
    started, cpu_started = time.perf_counter(), time.process_time()
    predictions = step.batch(examples, num_threads=threads, disable_progress_bar=True, max_errors=0)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    texts = [counter.texts.get(prompt_of(example), "") for example in examples]
    if len(predictions) != len(examples) or len(counter.prompts_seen) != len(examples):
        print(f"WARNING: {label} returned {len(predictions)} predictions for {len(examples)} examples.")
    return ModeResult(label, len(examples), counter.tokens, seconds, cpu_seconds, texts)


def print_table(results: list[ModeResult], threads: int) -> None:
    raw_batched = results[0]
    sequential = next(result for result in results if result.mode == "nesycd, sequential")
    print()
    print(
        f"| mode | requests | generated tokens | seconds | tokens/s | CPU seconds | tokens per CPU second | "
        f"vs raw batch {threads} (wall / CPU) | vs nesycd sequential (wall / CPU) | texts equal to raw batch {threads} |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        same = sum(a == b for a, b in zip(result.texts, raw_batched.texts))
        print(
            f"| {result.mode} | {result.requests} | {result.tokens} | {result.seconds:.1f} | "
            f"{result.tokens_per_second:.1f} | {result.cpu_seconds:.1f} | {result.tokens_per_cpu_second:.1f} | "
            f"{ratio(result, raw_batched)} | {ratio(result, sequential)} | {same}/{len(result.texts)} |"
        )
    print(
        "\nCPU seconds are the process's user and system time. On a machine shared with other work they "
        "change less with the load than wall time does."
    )


def ratio(result: ModeResult, baseline: ModeResult) -> str:
    wall = result.tokens_per_second / baseline.tokens_per_second
    cpu = result.tokens_per_cpu_second / baseline.tokens_per_cpu_second
    return f"{wall:.2f}x / {cpu:.2f}x"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        logger.debug("No /proc/cpuinfo, so the CPU model comes from platform.processor()")
    versions = ", ".join(f"{package} {metadata.version(package)}" for package in ("torch", "transformers", "dspy"))
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}; {versions}"


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
