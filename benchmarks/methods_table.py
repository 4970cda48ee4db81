"""Compile every method on one configuration, evaluate each program, and write the side-by-side report.

One command makes the whole table: for each method it runs `nesycd compile programs/paper.py
--method M` (same student, teacher, data and epochs for all), then `nesycd evaluate` on the
in-domain and out-of-domain benchmarks, then `nesycd compare` on all evaluations. Each step is
a separate process, so the memory of one training run is freed before the next. A finished
compile is skipped and an evaluation resumes where it stopped, so rerunning the same command
after an interruption continues the table.

    python benchmarks/methods_table.py --data-dir ../shared/data --out docs/results/cpu-six-methods

The report gets a section with this command and the wall time of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAM = REPO / "programs" / "paper.py"
METHODS = ("zero_shot", "teacher", "answer_only", "std_cot", "step_by_step", "nesycd")
UNTRAINED = ("zero_shot", "teacher")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="Folder holding bbh/, gsm8k/, arc/ and agieval/.")
    parser.add_argument("--out", type=Path, required=True, help="Folder for report.md and the plots.")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/methods-table"), help="Folder for the run folders.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated methods, in table order.")
    parser.add_argument("--tasks", default="sports_understanding,causal_judgement,navigate,gsm8k",
                        help="Training tasks of programs/paper.py: BBH task names and gsm8k.")
    parser.add_argument("--train-per-task", default="6",
                        help="Training questions per task; a comma-separated list trains every method at each size.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Epochs of every fine-tuning.")
    parser.add_argument("--per-dataset", type=int, default=8, help="Evaluation questions per data set.")
    parser.add_argument("--max-tokens", type=int, default=96, help="Student generation limit, in tokens.")
    parser.add_argument("--teacher-max-tokens", type=int, default=192, help="Teacher generation limit, in tokens.")
    parser.add_argument("--student", default="smollm2-135m", help="Student model.")
    parser.add_argument("--teacher", default="gemma3-270m", help="Teacher model.")
    parser.add_argument("--threads", type=int, default=8, help="Concurrent requests per step.")
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="CPU threads per step (sets OMP_NUM_THREADS); 1 is several times faster on a machine that other "
        "jobs share, because idle threads of an oversubscribed CPU spin (default: torch's own choice).",
    )
    parser.add_argument("--title", default="Six methods on one CPU-sized configuration", help="Report title.")
    return parser.parse_args(argv)


def build_steps(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """Return (name, argv) of every compile and evaluate step, then the compare step."""
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    sizes = [int(size) for size in args.train_per_task.split(",")]
    several_sizes = len(sizes) > 1
    nesycd = [sys.executable, "-m", "nesycd.cli.main"]
    steps, evaluations = [], []
    for method in methods:
        for size in sizes[:1] if method in UNTRAINED else sizes:
            run_id = f"{method}-n{size}" if several_sizes and method not in UNTRAINED else method
            run_dir = args.runs_dir / PROGRAM.stem / run_id
            label = run_id
            compile_step = [
                *nesycd, "compile", str(PROGRAM), "--method", method, "--data-dir", args.data_dir,
                "--student", args.student, "--teacher", args.teacher, "--tasks", args.tasks,
                "--train-per-task", str(size), "--test-per-task", "0", "--epochs", str(args.epochs),
                "--max-tokens", str(args.max_tokens), "--teacher-max-tokens", str(args.teacher_max_tokens),
                "--threads", str(args.threads), "--runs-dir", str(args.runs_dir), "--run-id", run_id,
            ]
            if not (run_dir / "compiled" / "manifest.json").is_file():
                steps.append((f"compile {run_id}", compile_step))
            steps.append((f"evaluate {run_id}", [
                *nesycd, "evaluate", str(run_dir / "compiled"), "--data-dir", args.data_dir,
                "--per-dataset", str(args.per_dataset), "--threads", str(args.threads), "--label", label,
            ]))
            evaluations.append(str(run_dir))
    steps.append(("compare", [
        *nesycd, "compare", *evaluations, "--out", str(args.out), "--title", args.title,
        "--command", command_line(),
    ]))
    return steps


def command_line() -> str:
    """Return the command that started this script, relative to the repository when possible."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    machine = describe_machine()
    started = time.perf_counter()
    timings = []
    environment = dict(os.environ)
    if args.torch_threads is not None:
        environment["OMP_NUM_THREADS"] = str(args.torch_threads)
    for name, step in build_steps(args):
        print(f"\n=== {name}: {shlex.join(step[2:])}", flush=True)
        step_started = time.perf_counter()
        result = subprocess.run(step, cwd=REPO, env=environment)
        seconds = time.perf_counter() - step_started
        timings.append((name, seconds))
        if result.returncode != 0:
            print(f"Step '{name}' failed with exit code {result.returncode}; rerun the same command to resume.",
                  file=sys.stderr)
            return result.returncode
    total = time.perf_counter() - started
    append_timings(args.out / "report.md", timings, total, machine)
    (args.out / "timings.json").write_text(json.dumps({"steps": dict(timings), "total_seconds": total}, indent=1))
    print(f"\nWrote {args.out / 'report.md'} in {total / 60:.1f} min")
    return 0


def describe_machine() -> str:
    """Return the CPU model, core count, memory and load average of this machine, for the report."""
    cpu = "unknown CPU"
    memory = "unknown memory"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), {memory}, load average {load} at the start"


def append_timings(report: Path, timings: list[tuple[str, float]], total: float, machine: str) -> None:
    """Append the machine and the wall time of every step to the report."""
    lines = ["", "## Wall time", "", f"Machine: {machine}.", "",
             "Seconds per step of this command (a compile already finished by an earlier attempt is not listed).", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in timings]
    lines += [f"| **total** | {total:.0f} |", ""]
    with report.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
