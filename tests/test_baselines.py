"""The baselines: every method compiles through the same stages, traces and artifact on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

from nesycd.adapter import ANSWER_CUE, RATIONALE_CUE, ReasonStep, parse_answer_only, training_row
from nesycd.compile import CompileOptions, run_compile
from nesycd.errors import ConfigError
from nesycd.tracing import query_file
from optimizers import METHODS, VIEW_WEIGHTS, view_weights

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST = 10, 4
TASK = "Evaluate the result of a random Boolean expression."
QUESTION = "not ( True ) and ( True ) is"

EXPECTED_STAGES = {
    "zero_shot": ["evaluate"],
    "teacher": ["evaluate"],
    "answer_only": ["sft_answer", "evaluate"],
    "std_cot": ["teacher_rationales", "sft_general", "evaluate"],
    "step_by_step": ["teacher_rationales", "sft_step_by_step", "evaluate"],
    "nesycd": ["teacher_rationales", "sft_general", "collect_demonstrations", "write_knowledge", "sft_kb", "evaluate"],
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, boolean_data_dir, tiny_student, tiny_teacher):
    """One compile per method on the same student, teacher, data and epochs: {method: CompileSummary}."""
    runs = tmp_path_factory.mktemp("runs")
    summaries = {}
    for method in METHODS:
        options = CompileOptions(
            program_file=REPO / "programs" / "bbh.py",
            method=method,
            data_dir=boolean_data_dir,
            student=str(tiny_student),
            teacher=str(tiny_teacher),
            tasks=["boolean_expressions"],
            train_per_task=TRAIN,
            test_per_task=TEST,
            runs_dir=runs,
            run_id=method,
            epochs=1,
            batch_size=4,
            threads=4,
            max_tokens=16,
            teacher_max_tokens=40,
            baselines=False,
            show_progress=False,
        )
        summaries[method] = run_compile(options)
    return summaries


def rows(run_dir: Path, sql: str) -> list[tuple]:
    return query_file(run_dir / "traces.duckdb", sql)[1]


def manifest(summary) -> dict:
    return json.loads((summary.compiled_dir / "manifest.json").read_text())


# Compile through the registry ------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_method_stages_succeed(compiled, method):
    stages = rows(compiled[method].run_dir, "select name, status from stages order by started_at")
    assert [name for name, _ in stages] == EXPECTED_STAGES[method]
    assert {status for _, status in stages} == {"succeeded"}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_evaluated_under_its_name(compiled, method):
    labels = rows(compiled[method].run_dir, "select model_label, count(*) from predictions where stage = 'evaluate' group by 1")
    assert labels == [(method, TEST)]
    assert set(compiled[method].results) == {method}
    assert 0.0 <= compiled[method].results[method]["ALL"] <= 1.0


@pytest.mark.parametrize("method", list(METHODS))
def test_method_recorded_in_run_config(compiled, method):
    (config,) = rows(compiled[method].run_dir, "select config from runs")[0]
    assert json.loads(config)["method"] == method
    assert manifest(compiled[method])["method"] == method


def test_teacher_calls_only_where_needed(compiled):
    for method in ("zero_shot", "answer_only"):
        roles = rows(compiled[method].run_dir, "select distinct role from lm_calls")
        assert roles == [("student",)], method
    teacher_roles = rows(compiled["teacher"].run_dir, "select distinct role from lm_calls where stage = 'evaluate'")
    assert teacher_roles == [("teacher",)]


def test_teacher_prompt_has_demos(compiled, boolean_data_dir):
    from nesycd.benchmarks import bbh

    demo = bbh.load_cot_demos(boolean_data_dir, "boolean_expressions")[0]
    (messages,) = rows(compiled["teacher"].run_dir, "select messages from lm_calls where stage = 'evaluate' limit 1")[0]
    assert demo.question in messages
    (messages,) = rows(compiled["zero_shot"].run_dir, "select messages from lm_calls where stage = 'evaluate' limit 1")[0]
    assert demo.question not in messages


def test_answer_only_trains_answers(compiled):
    (by_view, weights), = rows(compiled["answer_only"].run_dir, "select rows_by_view, loss_weights from finetune_jobs")
    assert json.loads(by_view) == {"answer": TRAIN}
    assert json.loads(weights) == {}


def test_answer_only_prompts_for_answer(compiled):
    prompts = rows(compiled["answer_only"].run_dir, "select messages from lm_calls where stage = 'evaluate'")
    assert len(prompts) == TEST
    for (messages,) in prompts:
        text = json.loads(messages)[0]["content"]
        assert text.endswith(ANSWER_CUE)
        assert "step by step" not in text


def test_step_by_step_weights_two_tasks(compiled):
    (by_view, weights, status), = rows(
        compiled["step_by_step"].run_dir, "select rows_by_view, loss_weights, status from finetune_jobs"
    )
    kept = rows(compiled["step_by_step"].run_dir, "select count(*) from predictions where model_label = 'teacher' and correct")[0][0]
    assert status == "succeeded"
    assert json.loads(weights) == {"rationale": 0.7, "answer": 0.3}
    assert json.loads(by_view) == {"rationale": kept, "answer": TRAIN}
    assert kept > 0


def test_std_cot_matches_nesycd_stage_one(compiled):
    std_rows = rows(compiled["std_cot"].run_dir, "select n_rows from finetune_jobs")
    nesycd_rows = rows(compiled["nesycd"].run_dir, "select n_rows from finetune_jobs where stage = 'sft_general'")
    assert std_rows == nesycd_rows


# The artifact of each method ---------------------------------------------------------------------


def test_untrained_methods_have_no_adapter(compiled, tiny_student, tiny_teacher):
    for method in ("zero_shot", "teacher"):
        record = manifest(compiled[method])
        assert record["adapter"] is None
        assert not (compiled[method].compiled_dir / "adapter").exists()
    assert manifest(compiled["zero_shot"])["base_model"] == str(tiny_student)
    assert manifest(compiled["teacher"])["base_model"] == str(tiny_teacher)


def test_only_nesycd_has_kb(compiled):
    for method in METHODS:
        record = manifest(compiled[method])
        if method == "nesycd":
            assert record["kb"]["count"] >= 1
            assert record["retriever"]["kind"] == "dense"
        else:
            assert record["kb"] is None
            assert record["embedder"] is None
            assert record["retriever"] == {"kind": "none"}


def test_training_summary_recorded(compiled):
    for method in METHODS:
        training = manifest(compiled[method])["training"]
        assert training["examples"] == TRAIN
        assert training["per_task"] == {"boolean_expressions": TRAIN}
        if method in ("std_cot", "step_by_step", "nesycd"):
            sql = "select count(*) from predictions where model_label = 'teacher' and correct"
            assert training["teacher_rationales"] == rows(compiled[method].run_dir, sql)[0][0], method
        else:
            assert "teacher_rationales" not in training, method


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_method_loads_and_answers(compiled, method):
    import nesycd

    program = nesycd.load(compiled[method].compiled_dir)
    try:
        prediction = program("True and not False is")
        ood = program("Which gas do plants take in?\nOptions:\n(A) oxygen\n(B) carbon dioxide", task="arc_easy",
                      task_description="Answer the science question.")
    finally:
        program.close()
    assert program.method == method
    assert isinstance(prediction.reasoning, str)
    assert isinstance(ood.reasoning, str)
    views = {step.view for _, step in program.program.named_predictors()}
    assert views == ({"answer"} if method in ("answer_only", "step_by_step") else {"cot"})


def test_teacher_program_keeps_demos(compiled):
    import nesycd

    program = nesycd.load(compiled["teacher"].compiled_dir)
    try:
        steps = [step for _, step in program.program.named_predictors()]
        assert program.lm.nesycd_role == "teacher"
    finally:
        program.close()
    assert len(steps[0].demos) == 3


def test_tampered_program_state_rejected(compiled, tmp_path):
    import shutil

    from nesycd.artifact import load
    from nesycd.errors import ArtifactError

    copied = Path(shutil.copytree(compiled["zero_shot"].compiled_dir, tmp_path / "copy"))
    state = copied / "program_state.json"
    state.write_text(state.read_text().replace('"view": "cot"', '"view": "answer"'))
    with pytest.raises(ArtifactError, match="program_state.json"):
        load(copied)


def test_report_names_method(compiled):
    assert "Method: step_by_step" in compiled["step_by_step"].report
    assert "Knowledge-base entries" not in compiled["step_by_step"].report
    assert "Knowledge-base entries" in compiled["nesycd"].report


def test_killed_compile_resumes(boolean_data_dir, tiny_student, tmp_path, monkeypatch):
    from optimizers.baselines import AnswerOnly

    options = CompileOptions(
        program_file=REPO / "programs" / "bbh.py", method="answer_only", data_dir=boolean_data_dir,
        student=str(tiny_student), tasks=["boolean_expressions"], train_per_task=4, test_per_task=2,
        runs_dir=tmp_path, run_id="resume", epochs=1, batch_size=4, threads=4, max_tokens=8, show_progress=False,
    )
    real_evaluate = AnswerOnly._evaluate_program

    def crash(self, *args, **kwargs):
        raise RuntimeError("killed during evaluation")

    monkeypatch.setattr(AnswerOnly, "_evaluate_program", crash)
    with pytest.raises(RuntimeError, match="killed during evaluation"):
        run_compile(options)
    monkeypatch.setattr(AnswerOnly, "_evaluate_program", real_evaluate)
    summary = run_compile(options)

    stages = rows(summary.run_dir, "select name, status from stages order by started_at")
    assert stages == [("sft_answer", "succeeded"), ("sft_answer", "reused"), ("evaluate", "succeeded")]
    assert rows(summary.run_dir, "select count(*) from finetune_jobs")[0][0] == 1
    assert set(summary.results) == {"answer_only"}


# Options and errors -------------------------------------------------------------------------


def test_unknown_method_rejected(boolean_data_dir, tmp_path):
    options = CompileOptions(program_file=REPO / "programs" / "bbh.py", method="distil", data_dir=boolean_data_dir,
                             runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="Unknown method 'distil'"):
        run_compile(options)


def test_weight_for_untrained_view_rejected():
    with pytest.raises(ConfigError, match="std_cot trains no view answer"):
        view_weights("std_cot", {"answer": 1.0})
    with pytest.raises(ConfigError, match="step_by_step trains no view kb_cot"):
        view_weights("step_by_step", {"kb_cot": 1.0})


def test_weight_override_keeps_defaults():
    assert view_weights("step_by_step", {"rationale": 1.0}) == {"rationale": 1.0, "answer": 0.3}
    assert view_weights("nesycd") == VIEW_WEIGHTS["nesycd"]
    assert view_weights("zero_shot") == {}


def test_cli_method_option(boolean_data_dir, tiny_student, tiny_teacher, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "compile", str(REPO / "programs" / "bbh.py"), "--method", "zero_shot",
         "--data-dir", str(boolean_data_dir), "--student", str(tiny_student), "--teacher", str(tiny_teacher),
         "--tasks", "boolean_expressions", "--train-per-task", "2", "--test-per-task", "2", "--runs-dir", str(tmp_path),
         "--run-id", "cli", "--max-tokens", "8", "--weight-answer", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "zero_shot trains no view answer" in result.stderr

    result = subprocess.run(
        [sys.executable, "-m", "nesycd.cli.main", "compile", str(REPO / "programs" / "bbh.py"), "--method", "zero_shot",
         "--data-dir", str(boolean_data_dir), "--student", str(tiny_student), "--teacher", str(tiny_teacher),
         "--tasks", "boolean_expressions", "--train-per-task", "2", "--test-per-task", "2", "--runs-dir", str(tmp_path),
         "--run-id", "cli", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Method: zero_shot" in result.stdout
    assert json.loads((tmp_path / "bbh" / "cli" / "compiled" / "manifest.json").read_text())["method"] == "zero_shot"


# Prompt views (unit tests with a recording LM) --------------------------------------------------


class RecordingEngine:
    """A DSPy engine that records each prompt and replies with a fixed completion."""

    def __init__(self, reply: str):
        self.reply = reply
        self.prompts: list[str] = []
        self.stops: list = []

    def complete(self, request):
        self.prompts.append("".join(message.text or "" for message in request.messages))
        self.stops.append(getattr(request, "stop", None))
        return Response(
            id=None, model="recording", message=Message.assistant((TextPart(self.reply),)),
            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1),
        )

    def stream(self, request):
        raise NotImplementedError

    def close(self):
        pass


def run_step(view: str, reply: str):
    engine = RecordingEngine(reply)
    step = ReasonStep(view=view)
    step.lm = dspy.LM("recording/engine", engine=engine, cache=False)
    prediction = step(task_description=TASK, question=QUESTION, knowledge=["ignored knowledge"], task="boolean_expressions")
    return engine.prompts[0], prediction


def test_answer_view_prompt_equals_row():
    prompt, prediction = run_step("answer", " False\nQuestion: next")
    row = training_row("answer", task_description=TASK, question=QUESTION, reasoning="", answer="False")
    assert prompt == row["prompt"]
    assert "ignored knowledge" not in prompt
    assert prediction.answer == "False"


def test_rationale_row_layout():
    row = training_row("rationale", task_description=TASK, question=QUESTION, reasoning="not True is False.", answer="x")
    assert row["prompt"] == f"{TASK}\n\nQuestion: {QUESTION}\n{RATIONALE_CUE}"
    assert row["completion"] == " not True is False."
    with pytest.raises(ValueError, match="non-empty reasoning"):
        training_row("rationale", task_description=TASK, question=QUESTION, reasoning=" ", answer="x")


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" (B)", "(B)"),
        (" True.", "True"),
        ("\n\n  valid  \nmore", "valid"),
        (" 42 apples", "42 apples"),
        (" so Therefore, the answer is (C).", "(C)"),
        ("", None),
        ("  \n ", None),
    ],
)
def test_parse_answer_only(completion, expected):
    assert parse_answer_only(completion) == expected


def test_view_survives_state_round_trip():
    step = ReasonStep(view="answer")
    state = json.loads(json.dumps(step.dump_state()))
    restored = ReasonStep()
    restored.load_state(state)
    assert restored.view == "answer"
    legacy = {key: value for key, value in state.items() if key != "view"}
    assert ReasonStep(view="answer").load_state(legacy).view == "cot"


def test_unknown_inference_view_rejected():
    with pytest.raises(ValueError, match="rationale"):
        ReasonStep(view="rationale")
