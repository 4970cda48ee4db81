"""Measure what tracing adds to LM calls of the in-process LM: A/B wall time and the callback's own cost.

Usage:
    python benchmarks/tracing_overhead.py [--model smollm2-135m] [--calls 32] [--threads 8] [--max-tokens 32]

Prints two tables:
- A/B: the same calls with and without the TraceCallback (rounds alternate to spread machine noise).
- Callback cost: the time that on_lm_start, on_lm_end and the queued insert take per call, measured
  directly over many calls, next to the mean latency of one LM call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "not ( True ) and ( True ) is",
    "True and not not ( not False ) is",
    "If you follow these instructions, do you return to the starting point? Take 3 steps. Turn around. Take 3 steps.",
    "Is the following sentence plausible? \"Joao Moutinho caught the screen pass in the NFC championship.\"",
    "Question: Fidel tells the truth. Jerry says Fidel tells the truth. Does Jerry tell the truth?",
    "How would a typical person answer each of the following questions about causation? Did the wind cause the fire?",
    "False or not ( True ) and False is",
    "Take 1 step. Take 2 steps. Take 3 steps. Turn around. Take 6 steps. Do you return to the starting point?",
]


def prompts(count: int) -> list[str]:
    return [
        f"Answer the question. Think step by step.\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]} (variant {i})\nAnswer:"
        for i in range(count)
    ]


def timed_calls(lm, texts: list[str], threads: int) -> float:
    from nesycd.parallel import run_parallel

    started = time.perf_counter()
    outcomes = run_parallel(lambda text: lm(text), texts, threads=threads, show_progress=False)
    errors = [outcome.error for outcome in outcomes if outcome.error]
    if errors:
        raise SystemExit(f"{len(errors)} LM calls failed; first: {errors[0]}")
    return time.perf_counter() - started


def ab_rounds(lm, texts, threads: int, rounds: int, trace_path: Path) -> tuple[list[float], list[float], dict]:
    import dspy

    from nesycd.tracing import TraceCallback, TraceStore

    store = TraceStore(trace_path)
    store.start_run("overhead", program="benchmarks/tracing_overhead.py", command="", config={})
    callback = TraceCallback(store)
    plain, traced = [], []
    timed_calls(lm, texts[: threads], threads)  # warm-up: weights in cache, kernels compiled
    for _ in range(rounds):
        with dspy.context(callbacks=[]):
            plain.append(timed_calls(lm, texts, threads))
        with dspy.context(callbacks=[callback]):
            with store.stage("benchmark"):
                traced.append(timed_calls(lm, texts, threads))
    store.close()
    return plain, traced, store.write_stats()


def callback_cost(calls: int, trace_path: Path) -> float:
    """Return the mean seconds that one traced LM call spends in the callback and the queued insert."""
    from nesycd.tracing import TraceCallback, TraceStore
    from nesycd.tracing.usage import set_usage

    class FakeLM:
        model = "local/benchmark"
        nesycd_role = "student"
        kwargs = {"temperature": 0.0, "max_tokens": 32}

    store = TraceStore(trace_path)
    store.start_run("callback", program="benchmarks/tracing_overhead.py", command="", config={})
    callback = TraceCallback(store)
    instance = FakeLM()
    prompt = prompts(1)[0] * 4  # a few hundred tokens, like a few-shot prompt
    output = [{"text": "Let's think step by step. " * 8}]
    started = time.perf_counter()
    with store.stage("benchmark"):
        for index in range(calls):
            call_id = f"call-{index}"
            callback.on_lm_start(call_id, instance, {"prompt": prompt, "kwargs": {}})
            set_usage(300, 32, cache_hit=False)
            callback.on_lm_end(call_id, output)
    seconds = (time.perf_counter() - started) / calls
    store.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="Packaged model id or local model folder.")
    parser.add_argument("--calls", type=int, default=32, help="LM calls per round.")
    parser.add_argument("--threads", type=int, default=8, help="Concurrent calls (batched by the in-process LM).")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating untraced and traced rounds.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Generation limit per call, in tokens.")
    parser.add_argument("--callback-calls", type=int, default=5000, help="Calls for the direct callback measurement.")
    args = parser.parse_args()

    import logging

    import torch

    from nesycd.lm import make_lm

    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # one warning per response cut at max_tokens

    lm = make_lm(args.model, role="student", max_tokens=args.max_tokens)
    texts = prompts(args.calls)
    with tempfile.TemporaryDirectory() as folder:
        plain, traced, stats = ab_rounds(lm, texts, args.threads, args.rounds, Path(folder) / "ab.duckdb")
        per_call = callback_cost(args.callback_calls, Path(folder) / "callback.duckdb")

    plain_median, traced_median = statistics.median(plain), statistics.median(traced)
    call_latency = plain_median * args.threads / args.calls  # each call waits for its batch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, model {args.model}")
    print()
    print("| run | rounds (s) | median (s) |")
    print("|---|---|---|")
    print(f"| untraced | {', '.join(f'{value:.2f}' for value in plain)} | {plain_median:.2f} |")
    print(f"| traced | {', '.join(f'{value:.2f}' for value in traced)} | {traced_median:.2f} |")
    print(f"\nA/B difference: {100 * (traced_median - plain_median) / plain_median:+.1f}% "
          f"({args.calls} calls x {args.rounds} rounds, {args.threads} threads; rows written: {stats['rows_written']})")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| callback + queued insert per LM call | {per_call * 1e6:.0f} us |")
    print(f"| mean LM call latency ({args.threads} threads) | {call_latency * 1e3:.0f} ms |")
    print(f"| callback share of one call | {100 * per_call / call_latency:.3f}% |")


if __name__ == "__main__":
    main()
