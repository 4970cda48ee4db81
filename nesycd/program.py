"""Load a program file: a `dspy.Module` named `program`, plus `load_data` and `metric`."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nesycd.errors import ProgramError

logger = logging.getLogger(__name__)

REQUIRED = {
    "program": "a dspy.Module instance whose forward retrieves, reasons and answers",
    "load_data": "a function load_data(data_dir, *, tasks, train_per_task, test_per_task) -> (trainset, testset)",
    "metric": "a function metric(example, prediction, trace=None) -> bool",
}


@dataclass
class ProgramSpec:
    """The objects a program file defines, with its path and source hash."""

    path: Path
    name: str
    program: Any
    load_data: Callable
    metric: Callable
    load_demos: Callable | None = None
    defaults: dict = field(default_factory=dict)
    source_sha256: str = ""


def load_program(path: str | Path, *, attribute: str = "program") -> ProgramSpec:
    """Import a program file by path and check it defines what the optimizer needs.

    Raises:
        ProgramError: the file is missing, fails to import, or lacks `program`, `load_data`,
            `metric`, a `retriever` attribute on the program, or a `ReasonStep` predictor.
    """
    import dspy

    from nesycd.adapter import ReasonStep

    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"Program file {path} not found. Pass the path of a .py file, e.g. programs/bbh.py.")
    source = path.read_bytes()
    module_name = f"nesycd_program_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any error in user code becomes one ProgramError naming the file
        raise ProgramError(f"Program file {path} failed to import: {type(error).__name__}: {error}") from error

    required = {"program": attribute, "load_data": "load_data", "metric": "metric"}
    missing = [name for key, name in required.items() if not hasattr(module, name)]
    if missing:
        details = "; ".join(f"`{name}` ({REQUIRED[key]})" for key, name in required.items() if name in missing)
        raise ProgramError(f"Program file {path} defines no {details}. Define them at module level.")

    program = getattr(module, attribute)
    if not isinstance(program, dspy.Module):
        raise ProgramError(
            f"`{attribute}` in {path} is a {type(program).__name__}, not a dspy.Module instance. "
            "Assign an instance, e.g. `program = MyProgram()`."
        )
    if not hasattr(program, "retriever"):
        raise ProgramError(
            f"`{attribute}` in {path} has no `retriever` attribute. Set `self.retriever = DenseRetriever()` "
            "(or NoRetriever()) in its __init__ and call it in forward."
        )
    if not any(isinstance(predictor, ReasonStep) for _, predictor in program.named_predictors()):
        raise ProgramError(
            f"`{attribute}` in {path} has no nesycd.ReasonStep predictor. Add `self.reason = ReasonStep()` and "
            "call it in forward; the optimizer fine-tunes the LM behind it."
        )
    for name in ("load_data", "metric"):
        if not callable(getattr(module, name)):
            raise ProgramError(f"`{name}` in {path} is not callable; it must be {REQUIRED[name]}.")

    return ProgramSpec(
        path=path,
        name=path.stem,
        program=program,
        load_data=module.load_data,
        metric=module.metric,
        load_demos=getattr(module, "load_demos", None),
        defaults=dict(getattr(module, "DEFAULTS", {}) or {}),
        source_sha256=hashlib.sha256(source).hexdigest(),
    )


@contextmanager
def lms_detached(program):
    """Set every predictor's LM to None for the duration, then restore them.

    Local LMs hold loaded models and threads, which neither `deepcopy` nor `dump_state` can handle.
    """
    saved = [(predictor, predictor.lm) for predictor in program.predictors()]
    for predictor, _ in saved:
        predictor.lm = None
    try:
        yield program
    finally:
        for predictor, lm in saved:
            predictor.lm = lm
