"""The command line: help, and clear errors with exit code 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def nesycd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def test_help_lists_commands():
    result = nesycd("--help")
    assert result.returncode == 0
    for command in ("compile", "run", "traces", "kb"):
        assert command in result.stdout


def test_missing_data_dir_is_clear(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "NESYCD_DATA_DIR"}
    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "compile", str(REPO / "programs" / "bbh.py"), "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    assert "NESYCD_DATA_DIR" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_program_file_is_clear(tmp_path):
    result = nesycd("compile", str(tmp_path / "nope.py"), "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "nope.py not found" in result.stderr


def test_run_without_manifest_is_clear(tmp_path):
    result = nesycd("run", str(tmp_path), "What is 2+2?")
    assert result.returncode == 2
    assert "manifest.json" in result.stderr


def test_traces_missing_file_is_clear(tmp_path):
    result = nesycd("traces", str(tmp_path / "missing.duckdb"))
    assert result.returncode == 2
    assert "missing.duckdb" in result.stderr
