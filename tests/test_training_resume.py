"""LoRA training killed with SIGKILL restarts from its last checkpoint and ends where an uninterrupted job ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from nesycd.training.sft import LoraTrainingConfig, train_lora

TESTS = Path(__file__).parent
ROWS = [
    {"prompt": f"Question: what follows {i}?\nAnswer:", "completion": f" {i + 1}, then {i + 2}", "view": "cot"}
    for i in range(8)
]
CONFIG = LoraTrainingConfig(epochs=12, batch_size=2, checkpoint_steps=10)  # 48 steps

TRAIN_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from nesycd.training.sft import LoraTrainingConfig, train_lora
train_lora({model!r}, json.loads({rows!r}), {out!r}, config=LoraTrainingConfig(**json.loads({config!r})))
"""


def start_training(model: Path, out: Path) -> subprocess.Popen:
    from dataclasses import asdict

    script = TRAIN_SCRIPT.format(
        tests=str(TESTS), model=str(model), rows=json.dumps(ROWS), out=str(out), config=json.dumps(asdict(CONFIG))
    )
    return subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_checkpoint(process: subprocess.Popen, checkpoints: Path, min_step: int, timeout_s: float = 240) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended before the kill: {process.stderr.read().decode()[-2000:]}"
        steps = [int(path.parent.name.split("-")[1]) for path in checkpoints.glob("checkpoint-*/trainer_state.json")]
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of step >= {min_step} in {checkpoints} after {timeout_s} s")


def test_killed_training_resumes(tiny_student, tmp_path):
    uninterrupted = train_lora(tiny_student, ROWS, tmp_path / "uninterrupted", config=CONFIG)
    assert uninterrupted.resumed_from_step is None

    process = start_training(tiny_student, tmp_path / "killed")
    reached = wait_for_checkpoint(process, tmp_path / "killed" / "checkpoints", min_step=20)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (tmp_path / "killed" / "adapter").exists()
    assert reached < 48

    resumed = train_lora(tiny_student, ROWS, tmp_path / "killed", config=CONFIG)
    assert resumed.resumed_from_step is not None
    assert resumed.resumed_from_step >= 20
    steps_after_resume = [point["step"] for point in resumed.loss_curve if point["step"] > resumed.resumed_from_step]
    assert steps_after_resume[0] == resumed.resumed_from_step + 1
    assert steps_after_resume[-1] == 48

    expected = load_file(str(uninterrupted.adapter_dir / "adapter_model.safetensors"))
    actual = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6), name
    assert not (tmp_path / "killed" / "checkpoints").exists()


def test_other_job_checkpoints_discarded(tiny_student, tmp_path):
    process = start_training(tiny_student, tmp_path / "job")
    wait_for_checkpoint(process, tmp_path / "job" / "checkpoints", min_step=10)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    other_rows = [{**row, "completion": row["completion"] + "."} for row in ROWS]
    result = train_lora(tiny_student, other_rows, tmp_path / "job", config=LoraTrainingConfig(epochs=1, batch_size=4))
    assert result.resumed_from_step is None
    assert [point["step"] for point in result.loss_curve] == [1, 2]


def test_incomplete_checkpoint_skipped(tiny_student, tmp_path):
    process = start_training(tiny_student, tmp_path / "job")
    reached = wait_for_checkpoint(process, tmp_path / "job" / "checkpoints", min_step=20)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    newest = tmp_path / "job" / "checkpoints" / f"checkpoint-{reached}"
    (newest / "trainer_state.json").unlink()  # as if the kill came during the save

    result = train_lora(tiny_student, ROWS, tmp_path / "job", config=CONFIG)
    assert result.resumed_from_step is not None
    assert result.resumed_from_step < reached
    assert result.loss_curve[-1]["step"] == 48
