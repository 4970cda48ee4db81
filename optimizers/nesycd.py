"""The NesyCD optimizer: general distillation, failure collection, symbolic knowledge, KB-augmented distillation."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import dspy
from dspy.teleprompt import Teleprompter

from nesycd.adapter import KnowledgeWriter, ReasonStep, strip_answer_sentence, training_row
from nesycd.errors import ConfigError, KnowledgeBaseError, TeacherError
from nesycd.journal import ItemJournal
from nesycd.parallel import run_parallel
from nesycd.program import lms_detached
from nesycd.training.sft import LoraTrainingConfig

logger = logging.getLogger(__name__)

STAGES = (  # in the order they run
    "teacher_rationales",
    "sft_general",
    "collect_demonstrations",
    "write_knowledge",
    "sft_kb",
    "evaluate",
)

# The config fields each stage's fingerprint covers; its other inputs are hashed by the stage itself.
# `threads` is in none of them, because it changes speed, not results.
STAGE_CONFIG_FIELDS = {
    "teacher_rationales": ("teacher", "teacher_api_base", "teacher_max_tokens"),
    "sft_general": ("student", "lora"),
    "collect_demonstrations": ("student", "student_api_base", "student_served_model", "student_max_tokens"),
    "write_knowledge": ("teacher", "teacher_api_base", "teacher_max_tokens", "teacher_sees_gold", "embedder"),
    "sft_kb": ("student", "lora", "kb_lora_epochs", "view_weights", "embedder"),
    "evaluate": (
        "student", "student_api_base", "student_served_model", "student_max_tokens", "evaluate_baselines", "embedder",
    ),
}
# The student server's settings. A fingerprint covers them only while they are set, so runs without a
# student server keep the fingerprints they had before these settings existed. Stages missing from
# STAGE_CONFIG_FIELDS (the baselines' fine-tunings) hash every setting except these.
STUDENT_SERVER_FIELDS = ("student_api_base", "student_served_model")

_MISSING = object()


@dataclass(frozen=True)
class NesyCDConfig:
    """Settings of one NesyCD compile.

    Args:
        student: the student model (packaged id, local folder or Hugging Face id); fine-tuned with LoRA.
        teacher: the teacher model; a local model or a litellm model string such as `openai/<model>`.
        teacher_api_base: base URL of an OpenAI-compatible server for a litellm teacher.
        student_api_base: OpenAI base URL (ending in /v1) of a server that runs the student's
            generation stages (collect_demonstrations, evaluate) instead of this process: vLLM,
            SGLang or `nesycd serve <student>`. It must load LoRA adapters at runtime (see
            `nesycd.lm.student_server.StudentServer`), serve the same weights as `student`, and read
            the adapter folders under the run folder at the same absolute paths. Fine-tuning stays
            local. The setting is part of the fingerprints of those two stages, because a server can
            decode differently from the in-process LM (another chat template, dtype or kernels). So
            changing it runs them again, and with them the stages that take the new error cases.
        student_served_model: the base model's id on the student server (None: the first id of
            GET {student_api_base}/models). Part of the same fingerprints.
        lora: LoRA settings, shared by both fine-tunings.
        kb_lora_epochs: epochs of the KB-augmented fine-tuning (None: same as `lora.epochs`).
        view_weights: loss weight per view of the KB-augmented fine-tuning: `kb_cot` (knowledge +
            question -> rationale), `cot` (question -> rationale), `answer` (question -> answer).
        teacher_sees_gold: show the gold answer to the teacher when it writes knowledge.
        threads: concurrent requests; the in-process LM batches them into one `generate` call.
        student_max_tokens: generation limit of the student, in tokens.
        teacher_max_tokens: generation limit of the teacher, in tokens.
        teacher_timeout_s: seconds before a request to a server teacher times out. Timeouts, rate
            limits (429) and 5xx responses are retried 3 times with exponential backoff. A call that
            still fails is recorded as a `teacher_error` failure and the compile goes on.
        embedder: sentence-transformers model for the knowledge base (None: packaged all-MiniLM-L6-v2).
        evaluate_baselines: also evaluate the base student and the Std-CoT student on the test set.
    """

    student: str = "smollm2-135m"
    teacher: str = "gemma3-270m"
    teacher_api_base: str | None = None
    student_api_base: str | None = None
    student_served_model: str | None = None
    lora: LoraTrainingConfig = field(default_factory=LoraTrainingConfig)
    kb_lora_epochs: float | None = None
    view_weights: dict[str, float] = field(default_factory=lambda: {"kb_cot": 1.0, "cot": 1.0, "answer": 1.0})
    teacher_sees_gold: bool = False
    threads: int = 8
    student_max_tokens: int = 160
    teacher_max_tokens: int = 192
    teacher_timeout_s: float = 120.0
    embedder: str | None = None
    evaluate_baselines: bool = True

    def fingerprint(self, *parts: Any, fields: tuple[str, ...] | None = None) -> str:
        """Return a short hash of this config's `fields` (default: all) and `parts` (the inputs of a stage)."""
        settings = asdict(self)
        if fields is not None:
            settings = {name: settings[name] for name in fields}
        payload = json.dumps([settings, *parts], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class CompileResult:
    """The outputs of a compile besides the compiled program: results, timings, adapters and KB size."""

    run_dir: Path
    results: dict[str, dict[str, float]]
    stage_seconds: dict[str, float]
    adapters: dict[str, Path]
    kb_entries: int


class NesyCD(Teleprompter):
    """Distil a teacher's reasoning into a student program with NesyCD.

    Stages, each recorded in the run's DuckDB traces:

    1. `teacher_rationales`: the teacher answers every training question with few-shot chain of
       thought; rationales whose answer the metric accepts are kept.
    2. `sft_general`: LoRA fine-tuning of the student on the kept rationales (the Std-CoT student).
    3. `collect_demonstrations`: the Std-CoT student answers the training set; its wrong or
       unparseable answers are the error cases.
    4. `write_knowledge`: the teacher writes one knowledge-base entry (learning summary and
       supplementary knowledge) per error case; entries are embedded and stored in Qdrant.
    5. `sft_kb`: a fresh LoRA from the base student over three views (retrieved knowledge +
       question -> rationale, question -> rationale, question -> answer) with per-view loss weights.
    6. `evaluate`: base, Std-CoT and NesyCD students on the test set.

    Args:
        metric: `metric(example, prediction, trace=None) -> bool`.
        run_dir: the run folder (traces, knowledge base, adapters, reports).
        config: compile settings.
        demos: few-shot chain-of-thought demonstrations for the teacher (dicts or Examples with
            task, question, reasoning, answer).
        store: an open `nesycd.tracing.TraceStore` for this run.

    Raises:
        ConfigError: an invalid setting, or a student server combined with an adaptive retriever.
        ModelError: the student server cannot be reached or cannot load an adapter (see
            `config.student_api_base`). The compile stops before the student calls that need the
            adapter, and the stages that finished are reused when the same run folder is compiled again.

    Example:
        >>> optimizer = NesyCD(metric, run_dir=Path("runs/bbh/r1"), store=TraceStore("runs/bbh/r1/traces.duckdb"))
        >>> compiled = optimizer.compile(program, trainset=train, testset=test)
    """

    # Whether the compiled program generates with the student (False for a method that runs the teacher).
    student_generates = True

    def __init__(
        self,
        metric: Callable,
        *,
        run_dir: str | Path,
        store,
        config: NesyCDConfig | None = None,
        demos: list | None = None,
        show_progress: bool = True,
    ):
        super().__init__()
        self.metric = metric
        self.run_dir = Path(run_dir)
        self.store = store
        self.config = config or NesyCDConfig()
        self.demos = list(demos or [])
        self.show_progress = show_progress
        self.result: CompileResult | None = None
        self.kb = None
        self._teacher_lm = None
        self._student_server = None
        self._check_config()

    def compile(self, student, *, trainset, teacher=None, valset=None, testset=None, **kwargs):
        """Run all stages and return the compiled student program (NesyCD adapter + bound knowledge base).

        A stage that already succeeded in this run folder with the same fingerprint (the same inputs
        and settings) is reused from its files instead of run again. Teacher rationales and knowledge
        entries of an interrupted stage are reused item by item, and an interrupted fine-tuning
        restarts from its last checkpoint.

        Args:
            student: the program (a dspy.Module with a `retriever` and a `ReasonStep`).
            trainset: training examples (inputs question, task, task_description; labels answer).
            teacher: an optional `dspy.LM` to use as the teacher instead of `config.teacher`.
            valset: unused; accepted for the DSPy optimizer contract.
            testset: examples for the final evaluation (skipped when empty).
        """
        if not trainset:
            raise ConfigError("The training set is empty. Load more data or raise --train-per-task.")
        self._check_student_server_retriever(student)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._teacher_lm = teacher
        self._student_server = self._setup_student_server()
        seconds: dict[str, float] = {}
        adapters: dict[str, Path] = {}

        started = time.perf_counter()
        rationales = self._teacher_rationales(student, trainset, None)
        seconds["teacher_rationales"] = time.perf_counter() - started

        started = time.perf_counter()
        adapters["std_cot"] = self._sft_general(trainset, rationales)
        seconds["sft_general"] = time.perf_counter() - started

        started = time.perf_counter()
        errors = self._collect_demonstrations(student, trainset, adapters["std_cot"])
        seconds["collect_demonstrations"] = time.perf_counter() - started

        started = time.perf_counter()
        kb = self._write_knowledge(errors, None)
        seconds["write_knowledge"] = time.perf_counter() - started

        started = time.perf_counter()
        adapters["nesycd"] = self._sft_kb(student, trainset, rationales, kb)
        seconds["sft_kb"] = time.perf_counter() - started

        compiled = self._student_program(student, adapter=("nesycd", adapters["nesycd"]), kb=kb)

        started = time.perf_counter()
        results = self._evaluate(student, testset or [], adapters, kb) if testset else {}
        seconds["evaluate"] = time.perf_counter() - started

        self.result = CompileResult(self.run_dir, results, seconds, adapters, kb.count())
        self.kb = kb
        compiled._compiled = True
        return compiled

    # Stage 1 ---------------------------------------------------------------------------------

    def _teacher_rationales(self, student, trainset, teacher_lm) -> dict[str, dict[str, str]]:
        """Return {example id: {reasoning, answer}} for the training questions the teacher answered correctly.

        `teacher_lm` None means the configured teacher, loaded only when a question is left to answer.
        """
        name = "teacher_rationales"
        fingerprint = self._fingerprint(
            name, [ex.id for ex in trainset], [_demo_dict(demo) for demo in self.demos], _program_signature(student)
        )
        path = self.run_dir / "teacher_rationales.jsonl"
        reused = self._reuse(name, fingerprint, lambda: {row.pop("id"): row for row in _read_jsonl(path)})
        if reused is not _MISSING:
            return reused

        with self.store.stage(name, fingerprint) as stage:
            journal = ItemJournal(self.run_dir / "journal" / f"{name}.jsonl", fingerprint)
            finished = journal.finished()
            todo = [ex for ex in trainset if ex.id not in finished]
            if finished:
                logger.info("Reusing %d of %d teacher answers from an earlier attempt", len(finished), len(trainset))
            outcomes = {}
            if todo:
                teacher_program = self._copy_program(student, lm=teacher_lm or self._teacher())
                for predictor in _reason_steps(teacher_program):
                    predictor.demos = [_demo_dict(demo) for demo in self.demos]

                def save(outcome):
                    if outcome.error is None:
                        journal.append(outcome.example.id, _prediction_record(outcome.prediction))

                for outcome in run_parallel(
                    lambda ex: teacher_program(**ex.inputs()), todo, threads=self.config.threads,
                    desc="teacher rationales", show_progress=self.show_progress, on_result=save,
                ):
                    outcomes[outcome.example.id] = outcome

            recorded = self._recorded_examples("teacher", name) if finished else set()
            rationales: dict[str, dict[str, str]] = {}
            errors = []
            for example in trainset:
                if example.id in finished:
                    prediction, error = dspy.Prediction(**finished[example.id]), None
                else:
                    prediction, error = outcomes[example.id].prediction, outcomes[example.id].error
                correct = prediction is not None and bool(self.metric(example, prediction))
                if example.id not in recorded:
                    self._record_prediction("teacher", example, prediction, correct, error)
                if error:
                    errors.append(error)
                    self._record_failure("teacher_error", example, None, error)
                if correct:
                    rationales[example.id] = {
                        "reasoning": strip_answer_sentence(prediction.reasoning),
                        "answer": example.answer,
                    }
            _write_jsonl(path, [{"id": k, **v} for k, v in rationales.items()])
            stage.counts.update(questions=len(trainset), correct=len(rationales), reused_items=len(finished))
            logger.info("Teacher answered %d of %d training questions correctly", len(rationales), len(trainset))
            if errors and len(errors) == len(todo) and not finished:
                raise TeacherError(
                    f"All {len(todo)} teacher calls to {self.config.teacher} failed. First error: {errors[0]}. "
                    "Check --teacher, --teacher-api-base and the provider's API key variable."
                )
            if not rationales:
                raise TeacherError(
                    f"The teacher ({self.config.teacher}) answered none of the {len(trainset)} training questions "
                    "correctly, so there is no rationale to distil. Use a stronger teacher (--teacher), or more "
                    "training questions (--train-per-task)."
                )
        return rationales

    # Stage 2 ---------------------------------------------------------------------------------

    def _sft_general(self, trainset, rationales) -> Path:
        rows = [
            {**training_row("cot", task_description=ex.task_description, question=ex.question, **rationales[ex.id]), "view": "cot"}
            for ex in trainset
            if ex.id in rationales
        ]
        fingerprint = self._fingerprint("sft_general", _rows_hash(rows))
        reused = self._reuse("sft_general", fingerprint, lambda: self._trained_adapter("std_cot"))
        if reused is not _MISSING:
            return reused
        with self.store.stage("sft_general", fingerprint) as stage:
            adapter_dir = self._train("sft_general", "std_cot", rows, epochs=None)
            stage.counts.update(rows=len(rows))
        return adapter_dir

    # Stage 3 ---------------------------------------------------------------------------------

    def _collect_demonstrations(self, student, trainset, std_cot_adapter: Path) -> list[dict]:
        from nesycd.training.sft import adapter_sha256

        name = "collect_demonstrations"
        fingerprint = self._fingerprint(
            name, [ex.id for ex in trainset], adapter_sha256(std_cot_adapter), _program_signature(student)
        )
        path = self.run_dir / "error_cases.jsonl"
        reused = self._reuse(name, fingerprint, lambda: _read_error_cases(path, trainset))
        if reused is not _MISSING:
            return reused

        with self.store.stage(name, fingerprint) as stage:
            lm = self._student_lm(("std_cot", std_cot_adapter))
            program = self._copy_program(student, lm=lm)
            outcomes = run_parallel(
                lambda ex: program(**ex.inputs()), trainset, threads=self.config.threads,
                desc="collect demonstrations", show_progress=self.show_progress,
            )
            errors = []
            for outcome in outcomes:
                example, prediction = outcome.example, outcome.prediction
                correct = prediction is not None and bool(self.metric(example, prediction))
                self._record_prediction("std_cot", example, prediction, correct, outcome.error)
                if correct:
                    continue
                if outcome.error:
                    kind, response = "error", ""
                elif prediction.answer is None:
                    kind, response = "unparseable", prediction.reasoning
                else:
                    kind, response = "wrong", prediction.reasoning
                failure_id = self._record_failure(kind, example, response, outcome.error)
                errors.append({"failure_id": failure_id, "kind": kind, "example": example, "response": response})
            _write_jsonl(
                path,
                [{"failure_id": e["failure_id"], "id": e["example"].id, "kind": e["kind"], "response": e["response"]} for e in errors],
            )
            stage.counts.update(questions=len(trainset), correct=len(trainset) - len(errors), errors=len(errors))
            logger.info("Std-CoT student got %d of %d training questions wrong", len(errors), len(trainset))
        return errors

    # Stage 4 ---------------------------------------------------------------------------------

    def _write_knowledge(self, errors: list[dict], teacher_lm):
        """Write one knowledge entry per error case into the run's Qdrant folder and return the open store.

        `teacher_lm` None means the configured teacher, loaded only when an error case is left to write.
        """
        from nesycd.knowledge import Embedder, KnowledgeEntry, KnowledgeStore, parse_teacher_entry

        name = "write_knowledge"
        fingerprint = self._fingerprint(name, [e["failure_id"] for e in errors])
        reused = self._reuse(name, fingerprint, self._open_kb)
        if reused is not _MISSING:
            return reused

        with self.store.stage(name, fingerprint) as stage:
            journal = ItemJournal(self.run_dir / "journal" / f"{name}.jsonl", fingerprint)
            finished = journal.finished()
            todo = [error for error in errors if error["failure_id"] not in finished]
            if finished:
                logger.info("Reusing %d of %d teacher replies from an earlier attempt", len(finished), len(errors))
            replies: dict[str, dict] = dict(finished)
            if todo:
                writer = KnowledgeWriter()
                writer.lm = teacher_lm or self._teacher()
                show_gold = self.config.teacher_sees_gold

                def write(error):
                    example = error["example"]
                    return writer(
                        task_description=example.task_description,
                        question=example.question,
                        student_response=error["response"],
                        gold_answer=example.answer if show_gold else None,
                    )

                def save(outcome):
                    if outcome.error is None:
                        journal.append(outcome.example["failure_id"], {"reply": outcome.prediction.reply})

                for outcome in run_parallel(
                    write, todo, threads=self.config.threads, desc="write knowledge",
                    show_progress=self.show_progress, on_result=save,
                ):
                    failure_id = outcome.example["failure_id"]
                    replies[failure_id] = {"reply": None if outcome.error else outcome.prediction.reply,
                                           "error": outcome.error}

            entries = []
            rejected = 0
            for error in errors:
                example, reply = error["example"], replies[error["failure_id"]]
                if reply.get("error"):
                    self._record_failure("teacher_error", example, None, reply["error"], stage_detail=error["failure_id"])
                    rejected += 1
                    continue
                try:
                    summary, knowledge = parse_teacher_entry(reply["reply"])
                except KnowledgeBaseError as parse_error:
                    self._record_failure("kb_parse", example, reply["reply"], str(parse_error))
                    rejected += 1
                    continue
                entries.append(
                    KnowledgeEntry(
                        task=example.task,
                        learning_summary=summary,
                        supplementary_knowledge=knowledge,
                        key=f"{example.task_description}\n{example.question}",
                        source_example_id=example.id,
                        source_run=self.store.run_id,
                        teacher_model=self.config.teacher,
                        failure_id=error["failure_id"],
                    )
                )

            # A fresh collection, so that entries an interrupted attempt added are not stored twice.
            kb = KnowledgeStore(
                self.run_dir / "kb", collection="nesycd_kb", embedder=Embedder(self.config.embedder), recreate=True
            )
            if entries:
                kb.add(entries)
            for entry in entries:
                self.store.record(
                    "kb_entries",
                    {
                        "entry_id": entry.id,
                        "failure_id": entry.failure_id,
                        "example_id": entry.source_example_id,
                        "task": entry.task,
                        "learning_summary": entry.learning_summary,
                        "supplementary_knowledge": entry.supplementary_knowledge,
                        "key_text": entry.key,
                        "teacher_model": entry.teacher_model,
                        "embedder": kb.embedder_id,
                        "collection": kb.collection,
                        "status": entry.status,
                    },
                )
            stage.counts.update(error_cases=len(errors), entries=len(entries), rejected=rejected,
                                stored=kb.count(), reused_items=len(finished))
            logger.info("Teacher wrote %d knowledge entries (%d replies rejected)", len(entries), rejected)
        return kb

    # Stage 5 ---------------------------------------------------------------------------------

    def _sft_kb(self, student, trainset, rationales, kb) -> Path:
        entry_ids = sorted(entry.id for entry in kb.entries())
        fingerprint = self._fingerprint(
            "sft_kb", _rows_hash(rationales), entry_ids, [ex.id for ex in trainset], _program_signature(student)
        )
        reused = self._reuse("sft_kb", fingerprint, lambda: self._trained_adapter("nesycd"))
        if reused is not _MISSING:
            return reused
        # Training rows always carry knowledge; an adaptive retriever's confidence gate applies at inference only.
        retriever = _copy_retriever(student)
        retriever = getattr(retriever, "inner", retriever)
        retriever.bind(kb)
        with self.store.stage("sft_kb", fingerprint) as stage:
            rows = []
            for example in trainset:
                common = {"task_description": example.task_description, "question": example.question}
                if example.id in rationales:
                    rationale = rationales[example.id]
                    hits = retriever(query=_retrieval_query(example), task=example.task)
                    if hits.passages:
                        rows.append({**training_row("kb_cot", **common, **rationale, knowledge=hits.passages), "view": "kb_cot"})
                    rows.append({**training_row("cot", **common, **rationale), "view": "cot"})
                rows.append({**training_row("answer", **common, reasoning="", answer=example.answer), "view": "answer"})

            adapter_dir = self._train("sft_kb", "nesycd", rows, epochs=self.config.kb_lora_epochs)
            stage.counts.update(rows=len(rows), **{f"rows_{v}": sum(r["view"] == v for r in rows) for v in ("kb_cot", "cot", "answer")})
        return adapter_dir

    # Stage 6 ---------------------------------------------------------------------------------

    def _evaluate(self, student, testset, adapters: dict[str, Path], kb) -> dict[str, dict[str, float]]:
        from nesycd.training.sft import adapter_sha256

        fingerprint = self._fingerprint(
            "evaluate", [ex.id for ex in testset], {k: adapter_sha256(v) for k, v in adapters.items()},
            sorted(entry.id for entry in kb.entries()) if kb is not None else None,
            _program_signature(student),
        )
        results_path = self.run_dir / "results.json"
        reused = self._reuse("evaluate", fingerprint, lambda: json.loads(results_path.read_text()))
        if reused is not _MISSING:
            return reused
        results: dict[str, dict[str, float]] = {}
        with self.store.stage("evaluate", fingerprint) as stage:
            configurations = [("nesycd", ("nesycd", adapters["nesycd"]), kb)]
            if self.config.evaluate_baselines:
                configurations = [("base", None, None), ("std_cot", ("std_cot", adapters["std_cot"]), None)] + configurations
            # Every LM is made before the first question, so a student server that cannot load an
            # adapter fails the stage before any student call.
            programs = [
                (label, self._student_program(student, adapter=None, kb=store, lm=self._student_lm(adapter)))
                for label, adapter, store in configurations
            ]
            for label, program in programs:
                outcomes = run_parallel(
                    lambda ex: program(**ex.inputs()), testset, threads=self.config.threads,
                    desc=f"evaluate {label}", show_progress=self.show_progress,
                )
                per_task: dict[str, list[bool]] = {}
                for outcome in outcomes:
                    correct = outcome.prediction is not None and bool(self.metric(outcome.example, outcome.prediction))
                    self._record_prediction(label, outcome.example, outcome.prediction, correct, outcome.error)
                    per_task.setdefault(outcome.example.task, []).append(correct)
                results[label] = _accuracies(per_task)
                for task, values in sorted(per_task.items()):
                    self.store.record(
                        "evaluations",
                        {"model_label": label, "task": task, "n": len(values), "correct": sum(values),
                         "accuracy": sum(values) / len(values)},
                    )
                all_values = [v for values in per_task.values() for v in values]
                self.store.record(
                    "evaluations",
                    {"model_label": label, "task": "ALL", "n": len(all_values), "correct": sum(all_values),
                     "accuracy": sum(all_values) / max(1, len(all_values))},
                )
            stage.counts.update(questions=len(testset), students=len(configurations))
            results_path.write_text(json.dumps(results, indent=1))
        return results

    # Resume ----------------------------------------------------------------------------------

    def _fingerprint(self, stage_name: str, *parts: Any) -> str:
        settings = asdict(self.config)
        fields = STAGE_CONFIG_FIELDS.get(stage_name)
        if fields is None:
            fields = tuple(name for name in settings if name not in STUDENT_SERVER_FIELDS)
        fields = tuple(name for name in fields if name not in STUDENT_SERVER_FIELDS or settings[name] is not None)
        return self.config.fingerprint(stage_name, *parts, fields=fields)

    def _reuse(self, stage_name: str, fingerprint: str, load: Callable[[], Any]) -> Any:
        """Return the outputs of an earlier succeeded attempt of this stage, or _MISSING to run it.

        The stage is reused when the traces contain a succeeded attempt with the same fingerprint and
        `load()` can read its files. The reuse is recorded as a stage row with status 'reused'.
        """
        found = self.store.find_stage(stage_name, fingerprint)
        if found is None:
            return _MISSING
        try:
            outputs = load()
        except (OSError, ValueError, KeyError, KnowledgeBaseError) as error:
            logger.warning("Stage %s succeeded before, but its outputs cannot be read (%s), so it runs again",
                           stage_name, error)
            return _MISSING
        self.store.record_reused_stage(stage_name, fingerprint, found.get("counts"))
        return outputs

    def _recorded_examples(self, model_label: str, stage_name: str) -> set[str]:
        """Return the ids of examples with a prediction row of `model_label` in `stage_name`."""
        _, rows = self.store.query(
            "SELECT DISTINCT example_id FROM predictions WHERE model_label = ? AND stage = ?", [model_label, stage_name]
        )
        return {row[0] for row in rows}

    def _trained_adapter(self, adapter_name: str) -> Path:
        adapter_dir = self.run_dir / "adapters" / adapter_name / "adapter"
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{adapter_dir / 'adapter_model.safetensors'} is missing")
        return adapter_dir

    def _open_kb(self):
        from nesycd.knowledge import Embedder, KnowledgeStore

        if not (self.run_dir / "kb").is_dir():
            raise FileNotFoundError(f"{self.run_dir / 'kb'} is missing")
        return KnowledgeStore(self.run_dir / "kb", collection="nesycd_kb", embedder=Embedder(self.config.embedder),
                              create=False)

    def _teacher(self):
        """Return the teacher LM, loading it on first use."""
        from nesycd.lm import make_lm

        if getattr(self, "_teacher_lm", None) is None:
            self._teacher_lm = make_lm(
                self.config.teacher,
                role="teacher",
                api_base=self.config.teacher_api_base,
                max_tokens=self.config.teacher_max_tokens,
                timeout_s=self.config.teacher_timeout_s,
            )
        return self._teacher_lm

    # Helpers ---------------------------------------------------------------------------------

    def _loss_weights(self, stage_name: str) -> dict[str, float]:
        """Return the per-view loss weights of the fine-tuning in `stage_name`; only sft_kb weights its views."""
        return dict(self.config.view_weights) if stage_name == "sft_kb" else {}

    def _train(self, stage_name: str, adapter_name: str, rows: list[dict], epochs: float | None) -> Path:
        from nesycd.lm import resolve_model
        from nesycd.training.sft import train_lora

        lora = self.config.lora
        if epochs is not None:
            lora = LoraTrainingConfig(**{**asdict(lora), "epochs": epochs})
        base = resolve_model(self.config.student)
        weights = self._loss_weights(stage_name)
        job_id = uuid.uuid4().hex
        try:
            result = train_lora(base.path, rows, self.run_dir / "adapters" / adapter_name, config=lora, view_weights=weights)
        except Exception as error:
            self.store.record(
                "finetune_jobs",
                {"job_id": job_id, "base_model": self.config.student, "n_rows": len(rows), "status": "failed",
                 "config": asdict(lora), "loss_weights": weights},
            )
            raise
        self.store.record(
            "finetune_jobs",
            {
                "job_id": job_id,
                "base_model": self.config.student,
                "adapter_path": str(result.adapter_dir),
                "adapter_sha256": result.adapter_sha256,
                "n_rows": result.n_rows,
                "rows_by_view": result.rows_by_view,
                "loss_weights": weights,
                "config": asdict(lora),
                "loss_curve": result.loss_curve,
                "train_seconds": result.train_seconds,
                "resumed_from_step": result.resumed_from_step,
                "status": "succeeded",
            },
        )
        return result.adapter_dir

    def _copy_program(self, program, *, lm, retriever=None):
        """Return a copy of `program` whose predictors use `lm` and whose retriever is `retriever` (default none)."""
        from nesycd.knowledge import NoRetriever

        return _copy_with(program, lm=lm, retriever=retriever or NoRetriever())

    def _student_program(self, student, *, adapter, kb, lm=None):
        from nesycd.knowledge import NoRetriever

        if lm is None:
            lm = self._student_lm(adapter)
        if kb is None:
            return _copy_with(student, lm=lm, retriever=NoRetriever())
        retriever = _copy_retriever(student)
        retriever.bind(kb)
        return _copy_with(student, lm=lm, retriever=retriever)

    def _student_lm(self, adapter: tuple[str, str | Path] | None):
        """Return the student LM with `adapter` (label, folder), or the base student for None.

        The LM generates on the student server when one is set, else in this process.
        """
        from nesycd.lm import make_lm

        if self._student_server is not None:
            return self._student_server.lm(adapter, max_tokens=self.config.student_max_tokens)
        return make_lm(
            self.config.student, role="student",
            adapter=None if adapter is None else (adapter[0], str(adapter[1])),
            max_tokens=self.config.student_max_tokens,
        )

    def _setup_student_server(self):
        """Return the client of the student server after checking that it serves the base model, or None."""
        from nesycd.lm.student_server import StudentServer

        if self.config.student_api_base is None:
            return None
        if not self.student_generates:
            logger.warning("Method %s generates with the teacher, so the student server %s is not used",
                           type(self).__name__, self.config.student_api_base)
            return None
        server = StudentServer(self.config.student_api_base, served_model=self.config.student_served_model)
        logger.info("Student generation runs on %s (base model %s)", server.api_base, server.base_model())
        return server

    def _check_student_server_retriever(self, student) -> None:
        if self.config.student_api_base is None or not self.student_generates:
            return
        if student.retriever.config().get("kind") == "adaptive":
            raise ConfigError(
                "The adaptive retriever probes the student's token probabilities in-process, so it cannot run "
                f"with the student server {self.config.student_api_base}. Leave out --student-api-base, or pass "
                "another retriever (--retriever dense, bm25 or hybrid)."
            )

    def _record_prediction(self, label, example, prediction, correct, error) -> None:
        self.store.record(
            "predictions",
            {
                "model_label": label,
                "example_id": example.id,
                "task": example.task,
                "question": example.question,
                "output": None if prediction is None else prediction.reasoning,
                "answer": None if prediction is None else prediction.answer,
                "gold": example.answer,
                "correct": bool(correct),
                "score": float(correct),
                "knowledge": None if prediction is None else list(getattr(prediction, "knowledge", None) or []),
                "knowledge_ids": None if prediction is None else list(getattr(prediction, "knowledge_ids", None) or []),
            },
        )

    def _record_failure(self, kind, example, output, detail, stage_detail=None) -> str:
        failure_id = uuid.uuid4().hex
        self.store.record(
            "failures",
            {
                "failure_id": failure_id,
                "example_id": example.id,
                "task": example.task,
                "kind": kind,
                "question": example.question,
                "output": output,
                "gold": example.answer,
                "detail": detail if stage_detail is None else f"{detail} (error case {stage_detail})",
            },
        )
        return failure_id

    def _check_config(self) -> None:
        unknown = set(self.config.view_weights) - {"kb_cot", "cot", "answer"}
        if unknown:
            raise ConfigError(f"Unknown loss-weight views {sorted(unknown)}; use kb_cot, cot and answer.")
        if any(weight < 0 for weight in self.config.view_weights.values()):
            raise ConfigError(f"Loss weights must be >= 0, got {self.config.view_weights}.")
        if self.config.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.config.threads}.")
        _check_student_server_settings(self.config)


def _check_student_server_settings(config: NesyCDConfig) -> None:
    api_base = config.student_api_base
    if api_base is not None and not api_base.startswith(("http://", "https://")):
        raise ConfigError(
            f"--student-api-base must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, got {api_base!r}."
        )
    if config.student_served_model is not None:
        if api_base is None:
            raise ConfigError("--student-served-model needs --student-api-base, the server that serves that model.")
        if not config.student_served_model.strip():
            raise ConfigError("--student-served-model is empty. Pass the base model's id on the student server.")


def _reason_steps(program) -> list[ReasonStep]:
    return [predictor for _, predictor in program.named_predictors() if isinstance(predictor, ReasonStep)]


def _copy_with(program, *, lm, retriever):
    """Deep-copy `program` without its LMs and retriever (which hold models and clients), then set both."""
    from nesycd.knowledge import attach_lm

    saved_retriever = program.retriever
    program.retriever = None
    try:
        with lms_detached(program):
            copy = program.deepcopy()
    finally:
        program.retriever = saved_retriever
    copy.set_lm(lm)
    copy.retriever = retriever
    attach_lm(copy, lm)  # an adaptive retriever probes the student's confidence with this LM
    return copy


def _copy_retriever(program):
    """Return an unbound retriever configured like the program's own."""
    from nesycd.knowledge import make_retriever

    return make_retriever(program.retriever.config())


def _retrieval_query(example) -> str:
    return f"{example.task_description}\n{example.question}"


def _program_signature(program) -> list:
    """Return what identifies a program's prompts and retrieval: its class and retriever config."""
    return [type(program).__module__, type(program).__qualname__, program.retriever.config()]


def _prediction_record(prediction) -> dict:
    return {"reasoning": prediction.reasoning, "answer": prediction.answer}


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _read_error_cases(path: Path, trainset) -> list[dict]:
    """Return the error cases of error_cases.jsonl with their training examples."""
    examples = {example.id: example for example in trainset}
    return [
        {"failure_id": row["failure_id"], "kind": row["kind"], "example": examples[row["id"]], "response": row["response"]}
        for row in _read_jsonl(path)
    ]


def _demo_dict(demo) -> dict:
    data = demo.toDict() if hasattr(demo, "toDict") else dict(demo)
    return {key: data[key] for key in ("task", "question", "reasoning", "answer") if key in data}


def _accuracies(per_task: dict[str, list[bool]]) -> dict[str, float]:
    scores = {task: sum(values) / len(values) for task, values in sorted(per_task.items())}
    all_values = [value for values in per_task.values() for value in values]
    scores["ALL"] = sum(all_values) / max(1, len(all_values))
    scores["TASK_MEAN"] = sum(v for k, v in scores.items() if k != "ALL") / max(1, len(per_task))
    return scores


def _rows_hash(rows: list[dict] | dict) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")

