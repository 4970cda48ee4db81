"""Measure knowledge-base retrieval latency and embedding throughput, and record them in benchmarks/README.md.

Usage: python benchmarks/kb_latency.py [--sizes 1000,10000,100000] [--queries 200] [--no-write]

For each size the script fills a KnowledgeStore with synthetic entries spread over 20 tasks.
It then times `search_vector` (the in-process numpy index that local stores use) with and
without a task filter, and Qdrant's own local-mode query on the same collection for
comparison. Last it times `search` with a fresh query text each time, so query embedding is
included. Sizes up to --embed-limit use real embeddings of synthetic texts. Larger sizes use
random unit vectors, since only the search cost depends on the vectors. Embedding throughput
is measured once, on --embed-sample texts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

logger = logging.getLogger("benchmarks.kb_latency")

README = Path(__file__).with_name("README.md")
START_MARKER = "<!-- kb_latency:start -->"
END_MARKER = "<!-- kb_latency:end -->"
TASKS = [f"task_{index:02d}" for index in range(20)]
WORDS = (
    "true false not and or left right step turn forward back plausible player goal pass river city capital "
    "carry add multiply number digit equation atom balance date day week month before after first last "
    "liar truth says tells object color red blue green table chair book shelf sort order word letter"
).split()


def synthetic_text(rng: random.Random, task: str) -> str:
    description = f"Solve the {task.replace('_', ' ')} problem."
    question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
    return f"{description}\n{question}?"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def timed(function, arguments: list) -> list[float]:
    """Return the milliseconds of one call of `function` per argument."""
    durations = []
    for argument in arguments:
        started = time.perf_counter()
        function(argument)
        durations.append(1000 * (time.perf_counter() - started))
    return durations


def summary(durations: list[float]) -> str:
    return f"{percentile(durations, 0.5):.2f} / {percentile(durations, 0.99):.2f}"


def embedding_throughput(embedder, sample: int) -> float:
    rng = random.Random(1)
    texts = [synthetic_text(rng, rng.choice(TASKS)) for _ in range(sample)]
    embedder.embed(texts[:64])
    started = time.perf_counter()
    embedder.embed(texts)
    return sample / (time.perf_counter() - started)


def fill_store(store, size: int, *, real_embeddings: bool) -> float:
    """Add `size` synthetic entries and return the seconds it took (embedding included when real)."""
    import numpy as np

    from nesycd.knowledge import KnowledgeEntry

    rng = random.Random(size)
    entries = []
    for index in range(size):
        task = TASKS[index % len(TASKS)]
        entries.append(
            KnowledgeEntry(
                id=f"entry-{index}", task=task, learning_summary=f"Summary {index}.",
                supplementary_knowledge=f"Knowledge {index}.", key=synthetic_text(rng, task),
            )
        )
    started = time.perf_counter()
    if real_embeddings:
        store.add(entries, dedup=False)
    else:
        vectors = np.random.default_rng(size).normal(size=(size, store.dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for start in range(0, size, 10_000):
            store.add(entries[start : start + 10_000], dedup=False, vectors=vectors[start : start + 10_000])
    return time.perf_counter() - started


def measure_size(embedder, size: int, queries: int, embed_limit: int, qdrant_queries: int, folder: Path) -> dict:
    from nesycd.knowledge import KnowledgeStore

    real = size <= embed_limit
    location = folder / f"kb-{size}" if real else ":memory:"
    with KnowledgeStore(location, embedder=embedder) as store:
        fill_seconds = fill_store(store, size, real_embeddings=real)
        # Filling leaves about a million short-lived Python objects behind (vector lists and
        # Qdrant point models). Without this collection the first timed calls pay for it, and
        # search() at 100k entries measured about 500 ms instead of about 30 ms.
        gc.collect()
        rng = random.Random(7)
        texts = [synthetic_text(rng, rng.choice(TASKS)) for _ in range(queries)]
        vectors = embedder.embed(texts)
        tasks = [rng.choice(TASKS) for _ in range(queries)]
        pairs = list(zip(vectors, tasks))

        result = {
            "size": size,
            "vectors": "embedded" if real else "random unit",
            "mode": "folder" if real else ":memory:",
            "fill_s": fill_seconds,
            "index": timed(lambda vector: store.search_vector(vector, k=3), vectors),
            "index_task": timed(lambda pair: store.search_vector(pair[0], k=3, task=pair[1]), pairs),
            # NOTE: _qdrant_search is the store's private fallback; the benchmark calls it to
            # compare with qdrant-client's own local-mode scan on the same collection.
            "qdrant": timed(lambda vector: store._qdrant_search(vector, k=3, task=None, status="active"),
                            vectors[:qdrant_queries]),
            "qdrant_task": timed(lambda pair: store._qdrant_search(pair[0], k=3, task=pair[1], status="active"),
                                 pairs[:qdrant_queries]),
        }
        fresh = [synthetic_text(rng, task) + f" {index}" for index, task in enumerate(tasks)]
        result["end_to_end_task"] = timed(lambda index: store.search(fresh[index], k=3, task=tasks[index]),
                                          list(range(queries)))
    return result


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        logger.debug("No /proc/cpuinfo, so the CPU model comes from platform.processor()")
    versions = ", ".join(
        f"{package} {metadata.version(package)}" for package in ("qdrant-client", "numpy", "sentence-transformers", "torch")
    )
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {versions}"
    )


def render(
    results: list[dict],
    throughput: float,
    sample: int,
    queries: int,
    qdrant_queries: int,
    loads: list[float],
    threads: int,
) -> str:
    command = " ".join(["python benchmarks/kb_latency.py", *sys.argv[1:]])
    lines = [
        START_MARKER,
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC with `{command}` on: "
        f"{machine()}. The 1-minute load average was {loads[0]:.1f} at the start and {loads[1]:.1f} at the end "
        f"of the run, on {os.cpu_count()} cores.",
        "",
        f"Embedding throughput (packaged all-MiniLM-L6-v2, CPU, batch 64, {threads} torch thread(s)): "
        f"**{throughput:.0f} texts/s** over {sample} synthetic keys of 10 to 26 words.",
        "",
        f"Search latency in milliseconds, p50 / p99, k=3, entries spread over {len(TASKS)} tasks "
        f"({queries} queries; {qdrant_queries} for the Qdrant scan):",
        "",
        "| entries | vectors | store | numpy index | numpy index, task filter | Qdrant local scan "
        "| Qdrant local scan, task filter | `search()` with query embedding, task filter | fill (s) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result['size']:,} | {result['vectors']} | {result['mode']} | {summary(result['index'])} "
            f"| {summary(result['index_task'])} | {summary(result['qdrant'])} | {summary(result['qdrant_task'])} "
            f"| {summary(result['end_to_end_task'])} | {result['fill_s']:.1f} |"
        )
    lines += [
        "",
        "The numpy index is what `KnowledgeStore` searches in folder and `:memory:` mode; the Qdrant scan is "
        "qdrant-client's local-mode query on the same collection, which a store uses only with "
        "`vector_index=False` (or against a server, where Qdrant's own index answers). Fill time includes "
        "embedding the keys for embedded sizes.",
        END_MARKER,
    ]
    return "\n".join(lines)


def write_readme(section: str) -> None:
    text = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    if START_MARKER in text and END_MARKER in text:
        before, rest = text.split(START_MARKER, 1)
        after = rest.split(END_MARKER, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n## Knowledge base\n\n" + section + "\n"
    README.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="Comma-separated entry counts.")
    parser.add_argument("--queries", type=int, default=200, help="Timed queries per size and search kind.")
    parser.add_argument("--qdrant-queries", type=int, default=20, help="Timed queries of the slower Qdrant scan.")
    parser.add_argument("--embed-limit", type=int, default=10_000, help="Largest size filled with real embeddings.")
    parser.add_argument("--embed-sample", type=int, default=2000, help="Texts embedded to measure throughput.")
    parser.add_argument("--no-write", action="store_true", help="Print the figures without changing README.md.")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads for embedding (default: torch's own choice).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    threads = torch.get_num_threads()

    from nesycd.knowledge import Embedder

    load_at_start = os.getloadavg()[0]
    embedder = Embedder()
    throughput = embedding_throughput(embedder, args.embed_sample)
    print(f"embedding throughput: {throughput:.0f} texts/s", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="nesycd-kb-bench-") as folder:
        for size in (int(value) for value in args.sizes.split(",")):
            result = measure_size(embedder, size, args.queries, args.embed_limit, args.qdrant_queries, Path(folder))
            results.append(result)
            print(
                f"{size:>7} entries: index {summary(result['index'])} ms, index+task {summary(result['index_task'])} ms, "
                f"qdrant {summary(result['qdrant'])} ms, qdrant+task {summary(result['qdrant_task'])} ms, "
                f"search()+task {summary(result['end_to_end_task'])} ms, fill {result['fill_s']:.1f} s",
                flush=True,
            )
    loads = [load_at_start, os.getloadavg()[0]]
    section = render(results, throughput, args.embed_sample, args.queries, args.qdrant_queries, loads, threads)
    print(section)
    if not args.no_write:
        write_readme(section)
        print(f"Wrote the figures to {README}")


if __name__ == "__main__":
    sys.exit(main())
