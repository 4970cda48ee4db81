"""Program files: the reference program loads, and incomplete files fail with a message naming the gap."""

from __future__ import annotations

import textwrap
from pathlib import Path

import dspy
import pytest

from nesycd.errors import ProgramError
from nesycd.knowledge import DenseRetriever, NoRetriever
from nesycd.program import load_program

REPO = Path(__file__).resolve().parents[1]

HEADER = """
import dspy
from nesycd import DenseRetriever, ReasonStep

class P(dspy.Module):
    def __init__(self):
        super().__init__()
        self.retriever = DenseRetriever()
        self.reason = ReasonStep()

    def forward(self, question, task, task_description):
        return self.reason(task_description=task_description, question=question, knowledge=[], task=task)

def load_data(data_dir, *, tasks=None, train_per_task=None, test_per_task=None):
    return [], []

def metric(example, prediction, trace=None):
    return True
"""


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_reference_program_loads():
    spec = load_program(REPO / "programs" / "bbh.py")
    assert isinstance(spec.program, dspy.Module)
    assert isinstance(spec.program.retriever, DenseRetriever)
    assert spec.defaults["tasks"]
    assert len(spec.source_sha256) == 64


def test_retriever_swaps_in_one_line():
    spec = load_program(REPO / "programs" / "bbh.py")
    spec.program.retriever = NoRetriever()
    assert spec.program.retriever.config() == {"kind": "none"}


def test_missing_file(tmp_path):
    with pytest.raises(ProgramError, match="not found"):
        load_program(tmp_path / "absent.py")


def test_missing_program(tmp_path):
    with pytest.raises(ProgramError, match="`program`"):
        load_program(write(tmp_path, HEADER))


def test_missing_metric(tmp_path):
    body = HEADER.replace("def metric(", "def scorer(") + "\nprogram = P()\n"
    with pytest.raises(ProgramError, match="`metric`"):
        load_program(write(tmp_path, body))


def test_program_not_module(tmp_path):
    with pytest.raises(ProgramError, match="not a dspy.Module"):
        load_program(write(tmp_path, HEADER + "\nprogram = 3\n"))


def test_program_without_retriever(tmp_path):
    body = HEADER + "\nprogram = P()\ndel program.retriever\n"
    with pytest.raises(ProgramError, match="retriever"):
        load_program(write(tmp_path, body))


def test_program_without_reason_step(tmp_path):
    body = HEADER + "\nprogram = P()\nprogram.reason = dspy.Predict('question -> answer')\n"
    with pytest.raises(ProgramError, match="ReasonStep"):
        load_program(write(tmp_path, body))


def test_import_error_names_file(tmp_path):
    path = write(tmp_path, "import no_such_module_xyz\n")
    with pytest.raises(ProgramError, match="prog.py failed to import"):
        load_program(path)
