"""Adaptive retrieval: retrieve only when the student is unsure, judged by its own token probabilities."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import dspy

from nesycd.errors import KnowledgeBaseError

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 68.0
DEFAULT_PROBE_TOKENS = 16
DEFAULT_SWEEP_THRESHOLDS = (0.0, 20.0, 40.0, 60.0, 68.0, 80.0, 90.0, 100.0)


def probe_prompt(query: str) -> str:
    """Render the student's prompt without knowledge for a retrieval query.

    Programs query the retriever with "<task description>\\n<question>" (see programs/bbh.py),
    so the text before the first line break is the task description. A query without a
    line break is taken as the question alone.
    """
    from nesycd.adapter import format_prompt

    description, separator, question = query.partition("\n")
    if not separator:
        description, question = "", query
    return format_prompt(description, question)


class _Probe:
    """The confidence function of an attached LM, shared (not copied) by program copies."""

    def __init__(self, function: Callable[[str, int], float], label: str) -> None:
        self.function = function
        self.label = label

    def __call__(self, prompt: str, max_new_tokens: int) -> float:
        return float(self.function(prompt, max_new_tokens))

    def __deepcopy__(self, memo: dict[int, Any]) -> _Probe:
        return self

    def __repr__(self) -> str:
        return f"_Probe({self.label})"


def _make_probe(lm: Any) -> _Probe:
    """Wrap a LocalModel, a dspy.LM served by nesycd's LocalEngine, or any object with probe_confidence."""
    if hasattr(lm, "probe_confidence"):
        return _Probe(lambda prompt, tokens: lm.probe_confidence(prompt, max_new_tokens=tokens), repr(lm))
    engine = getattr(lm, "engine", None)
    model = getattr(engine, "model", None)
    if model is not None and hasattr(model, "probe_confidence"):
        adapter = getattr(engine, "adapter", None)
        return _Probe(
            lambda prompt, tokens: model.probe_confidence(prompt, max_new_tokens=tokens, adapter=adapter),
            f"{getattr(lm, 'model', model)!s} adapter={adapter}",
        )
    raise KnowledgeBaseError(
        f"AdaptiveRetriever needs the student's token probabilities, but the LM {getattr(lm, 'model', lm)!r} is not "
        "served in-process by nesycd (a packaged model, a local folder or a cached hub id). Use such a student, "
        "or use a retriever that is not adaptive."
    )


class AdaptiveRetriever(dspy.Module):
    """Retriever that calls its `inner` retriever only when the student's confidence is at most `threshold`.

    Confidence is the mean, over up to `max_new_tokens` greedily generated tokens, of
    100 * (p_top1 - p_top2), from the student's answer to its prompt without knowledge
    (see `probe_prompt`). It lies in [0, 100]. The output has the fields of the inner
    retriever plus `retrieved` (the decision), `confidence` and `threshold`. When it
    does not retrieve, the passages, ids and scores are empty and `k` is 0. The probe
    LM is set with `attach_lm(program, lm)` and is shared by program copies.
    """

    nesycd_retriever = True
    kind = "adaptive"

    def __init__(
        self,
        inner: dspy.Module,
        threshold: float = DEFAULT_THRESHOLD,
        max_new_tokens: int = DEFAULT_PROBE_TOKENS,
    ) -> None:
        super().__init__()
        if not getattr(inner, "nesycd_retriever", False) or not hasattr(inner, "retrieve"):
            raise KnowledgeBaseError(
                f"AdaptiveRetriever inner must be a nesycd retriever (DenseRetriever, BM25Retriever, "
                f"HybridRetriever or NoRetriever), got {type(inner).__name__}."
            )
        if isinstance(inner, AdaptiveRetriever):
            raise KnowledgeBaseError("AdaptiveRetriever cannot wrap another AdaptiveRetriever. Pass its inner retriever.")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise KnowledgeBaseError(f"AdaptiveRetriever threshold must be a number from 0 to 100, got {threshold!r}.")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise KnowledgeBaseError(
                f"AdaptiveRetriever max_new_tokens must be a positive integer, got {max_new_tokens!r}."
            )
        self.inner = inner
        self.threshold = float(threshold)
        self.max_new_tokens = max_new_tokens
        self._probe: _Probe | None = None

    @property
    def store(self) -> Any:
        """Store bound to the inner retriever."""
        return self.inner.store

    @property
    def probe_attached(self) -> bool:
        """Whether `attach_lm` has set the probe LM."""
        return self._probe is not None

    def bind(self, store: Any) -> AdaptiveRetriever:
        """Bind the inner retriever to `store` and return self."""
        self.inner.bind(store)
        return self

    def attach(self, lm: Any) -> AdaptiveRetriever:
        """Use `lm` (a LocalModel, or a dspy.LM served in-process by nesycd) for the confidence probe."""
        self._probe = _make_probe(lm)
        return self

    def config(self) -> dict[str, Any]:
        """Return the settings as a dict that `make_retriever` accepts."""
        return {
            "kind": self.kind,
            "threshold": self.threshold,
            "max_new_tokens": self.max_new_tokens,
            "inner": self.inner.config(),
        }

    def confidence(self, query: str) -> float:
        """Return the student's confidence, from 0 to 100, on the question in `query`."""
        if self._probe is None:
            raise KnowledgeBaseError(
                "AdaptiveRetriever has no probe LM. Call nesycd.knowledge.attach_lm(program, lm) with the "
                "student's LM after setting it on the program."
            )
        return self._probe(probe_prompt(query), self.max_new_tokens)

    def forward(self, query: str, task: str | None = None) -> dspy.Prediction:
        return self.retrieve(query, task)

    def retrieve(self, query: str, task: str | None = None) -> dspy.Prediction:
        """Probe the student and call the inner retriever only when confidence <= threshold."""
        confidence = self.confidence(query)
        retrieved = confidence <= self.threshold
        if retrieved:
            result = self.inner.retrieve(query, task)
            fields = {name: result[name] for name in ("passages", "ids", "scores", "inserted_ids", "k")}
        else:
            fields = {"passages": [], "ids": [], "scores": [], "inserted_ids": [], "k": 0}
        logger.debug("Adaptive retrieval: confidence %.1f, threshold %.1f, retrieved %s", confidence,
                     self.threshold, retrieved)
        return dspy.Prediction(
            **fields, query=query, task=task, retrieved=retrieved, confidence=confidence, threshold=self.threshold
        )


def attach_lm(program: dspy.Module, lm: Any) -> int:
    """Set `lm` as the confidence probe of every AdaptiveRetriever in `program`; return how many were set.

    A program without an AdaptiveRetriever is left as it is, whatever `lm` is.
    """
    attached = 0
    for _, module in program.named_sub_modules(type_=AdaptiveRetriever):
        module.attach(lm)
        attached += 1
    if attached:
        logger.debug("Attached the confidence probe to %d adaptive retrievers", attached)
    return attached


@dataclass
class SweepRow:
    """Accuracy of adaptive retrieval at one threshold."""

    threshold: float
    n: int
    retrieved: int
    accuracy: float

    @property
    def retrieval_rate(self) -> float:
        """Share of questions for which the inner retriever was called."""
        return self.retrieved / self.n if self.n else 0.0


@dataclass
class SweepResult:
    """Per-question confidence and correctness with and without knowledge, and the accuracy per threshold."""

    rows: list[SweepRow]
    confidences: list[float]
    correct_with: list[bool]
    correct_without: list[bool]


def sweep_thresholds(
    program: dspy.Module,
    examples: Iterable[dspy.Example],
    metric: Callable[..., Any],
    *,
    thresholds: Iterable[float] = DEFAULT_SWEEP_THRESHOLDS,
    lm: Any = None,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
) -> SweepResult:
    """Report the accuracy of adaptive retrieval at each threshold for a program with a bound retriever.

    Each question is answered twice, with the program's retriever (the inner one of an
    AdaptiveRetriever) and with none, and the student is probed once. With greedy
    decoding, the prediction at threshold t is the one with knowledge when confidence <= t
    and the one without otherwise, so this equals a run per threshold at two runs' cost.
    `lm` is the probe LM (default: the program's LM) and `probe_tokens` the tokens it generates.
    The program's retriever is restored afterwards.
    """
    from nesycd.knowledge.retrievers import NoRetriever

    thresholds = [float(value) for value in thresholds]
    if not thresholds:
        raise KnowledgeBaseError("sweep_thresholds needs at least one threshold, for example 68.")
    original = program.retriever
    inner = original.inner if isinstance(original, AdaptiveRetriever) else original
    if getattr(inner, "store", None) is None:
        raise KnowledgeBaseError(
            f"sweep_thresholds needs a program whose retriever is bound to a knowledge base, got "
            f"{type(inner).__name__} without a store. Load a compiled program with nesycd.load(...)."
        )
    probe = AdaptiveRetriever(inner, max_new_tokens=probe_tokens).attach(lm if lm is not None else program.get_lm())

    confidences: list[float] = []
    correct_with: list[bool] = []
    correct_without: list[bool] = []
    try:
        for example in examples:
            inputs = example.inputs()
            confidences.append(probe.confidence(f"{inputs['task_description']}\n{inputs['question']}"))
            program.retriever = inner
            correct_with.append(bool(metric(example, program(**inputs))))
            program.retriever = NoRetriever()
            correct_without.append(bool(metric(example, program(**inputs))))
    finally:
        program.retriever = original

    rows = []
    count = len(confidences)
    for threshold in thresholds:
        retrieves = [confidence <= threshold for confidence in confidences]
        correct = sum(
            with_knowledge if retrieve else without
            for retrieve, with_knowledge, without in zip(retrieves, correct_with, correct_without)
        )
        rows.append(SweepRow(threshold=threshold, n=count, retrieved=sum(retrieves), accuracy=correct / count if count else 0.0))
    return SweepResult(rows=rows, confidences=confidences, correct_with=correct_with, correct_without=correct_without)
