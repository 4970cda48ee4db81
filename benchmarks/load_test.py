"""Load-test `nesycd serve`: concurrent clients, a fixed request count, throughput and latency percentiles.

Usage:
    python benchmarks/load_test.py runs/bbh/<run-id>/compiled --clients 1,8 --requests 64 --endpoint chat
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 64 --endpoint answer

With PATH the script starts `nesycd serve PATH` on a free loopback port and stops it at the end;
with --url it uses a running server. Each client thread keeps one HTTP/1.1 connection and sends
requests until the fixed count is used up. For every client count it prints throughput, p50 and
p99 latency, generated tokens per second (chat) and errors, then checks that every request got
exactly one 200 response, that the server counted exactly the requests sent (only when no other
client uses the server), and that GET /health still returns "ok". Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)

    def call(self, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def close(self) -> None:
        self.connection.close()


def boolean_question(rng: random.Random) -> str:
    words = [rng.choice(["True", "False"])]
    for _ in range(rng.randint(1, 3)):
        words += [rng.choice(["and", "or"]), rng.choice(["", "not "]) + rng.choice(["True", "False"])]
    return " ".join(words) + " is"


def build_payloads(endpoint: str, count: int, model: str, max_tokens: int, seed: int) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    payloads = []
    for _ in range(count):
        question = boolean_question(rng)
        if endpoint == "answer":
            payloads.append(("/v1/answer", {"question": question}))
        else:
            prompt = (
                "Evaluate the result of a random Boolean expression. Think step by step, then finish with "
                f'"Therefore, the answer is X." where X is the final answer.\n\nQuestion: {question}\n'
                "Answer: Let's think step by step."
            )
            payloads.append(("/v1/chat/completions", {
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            }))
    return payloads


def run_load(url: str, payloads: list[tuple[str, dict]], clients: int, timeout_s: float) -> dict:
    """Send every payload once from `clients` threads; return counts, latencies and the wall time."""
    next_index = iter(range(len(payloads)))
    index_lock = threading.Lock()
    results: list[tuple[int, int, float, int]] = []  # (payload index, status, seconds, completion tokens)
    errors: Counter = Counter()
    results_lock = threading.Lock()

    def worker() -> None:
        client = Client(url, timeout_s)
        try:
            while True:
                with index_lock:
                    index = next(next_index, None)
                if index is None:
                    return
                path, payload = payloads[index]
                started = time.perf_counter()
                try:
                    status, body = client.call("POST", path, payload)
                except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
                    with results_lock:
                        errors[type(error).__name__] += 1
                    client.close()
                    client = Client(url, timeout_s)
                    continue
                seconds = time.perf_counter() - started
                tokens = (body or {}).get("usage", {}).get("completion_tokens", 0) if status == 200 else 0
                with results_lock:
                    results.append((index, status, seconds, tokens))
                    if status != 200:
                        errors[f"HTTP {status}"] += 1
        finally:
            client.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started

    ok = [result for result in results if result[1] == 200]
    latencies = sorted(result[2] for result in ok)
    answered = Counter(result[0] for result in results)
    return {
        "clients": clients,
        "requests": len(payloads),
        "ok": len(ok),
        "errors": dict(errors),
        "lost": len(payloads) - len(answered),
        "duplicated": sum(1 for count in answered.values() if count > 1),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "p50_s": round(percentile(latencies, 50), 3),
        "p99_s": round(percentile(latencies, 99), 3),
        "max_s": round(latencies[-1], 3) if latencies else 0.0,
        "completion_tokens_per_s": round(sum(result[3] for result in ok) / wall, 1) if wall > 0 else 0.0,
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Return the q-th percentile by linear interpolation between closest ranks (0.0 for no values)."""
    if not sorted_values:
        return 0.0
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="compiled folder or model folder to serve (omit with --url)")
    parser.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=("chat", "answer"), default="chat", help="endpoint to load")
    parser.add_argument("--clients", default="8", help="comma-separated concurrent client counts, e.g. 1,8")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each chat request")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated questions")
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    args = parser.parse_args()
    if bool(args.path) == bool(args.url):
        parser.error("pass either PATH (the script starts a server) or --url (a running server)")
    client_counts = [int(value) for value in args.clients.split(",")]
    if args.requests < 1 or any(count < 1 for count in client_counts):
        parser.error("--requests and every --clients value must be positive")

    from nesycd.lm import offline_environment

    offline_environment()
    server = None
    if args.path:
        from nesycd.serve import ServerProcess

        limit = args.requests * len(client_counts) + 10 * len(client_counts) + 10
        server = ServerProcess(args.path, args=["--max-requests", str(limit), "--max-seconds", "3600"])
        url = server.url
        print(f"started nesycd serve at {url} (log: {server.log_path})")
    else:
        url = args.url.rstrip("/")

    checks_passed = True
    report = {"url": url, "endpoint": args.endpoint, "runs": []}
    try:
        probe = Client(url, args.timeout)
        status, _ = probe.call("GET", "/health")
        status_models, models = probe.call("GET", "/v1/models")
        if status != 200 or status_models != 200:
            print(f"server not ready: /health {status}, /v1/models {status_models}", file=sys.stderr)
            return 1
        model = models["data"][0]["id"]
        warmup = build_payloads(args.endpoint, 1, model, args.max_tokens, seed=args.seed + 999)[0]
        warm_status, _ = probe.call("POST", *warmup)
        print(f"model {model}; warm-up request {warm_status}")

        for clients in client_counts:
            _, before = probe.call("GET", "/health")
            payloads = build_payloads(args.endpoint, args.requests, model, args.max_tokens, seed=args.seed + clients)
            result = run_load(url, payloads, clients, args.timeout)
            health_status, after = probe.call("GET", "/health")
            # The first /health call counts in `after` but not in `before`.
            result["server_counted"] = after["requests"] - before["requests"] - 1
            result["health_after"] = after.get("status") if health_status == 200 else f"HTTP {health_status}"
            report["runs"].append(result)
            tokens = f" tokens/s={result['completion_tokens_per_s']}" if args.endpoint == "chat" else ""
            print(
                f"clients={clients:3d} requests={result['requests']} ok={result['ok']} errors={result['errors'] or 0} "
                f"lost={result['lost']} wall={result['wall_s']:.2f}s throughput={result['throughput_rps']:.2f} req/s "
                f"p50={result['p50_s']:.3f}s p99={result['p99_s']:.3f}s{tokens} "
                f"server_counted={result['server_counted']} health={result['health_after']}"
            )
            checks = {
                "all requests answered with 200": result["ok"] == result["requests"] and not result["errors"],
                "nothing lost or duplicated": result["lost"] == 0 and result["duplicated"] == 0,
                "health ok after the load": result["health_after"] == "ok",
            }
            if server is not None:
                checks["server counted every request"] = result["server_counted"] == result["requests"]
            for name, passed in checks.items():
                if not passed:
                    checks_passed = False
                    print(f"  check failed: {name}", file=sys.stderr)
        probe.close()
    finally:
        if server is not None:
            code = server.stop()
            print(f"stopped nesycd serve (exit code {code})")

    report["checks_passed"] = checks_passed
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
    print("all checks passed" if checks_passed else "some checks failed")
    return 0 if checks_passed else 1


if __name__ == "__main__":
    sys.exit(main())
