"""Time how long `nesycd --help`, `nesycd traces RUN` and `nesycd kb list RUN` take to finish.

Usage: python benchmarks/startup.py [--repeats 5] [--importtime]

The script first builds a small run folder in a temporary directory: a `traces.duckdb`
written with `nesycd.tracing.TraceStore` (one run, two stages) and a Qdrant KB in `kb/` with
three entries, written with `nesycd.knowledge.KnowledgeStore`. It then runs each command
--repeats times as a fresh `nesycd` process and prints the wall time of each. The target is
under 1.5 s per command. With --importtime it also runs each command once under
`python -X importtime` and lists the imports with the largest cumulative time, which is
where a slow command loses its time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 1.5
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "TOKENIZERS_PARALLELISM": "false",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Runs per command.")
    parser.add_argument("--importtime", action="store_true", help="Also list the slowest imports of each command.")
    parser.add_argument("--top", type=int, default=12, help="Imports listed per command with --importtime.")
    args = parser.parse_args()
    os.environ.update({key: os.environ.get(key, value) for key, value in ENVIRONMENT.items()})

    nesycd = shutil.which("nesycd", path=str(Path(sys.executable).parent)) or shutil.which("nesycd")
    if nesycd is None:
        sys.exit("The nesycd command is not installed; run `pip install -e .` in the repository first.")

    with tempfile.TemporaryDirectory(prefix="nesycd-startup-") as folder:
        run_dir = build_run_folder(Path(folder) / "run")
        commands = {
            "nesycd --help": [nesycd, "--help"],
            "nesycd traces RUN": [nesycd, "traces", str(run_dir)],
            "nesycd kb list RUN": [nesycd, "kb", "list", str(run_dir)],
        }
        print(f"Machine: {machine()}; load average before: {load_average()}")
        results = {label: time_command(command, args.repeats) for label, command in commands.items()}
        print_table(results, args.repeats)
        print(f"Load average after: {load_average()}")
        if args.importtime:
            for label, command in commands.items():
                print_slowest_imports(label, command[1:], args.top)


def build_run_folder(run_dir: Path) -> Path:
    """Write a run folder with a small trace file and a three-entry KB, as a compile leaves it."""
    from nesycd.knowledge import Embedder, KnowledgeEntry, KnowledgeStore
    from nesycd.tracing import TraceStore

    run_dir.mkdir(parents=True)
    traces = TraceStore(run_dir / "traces.duckdb")
    traces.start_run("startup-bench", program="programs/bbh.py", command="nesycd compile programs/bbh.py", config={})
    for name in ("teacher_rationales", "sft_general"):
        with traces.stage(name, fingerprint=name):
            pass
    traces.finish_run("succeeded")
    traces.close()

    entries = [
        KnowledgeEntry(
            task=task,
            learning_summary=f"Read every statement of the {task} question before answering.",
            supplementary_knowledge="1. Evaluate 'not' before 'and'.\n2. Track each value separately.",
            key=f"{task}: an example question",
        )
        for task in ("boolean_expressions", "navigate", "web_of_lies")
    ]
    with KnowledgeStore(run_dir / "kb", embedder=Embedder()) as store:
        store.add(entries, dedup=False)
    return run_dir


def time_command(command: list[str], repeats: int) -> list[float]:
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        durations.append(time.perf_counter() - started)
        if finished.returncode != 0:
            sys.exit(f"{' '.join(command)} failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    return durations


def print_table(results: dict[str, list[float]], repeats: int) -> None:
    print()
    print(f"| command | median (s) | min (s) | max (s) | under {TARGET_S} s |")
    print("|---|---:|---:|---:|---|")
    for label, durations in results.items():
        median = statistics.median(durations)
        print(
            f"| `{label}` | {median:.2f} | {min(durations):.2f} | {max(durations):.2f} | "
            f"{'yes' if median < TARGET_S else 'no'} |"
        )
    print(f"\n{repeats} runs per command, each a fresh process.")


def print_slowest_imports(label: str, arguments: list[str], top: int) -> None:
    """Run the command under `python -X importtime` and print its imports with the largest cumulative time."""
    code = "import sys; from nesycd.cli.main import main; sys.argv = ['nesycd'] + sys.argv[1:]; main()"
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *arguments], capture_output=True, text=True
    )
    rows = []
    for line in finished.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        # Lines read "import time: <self us> | <cumulative us> | <two spaces per nesting level><module>".
        self_us, cumulative_us, name = line[len("import time:"):].split("|", 2)
        rows.append((int(cumulative_us), name[1:], int(self_us)))
    print(f"\nSlowest top-level imports of `{label}` (cumulative ms):")
    top_level = [row for row in rows if not row[1].startswith(" ")]
    for cumulative_us, name, _ in sorted(top_level, reverse=True)[:top]:
        print(f"  {cumulative_us / 1000:8.1f}  {name}")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    for line in lines:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}"


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
