"""The baselines that NesyCD is compared with, run through the same stages, traces and artifact.

Each baseline is a `NesyCD` subclass that reuses its stage methods and records to the same DuckDB
tables, so one run folder layout, one trace schema and one compiled-folder format hold every
method:

| method | teacher calls | fine-tuning | inference prompt |
|---|---|---|---|
| `zero_shot` | none | none | chain of thought, base student |
| `teacher` | none at compile time | none | the teacher with the task's few-shot chain-of-thought demos |
| `answer_only` | none | question -> gold answer | answer only |
| `std_cot` | rationales | question -> teacher rationale + answer | chain of thought |
| `step_by_step` | rationales | rationale task and answer task, weighted | answer only |
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from nesycd.adapter import training_row
from nesycd.errors import ConfigError
from nesycd.parallel import run_parallel
from optimizers.nesycd import (
    _MISSING,
    CompileResult,
    NesyCD,
    _accuracies,
    _check_student_server_settings,
    _demo_dict,
    _program_signature,
    _reason_steps,
)

logger = logging.getLogger(__name__)

# Distilling step-by-step (Hsieh et al., 2023) trains loss = label loss + lambda * rationale loss.
# The NesyCD authors' baseline code weights the two tasks 0.3 (answer) and 0.7 (rationale).
STEP_BY_STEP_WEIGHTS = {"rationale": 0.7, "answer": 0.3}


class _Baseline(NesyCD):
    """The compile flow shared by the baselines: build the program, evaluate it on the test set.

    Subclasses set `name` (the method name, the evaluation label and the adapter name) and
    implement `_build`. Constructor arguments are those of `NesyCD`.
    """

    name = ""
    views: tuple[str, ...] = ()  # fine-tuning views whose loss weight the config may set

    def compile(self, student, *, trainset, teacher=None, valset=None, testset=None, **kwargs):
        """Build the method's program from `trainset`, evaluate it on `testset` and return it.

        Args:
            student: the program (a dspy.Module with a `retriever` and a `ReasonStep`).
            trainset: training examples (inputs question, task, task_description; labels answer).
            teacher: an optional `dspy.LM` to use as the teacher instead of `config.teacher`.
            valset: unused; accepted for the DSPy optimizer contract.
            testset: examples for the final evaluation (skipped when empty).
        """
        if not trainset:
            raise ConfigError("The training set is empty. Load more data or raise --train-per-task.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.kb = None
        self._teacher_lm = teacher  # None: the configured teacher, loaded on first use
        self._student_server = self._setup_student_server()
        self._seconds: dict[str, float] = {}
        self._adapters: dict[str, Path] = {}

        compiled = self._build(student, trainset)

        started = time.perf_counter()
        results = self._evaluate_program(student, compiled, testset) if testset else {}
        self._seconds["evaluate"] = time.perf_counter() - started

        self.result = CompileResult(self.run_dir, results, self._seconds, self._adapters, 0)
        compiled._compiled = True
        return compiled

    def _build(self, student, trainset):
        raise NotImplementedError

    # Steps ------------------------------------------------------------------------------------

    def _timed_rationales(self, student, trainset):
        started = time.perf_counter()
        rationales = self._teacher_rationales(student, trainset, None)
        self._seconds["teacher_rationales"] = time.perf_counter() - started
        return rationales

    def _fine_tune(self, stage_name: str, rows: list[dict]) -> Path:
        """Train the method's LoRA adapter on `rows` inside a recorded stage and return its folder.

        A stage that already succeeded in this run folder on the same rows and settings is reused.
        """
        started = time.perf_counter()
        fingerprint = self._fingerprint(stage_name, _rows_hash(rows))
        adapter_dir = self._reuse(stage_name, fingerprint, lambda: self._trained_adapter(self.name))
        if adapter_dir is _MISSING:
            with self.store.stage(stage_name, fingerprint) as stage:
                adapter_dir = self._train(stage_name, self.name, rows, epochs=None)
                by_view = {f"rows_{view}": sum(row["view"] == view for row in rows) for view in self.views}
                stage.counts.update(rows=len(rows), **by_view)
        self._seconds[stage_name] = time.perf_counter() - started
        self._adapters[self.name] = adapter_dir
        return adapter_dir

    def _evaluate_program(self, student, program, testset) -> dict[str, dict[str, float]]:
        """Score `program` on `testset`; record predictions, failures and evaluations under the method's name."""
        from nesycd.training.sft import adapter_sha256

        label = self.name
        results_path = self.run_dir / "results.json"
        adapter = self._adapters.get(label)
        fingerprint = self._fingerprint(
            "evaluate", label, [ex.id for ex in testset], adapter_sha256(adapter) if adapter else None,
            self.config.teacher, self.config.teacher_max_tokens, _program_signature(student),
        )
        reused = self._reuse("evaluate", fingerprint, lambda: json.loads(results_path.read_text()))
        if reused is not _MISSING:
            return reused
        with self.store.stage("evaluate", fingerprint) as stage:
            outcomes = run_parallel(
                lambda ex: program(**ex.inputs()), testset, threads=self.config.threads,
                desc=f"evaluate {label}", show_progress=self.show_progress,
            )
            per_task: dict[str, list[bool]] = {}
            for outcome in outcomes:
                correct = outcome.prediction is not None and bool(self.metric(outcome.example, outcome.prediction))
                self._record_prediction(label, outcome.example, outcome.prediction, correct, outcome.error)
                if outcome.error:
                    self._record_failure("error", outcome.example, None, outcome.error)
                per_task.setdefault(outcome.example.task, []).append(correct)
            for task, values in [*sorted(per_task.items()), ("ALL", [v for vs in per_task.values() for v in vs])]:
                self.store.record(
                    "evaluations",
                    {"model_label": label, "task": task, "n": len(values), "correct": sum(values),
                     "accuracy": sum(values) / max(1, len(values))},
                )
            stage.counts.update(questions=len(testset), errors=sum(1 for o in outcomes if o.error))
            results = {label: _accuracies(per_task)}
            results_path.write_text(json.dumps(results, indent=1))
        return results

    def _check_config(self) -> None:
        unknown = set(self.config.view_weights) - set(self.views)
        if unknown:
            allowed = ", ".join(self.views) if self.views else "none"
            raise ConfigError(
                f"Method {self.name} has no fine-tuning view {sorted(unknown)}; its weighted views are: {allowed}."
            )
        if any(weight < 0 for weight in self.config.view_weights.values()):
            raise ConfigError(f"Loss weights must be >= 0, got {self.config.view_weights}.")
        if self.config.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.config.threads}.")
        _check_student_server_settings(self.config)


class ZeroShot(_Baseline):
    """The base student, prompted with the chain-of-thought layout; nothing is trained."""

    name = "zero_shot"

    def _build(self, student, trainset):
        return self._student_program(student, adapter=None, kb=None)


class FewShotTeacher(_Baseline):
    """The teacher itself, prompted with each task's few-shot chain-of-thought demonstrations.

    The compiled program runs the teacher model. Tasks without demonstrations (out-of-domain
    ones) are prompted zero-shot, because demos are chosen by task.
    """

    name = "teacher"
    student_generates = False

    def _build(self, student, trainset):
        program = self._copy_program(student, lm=self._teacher())
        for predictor in _reason_steps(program):
            predictor.demos = [_demo_dict(demo) for demo in self.demos]
        if not self.demos:
            logger.warning("The program defines no few-shot demonstrations (load_demos), so the teacher runs zero-shot")
        return program


class AnswerOnly(_Baseline):
    """Fine-tuning on question -> gold answer, without rationales; the student answers directly."""

    name = "answer_only"
    views = ("answer",)

    def _build(self, student, trainset):
        rows = [_answer_row(example) for example in trainset]
        adapter_dir = self._fine_tune("sft_answer", rows)
        return _answer_view(self._student_program(student, adapter=(self.name, adapter_dir), kb=None))


class StdCoT(_Baseline):
    """Standard chain-of-thought distillation: the first two NesyCD stages, without a knowledge base."""

    name = "std_cot"

    def _build(self, student, trainset):
        rationales = self._timed_rationales(student, trainset)
        started = time.perf_counter()
        adapter_dir = self._sft_general(trainset, rationales)
        self._seconds["sft_general"] = time.perf_counter() - started
        self._adapters[self.name] = adapter_dir
        return self._student_program(student, adapter=(self.name, adapter_dir), kb=None)


class StepByStep(_Baseline):
    """Distilling step-by-step (Hsieh et al., 2023): a rationale task and an answer task with weighted losses.

    One LoRA learns both tasks. The rationale task maps the question to the teacher's rationale
    (for questions whose teacher answer was correct); the answer task maps every training question
    to its gold answer. The loss weights are `config.view_weights` {"rationale", "answer"}. At
    inference only the answer task runs, so the student answers without writing a rationale.
    """

    name = "step_by_step"
    views = ("rationale", "answer")
    stage_name = "sft_step_by_step"

    def _build(self, student, trainset):
        rationales = self._timed_rationales(student, trainset)
        rows = []
        for example in trainset:
            if example.id in rationales and rationales[example.id]["reasoning"].strip():
                rows.append({
                    **training_row(
                        "rationale", task_description=example.task_description, question=example.question,
                        reasoning=rationales[example.id]["reasoning"], answer=example.answer,
                    ),
                    "view": "rationale",
                })
            rows.append(_answer_row(example))
        adapter_dir = self._fine_tune(self.stage_name, rows)
        return _answer_view(self._student_program(student, adapter=(self.name, adapter_dir), kb=None))

    def _loss_weights(self, stage_name: str) -> dict[str, float]:
        # The rationale and answer tasks of this method's fine-tuning get config.view_weights.
        if stage_name == self.stage_name:
            return dict(self.config.view_weights)
        return super()._loss_weights(stage_name)


def _answer_row(example) -> dict:
    row = training_row(
        "answer", task_description=example.task_description, question=example.question, reasoning="",
        answer=example.answer,
    )
    return {**row, "view": "answer"}


def _answer_view(program):
    """Switch every ReasonStep of `program` to the answer-only prompt it was fine-tuned on."""
    for predictor in _reason_steps(program):
        predictor.view = "answer"
    return program


def _rows_hash(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
