"""Two-process LoRA training under `accelerate launch`, on CPU with the gloo backend."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROWS = 16
BATCH_SIZE = 4
EPOCHS = 2
PROCESSES = 2


def _accelerate_executable() -> str:
    beside_python = Path(sys.executable).with_name("accelerate")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("accelerate")
    if found is None:
        pytest.fail("The accelerate command is not installed; `pip install accelerate` provides it.")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_rows(path: Path) -> None:
    rows = [
        {
            "prompt": f"Question: What is {number} plus {number}?\nAnswer:",
            "completion": f" {2 * number}. Therefore, the answer is {2 * number}.",
            "view": "cot" if number % 2 else "answer",
        }
        for number in range(ROWS)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


@pytest.mark.slow
def test_two_process_lora_training(tiny_student, tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    _write_rows(rows_path)
    out = tmp_path / "job"
    # accelerate 1.16 starts a single process for `--cpu --num_processes 2` unless mpirun is used.
    # `--multi_gpu` selects its torchrun launcher, and train_lora then sets up a gloo group on CPU.
    command = [
        _accelerate_executable(), "launch",
        "--multi_gpu", "--num_processes", str(PROCESSES), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "nesycd.training.launch",
        "--base", str(tiny_student), "--rows", str(rows_path), "--out", str(out),
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--learning-rate", "0.01", "--bf16", "false",
    ]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]

    records = [json.loads((out / f"launch_rank{rank}.json").read_text()) for rank in range(PROCESSES)]
    assert [record["rank"] for record in records] == [0, 1]
    assert all(record["world_size"] == PROCESSES for record in records)
    assert all(record["backend"] == "gloo" for record in records)
    # Each process trains on its half of the rows, so there are half as many steps as on one process.
    steps_per_epoch = -(-ROWS // (BATCH_SIZE * PROCESSES))
    assert all(len(record["loss_curve"]) == steps_per_epoch * EPOCHS for record in records)
    # The logged loss is averaged over the processes, so both ranks log the same curve.
    assert records[0]["loss_curve"] == records[1]["loss_curve"]
    assert records[0]["adapter_sha256"] == records[1]["adapter_sha256"]

    from safetensors.torch import load_file

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in weights.items() if "lora_B" in name}
    assert lora_b, f"No LoRA B weights in the adapter; keys: {sorted(weights)[:5]}"
    assert all(float(tensor.abs().max()) > 0 for tensor in lora_b.values())
