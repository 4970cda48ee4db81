"""End-to-end compile on the packaged SmolLM2-135M with real BIG-Bench Hard questions (minutes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nesycd.compile import CompileOptions, run_compile
from nesycd.tracing import query_file

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir() -> Path:
    value = os.environ.get("NESYCD_DATA_DIR")
    if not value or not (Path(value) / "bbh").is_dir():
        pytest.skip("NESYCD_DATA_DIR does not point at a folder with bbh/; the real-data compile cannot run")
    return Path(value)


def test_smollm2_compile_and_load(tmp_path, data_dir):
    import nesycd

    options = CompileOptions(
        program_file=REPO / "programs" / "bbh.py",
        data_dir=data_dir,
        student="smollm2-135m",
        teacher="smollm2-135m",
        tasks=["sports_understanding"],
        train_per_task=8,
        test_per_task=4,
        runs_dir=tmp_path,
        run_id="smollm2",
        epochs=1,
        max_tokens=96,
        teacher_max_tokens=128,
        show_progress=False,
    )
    summary = run_compile(options)

    _, rows = query_file(summary.run_dir / "traces.duckdb", "select name, status from stages order by started_at")
    assert [name for name, _ in rows][0] == "teacher_rationales"
    assert len(rows) == 6
    assert {status for _, status in rows} == {"succeeded"}
    assert set(summary.results) == {"base", "std_cot", "nesycd"}

    manifest = json.loads((summary.compiled_dir / "manifest.json").read_text())
    assert manifest["base_model"] == "smollm2-135m"

    compiled = nesycd.load(summary.compiled_dir)
    try:
        prediction = compiled("Is the following sentence plausible? \"Joao Moutinho caught the screen pass.\"")
    finally:
        compiled.close()
    assert isinstance(prediction.reasoning, str)
    assert prediction.reasoning
