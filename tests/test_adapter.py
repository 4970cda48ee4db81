"""The one prompt layout: inference prompts and fine-tuning rows are byte-identical."""

from __future__ import annotations

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

from nesycd.adapter import (
    ANSWER_CUE,
    COT_CUE,
    KNOWLEDGE_LEAD_IN,
    ReasonStep,
    format_knowledge_prompt,
    strip_answer_sentence,
    training_row,
)

TASK = "Evaluate the result of a random Boolean expression."
QUESTION = "not ( True ) and ( True ) is"
KNOWLEDGE = ["Learning summary: Apply not first.\nSupplementary knowledge:\n1. not True is False."]


class RecordingEngine:
    """A DSPy engine that records the prompt text it receives and replies with a fixed completion."""

    def __init__(self, reply: str):
        self.reply = reply
        self.prompts: list[str] = []

    def complete(self, request):
        self.prompts.append("".join(message.text or "" for message in request.messages))
        return Response(
            id=None, model="recording", message=Message.assistant((TextPart(self.reply),)),
            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1),
        )

    def stream(self, request):
        raise NotImplementedError

    def close(self):
        pass


def run_step(reply: str, knowledge: list[str], demos=()):
    engine = RecordingEngine(reply)
    step = ReasonStep()
    step.demos = list(demos)
    step.lm = dspy.LM("recording/engine", engine=engine, cache=False)
    prediction = step(task_description=TASK, question=QUESTION, knowledge=knowledge, task="boolean_expressions")
    return engine.prompts[0], prediction


def test_inference_prompt_equals_kb_row():
    prompt, _ = run_step(" ok. Therefore, the answer is False.", KNOWLEDGE)
    row = training_row("kb_cot", task_description=TASK, question=QUESTION, reasoning="r", answer="False", knowledge=KNOWLEDGE)
    assert prompt == row["prompt"]


def test_inference_prompt_equals_cot_row():
    prompt, _ = run_step(" ok. Therefore, the answer is False.", [])
    row = training_row("cot", task_description=TASK, question=QUESTION, reasoning="r", answer="False", knowledge=KNOWLEDGE)
    assert prompt == row["prompt"]
    assert KNOWLEDGE_LEAD_IN not in prompt


def test_prompt_layout_order():
    prompt, _ = run_step("x", KNOWLEDGE)
    assert prompt.index(TASK) < prompt.index(KNOWLEDGE_LEAD_IN) < prompt.index("Question: " + QUESTION)
    assert prompt.endswith(COT_CUE)


def test_answer_view_row():
    row = training_row("answer", task_description=TASK, question=QUESTION, reasoning="", answer="False")
    assert row["prompt"].endswith(ANSWER_CUE)
    assert row["completion"] == " False"
    assert "step by step" not in row["prompt"]


def test_cot_completion_ends_with_marker():
    row = training_row("cot", task_description=TASK, question=QUESTION, reasoning="not True is False.", answer="False")
    assert row["completion"] == " not True is False. Therefore, the answer is False."


def test_parse_extracts_answer():
    _, prediction = run_step(" not True is False, and False and True is False. Therefore, the answer is False.", [])
    assert prediction.answer == "False"
    assert prediction.reasoning.startswith("not True is False")


def test_parse_missing_marker_is_none():
    _, prediction = run_step(" I am not sure", [])
    assert prediction.answer is None


def test_empty_completion_parses():
    _, prediction = run_step("", [])
    assert prediction.answer is None
    assert prediction.reasoning == ""


def test_demos_filtered_by_task():
    demos = [
        {"task": "boolean_expressions", "question": "True is", "reasoning": "It is True.", "answer": "True"},
        {"task": "navigate", "question": "Take 1 step.", "reasoning": "One step away.", "answer": "No"},
    ]
    prompt, _ = run_step("x", [], demos=demos)
    assert "True is" in prompt
    assert "Take 1 step." not in prompt


def test_strip_answer_sentence():
    assert strip_answer_sentence("A then B. So the answer is (B).") == "A then B."
    assert strip_answer_sentence("A. Therefore, the answer is 3.") == "A."


def test_unknown_view_rejected():
    with pytest.raises(ValueError, match="bogus"):
        training_row("bogus", task_description=TASK, question=QUESTION, reasoning="", answer="x")


def test_knowledge_prompt_hides_gold_by_default():
    prompt = format_knowledge_prompt(TASK, QUESTION, "wrong answer")
    assert "Correct answer" not in prompt
    assert "Correct answer: False" in format_knowledge_prompt(TASK, QUESTION, "wrong", gold_answer="False")


class ScriptedEngine(RecordingEngine):
    """Replies with the next of several completions, recording each prompt."""

    def __init__(self, replies: list[str]):
        super().__init__("")
        self.replies = list(replies)

    def complete(self, request):
        self.reply = self.replies.pop(0)
        return super().complete(request)


def write_entry(replies: list[str]):
    from nesycd.adapter import KnowledgeWriter

    engine = ScriptedEngine(replies)
    writer = KnowledgeWriter()
    writer.lm = dspy.LM("scripted/engine", engine=engine, cache=False)
    prediction = writer(task_description=TASK, question=QUESTION, student_response="True", gold_answer=None)
    return engine.prompts, prediction.reply


def test_knowledge_written_in_two_steps():
    from nesycd.knowledge import parse_teacher_entry

    prompts, reply = write_entry([" Apply not before and.", " not True is False.\n2. and needs two True sides."])
    assert len(prompts) == 2
    assert prompts[0].endswith("Learning Summary:")
    assert prompts[1].endswith("Apply not before and.\nSupplementary Knowledge:\n1.")
    summary, knowledge = parse_teacher_entry(reply)
    assert summary == "Apply not before and."
    assert knowledge == "1. not True is False.\n2. and needs two True sides."


def test_empty_summary_unparseable():
    from nesycd.errors import KnowledgeBaseError
    from nesycd.knowledge import parse_teacher_entry

    prompts, reply = write_entry(["   "])
    assert len(prompts) == 1
    with pytest.raises(KnowledgeBaseError):
        parse_teacher_entry(reply)
