"""The optimizers: NesyCD and the baselines it is compared with, by method name."""

from __future__ import annotations

import logging

from nesycd.errors import ConfigError
from optimizers.baselines import STEP_BY_STEP_WEIGHTS, AnswerOnly, FewShotTeacher, StdCoT, StepByStep, ZeroShot
from optimizers.nesycd import NesyCD, NesyCDConfig

logger = logging.getLogger(__name__)

# Method name -> optimizer class, as `nesycd compile --method` takes them.
METHODS = {
    "nesycd": NesyCD,
    "std_cot": StdCoT,
    "step_by_step": StepByStep,
    "answer_only": AnswerOnly,
    "zero_shot": ZeroShot,
    "teacher": FewShotTeacher,
}

# Default loss weight per fine-tuning view; a method missing here trains no weighted views.
VIEW_WEIGHTS = {
    "nesycd": {"kb_cot": 1.0, "cot": 1.0, "answer": 1.0},
    "step_by_step": dict(STEP_BY_STEP_WEIGHTS),
}

# The method whose compiled program runs the teacher model instead of the student.
TEACHER_METHODS = ("teacher",)

__all__ = [
    "METHODS",
    "TEACHER_METHODS",
    "VIEW_WEIGHTS",
    "AnswerOnly",
    "FewShotTeacher",
    "NesyCD",
    "NesyCDConfig",
    "StdCoT",
    "StepByStep",
    "ZeroShot",
    "method_class",
    "view_weights",
]


def method_class(method: str):
    """Return the optimizer class of `method`.

    Raises:
        ConfigError: the method is not in METHODS.
    """
    if method not in METHODS:
        raise ConfigError(f"Unknown method {method!r}. Pass one of: {', '.join(METHODS)}.")
    return METHODS[method]


def view_weights(method: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Return the loss weights of `method`'s fine-tuning views, with `overrides` applied.

    Raises:
        ConfigError: an override names a view the method does not train.
    """
    defaults = VIEW_WEIGHTS.get(method, {})
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) if defaults else "none"
        raise ConfigError(
            f"Method {method} trains no view {', '.join(unknown)}, so its loss weight cannot be set. "
            f"The weighted views of {method} are: {allowed}."
        )
    return {**defaults, **(overrides or {})}
