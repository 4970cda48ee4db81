"""Measure few-shot chain-of-thought accuracy of candidate teachers on a BBH sample.

Usage:
    python benchmarks/teacher_accuracy.py --data-dir ../shared/data --per-task 4 smollm2-135m gemma3-270m

Each model answers the same questions (the first N training-split questions of each task) with the
task's three BBH chain-of-thought exemplars in the prompt, greedy decoding, through nesycd's own
reasoning adapter. It prints accuracy per task and overall, and the wall time per model.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from nesycd.lm import make_lm, offline_environment

SAMPLE_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "logical_deduction_three_objects",
    "navigate", "object_counting", "sports_understanding", "web_of_lies",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model names, e.g. smollm2-135m gemma3-270m")
    parser.add_argument("--data-dir", default=None, help="folder holding bbh/ (default: NESYCD_DATA_DIR)")
    parser.add_argument("--per-task", type=int, default=4, help="questions per task")
    parser.add_argument("--tasks", default=",".join(SAMPLE_TASKS), help="comma-separated BBH tasks")
    parser.add_argument("--max-tokens", type=int, default=192, help="generation limit per answer")
    args = parser.parse_args()
    offline_environment()

    from nesycd.adapter import ReasonStep
    from nesycd.benchmarks import bbh
    from nesycd.benchmarks.answers import answers_match
    from nesycd.data_dir import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    tasks = args.tasks.split(",")
    trainset, _ = bbh.load_bbh(data_dir, tasks, train_per_task=args.per_task, test_per_task=0)
    demos = [demo for task in tasks for demo in bbh.load_cot_demos(data_dir, task)]

    print(f"{len(trainset)} questions from {len(tasks)} tasks, 3-shot CoT, greedy, max {args.max_tokens} tokens")
    for name in args.models:
        step = ReasonStep()
        step.demos = demos
        step.lm = make_lm(name, role="teacher", max_tokens=args.max_tokens)
        started = time.perf_counter()

        def answer(example):
            prediction = step(
                task_description=example.task_description, question=example.question, knowledge=[], task=example.task
            )
            return answers_match(prediction.answer, example.answer, example.answer_type)

        with ThreadPoolExecutor(8) as pool:
            correct = list(pool.map(answer, trainset))
        seconds = time.perf_counter() - started
        per_task = {task: [] for task in tasks}
        for example, ok in zip(trainset, correct):
            per_task[example.task].append(ok)
        print(f"\n{name}: {sum(correct)}/{len(correct)} = {sum(correct) / len(correct):.1%} in {seconds:.0f} s")
        for task, results in per_task.items():
            print(f"  {task:36s} {sum(results)}/{len(results)}")


if __name__ == "__main__":
    main()
