"""The plain-text prompt layout shared by inference prompts and fine-tuning rows.

Small students follow a plain layout better than DSPy's chat formats, and a student must be
served with the exact format it was trained on. So one set of functions here renders both the
prompts that `ReasoningAdapter` sends to an LM and the prompt/completion rows the trainer uses:

    <task description> <instruction to end with "Therefore, the answer is X.">

    <one-line lead-in>                      (only when knowledge was retrieved)
    <knowledge entries>

    Question: <question with its options>
    Answer: Let's think step by step.

The completion is ` <reasoning> Therefore, the answer is <answer>.` For the answer-only view the
header has no step-by-step instruction, the prompt ends with `Answer:`, and the completion is
` <answer>`. The rationale view (the rationale task of distilling step-by-step) has the same header
as the answer view, ends with `Rationale:`, and its completion is ` <reasoning>` without the answer.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import dspy

from nesycd.benchmarks.answers import ANSWER_MARKER, extract_answer

logger = logging.getLogger(__name__)

COT_INSTRUCTION = f'Think step by step, then finish with "{ANSWER_MARKER} X." where X is the final answer.'
KNOWLEDGE_LEAD_IN = (
    "Here is a learning summary and supplementary knowledge written by an expert teacher; use them if they help."
)
COT_CUE = "Answer: Let's think step by step."
ANSWER_CUE = "Answer:"
RATIONALE_CUE = "Rationale:"
# Generation stops where a small model starts inventing the next question.
STOP_STRINGS = ("\nQuestion:", "\n\n\n")
# An answer-only completion is one line.
ANSWER_STOP_STRINGS = ("\n",)

VIEWS = ("kb_cot", "cot", "answer", "rationale")
# The prompt a ReasonStep sends at inference: chain of thought (with knowledge when retrieved) or answer only.
INFERENCE_VIEWS = ("cot", "answer")


def format_prompt(
    task_description: str,
    question: str,
    *,
    knowledge: list[str] | tuple[str, ...] = (),
    demos: list[dict[str, str]] | tuple[dict[str, str], ...] = (),
    answer_only: bool = False,
) -> str:
    """Render the prompt for one question; `demos` are dicts with question, reasoning and answer."""
    header = task_description.strip() if answer_only else f"{task_description.strip()} {COT_INSTRUCTION}"
    blocks = [header]
    for demo in demos:
        blocks.append(
            f"Question: {demo['question'].strip()}\n{COT_CUE}"
            f"{format_completion(demo['reasoning'], demo['answer'])}"
        )
    if knowledge:
        blocks.append(KNOWLEDGE_LEAD_IN + "\n" + "\n\n".join(entry.strip() for entry in knowledge))
    cue = ANSWER_CUE if answer_only else COT_CUE
    blocks.append(f"Question: {question.strip()}\n{cue}")
    return "\n\n".join(blocks)


def format_rationale_prompt(task_description: str, question: str) -> str:
    """Render the prompt of the rationale task: the task description, the question and `Rationale:`."""
    return f"{task_description.strip()}\n\nQuestion: {question.strip()}\n{RATIONALE_CUE}"


def format_completion(reasoning: str, answer: str) -> str:
    """Render a chain-of-thought completion that ends with the answer marker."""
    reasoning = reasoning.strip()
    separator = " " if reasoning else ""
    return f" {reasoning}{separator}{ANSWER_MARKER} {answer.strip()}."


def strip_answer_sentence(text: str) -> str:
    """Return `text` without its final answer sentence ("Therefore, the answer is ..." or "So the answer is ...")."""
    for marker in (ANSWER_MARKER, "So the answer is"):
        index = text.rfind(marker)
        if index >= 0:
            return text[:index].strip()
    return text.strip()


def training_row(
    view: str, *, task_description: str, question: str, reasoning: str, answer: str, knowledge: list[str] = ()
) -> dict[str, str]:
    """Build one prompt/completion row of a fine-tuning view.

    Views: `kb_cot` (knowledge + question -> reasoning and answer), `cot` (question -> reasoning and
    answer), `answer` (question -> answer only) and `rationale` (question -> reasoning only). The
    prompts of `kb_cot`, `cot` and `answer` are byte-identical to the ones `ReasoningAdapter` sends
    at inference for the same inputs. The rationale task is trained but never run at inference.
    """
    if view not in VIEWS:
        raise ValueError(f"Unknown fine-tuning view {view!r}; expected one of {VIEWS}.")
    if view == "answer":
        prompt = format_prompt(task_description, question, answer_only=True)
        return {"prompt": prompt, "completion": f" {answer.strip()}"}
    if view == "rationale":
        if not reasoning.strip():
            raise ValueError(f"The rationale view needs a non-empty reasoning; the question was {question[:80]!r}.")
        return {"prompt": format_rationale_prompt(task_description, question), "completion": f" {reasoning.strip()}"}
    prompt = format_prompt(task_description, question, knowledge=knowledge if view == "kb_cot" else ())
    return {"prompt": prompt, "completion": format_completion(reasoning, answer)}


class Reason(dspy.Signature):
    """Reason step by step about a question and give the final answer."""

    task_description: str = dspy.InputField(desc="what the task asks")
    question: str = dspy.InputField(desc="the question, with its options")
    knowledge: list[str] = dspy.InputField(desc="retrieved knowledge-base entries; may be empty")
    reasoning: str = dspy.OutputField(desc="the chain of thought, ending with the answer sentence")
    answer: str | None = dspy.OutputField(desc="the answer after 'Therefore, the answer is', or None")


class ReasoningAdapter(dspy.Adapter):
    """A DSPy adapter that renders the plain-text layout of this module and parses the answer out.

    Demos are rendered only when their `task` matches the input's `task` (when both have one), so
    one predictor can hold few-shot demonstrations for many tasks.

    Args:
        view: "cot" (chain of thought, with knowledge when retrieved) or "answer" (the answer-only
            prompt of students fine-tuned on answers; knowledge and demos are not rendered).
    """

    def __init__(self, view: str = "cot", **kwargs):
        super().__init__(**kwargs)
        check_inference_view(view)
        self.view = view

    def format(self, signature, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> list[dict[str, Any]]:
        if self.view == "answer":
            prompt = format_prompt(inputs["task_description"], inputs["question"], answer_only=True)
            return [{"role": "user", "content": prompt}]
        task = inputs.get("task")
        chosen = [demo for demo in demos if task is None or demo.get("task") in (None, task)]
        prompt = format_prompt(
            inputs["task_description"],
            inputs["question"],
            knowledge=list(inputs.get("knowledge") or ()),
            demos=chosen,
        )
        return [{"role": "user", "content": prompt}]

    def parse(self, signature, completion: str) -> dict[str, Any]:
        if self.view == "answer":
            return {"reasoning": completion.strip(), "answer": parse_answer_only(completion)}
        return {"reasoning": completion.strip(), "answer": extract_answer(completion)}

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        messages = self.format(signature, demos, inputs)
        outputs = lm(messages=messages, **{"stop": list(self._stop_strings()), **lm_kwargs})
        return [self.parse(signature, _output_text(output)) for output in outputs]

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        messages = self.format(signature, demos, inputs)
        outputs = await lm.acall(messages=messages, **{"stop": list(self._stop_strings()), **lm_kwargs})
        return [self.parse(signature, _output_text(output)) for output in outputs]

    def _stop_strings(self) -> tuple[str, ...]:
        return ANSWER_STOP_STRINGS if self.view == "answer" else STOP_STRINGS


def check_inference_view(view: str) -> None:
    """Raise ValueError unless `view` is one of INFERENCE_VIEWS."""
    if view not in INFERENCE_VIEWS:
        raise ValueError(f"Unknown inference view {view!r}; expected one of {INFERENCE_VIEWS}.")


def parse_answer_only(completion: str) -> str | None:
    """Return the answer of an answer-only completion: its first non-empty line without a final period.

    A completion that contains an answer marker ("Therefore, the answer is ...") is read after the
    marker instead. Returns None for an empty completion.
    """
    marked = extract_answer(completion)
    if marked is not None:
        return marked
    for line in completion.splitlines():
        answer = line.strip().removesuffix(".").strip()
        if answer:
            return answer
    return None


def _output_text(output: Any) -> str:
    if isinstance(output, dict):
        return output.get("text") or ""
    return output or ""


class ReasonStep(dspy.Predict):
    """The reasoning predictor of a nesycd program: `dspy.Predict(Reason)` served through `ReasoningAdapter`.

    `view` picks the prompt: "cot" (the default) or "answer" for students fine-tuned to answer
    directly. It is part of the predictor's saved state, so a compiled program keeps it.

    Example:
        >>> step = ReasonStep()
        >>> step(task_description="Answer the question.", question="Is 7 prime?", knowledge=[], task="demo")
    """

    def __init__(self, view: str = "cot", **config):
        check_inference_view(view)
        super().__init__(Reason, **config)
        self.view = view

    def forward(self, **kwargs):
        task = kwargs.pop("task", None)
        adapter = _TaskAdapter(task, view=getattr(self, "view", "cot"))
        with dspy.context(adapter=adapter):
            return super().forward(**kwargs)

    def dump_state(self, json_mode=True):
        return {**super().dump_state(json_mode=json_mode), "view": self.view}

    def load_state(self, state: dict, **kwargs):
        view = state.get("view", "cot")  # states saved before views existed are chain-of-thought
        check_inference_view(view)
        super().load_state(state, **kwargs)
        self.view = view
        return self


class _TaskAdapter(ReasoningAdapter):
    """ReasoningAdapter bound to the task of one call, so demos of other tasks are left out."""

    def __init__(self, task: str | None, view: str = "cot"):
        super().__init__(view=view)
        self.task = task

    def format(self, signature, demos, inputs):
        return super().format(signature, demos, {**inputs, "task": self.task})


class WriteKnowledge(dspy.Signature):
    """Write a knowledge-base entry from a student's wrong answer."""

    task_description: str = dspy.InputField()
    question: str = dspy.InputField()
    student_response: str = dspy.InputField()
    gold_answer: str | None = dspy.InputField(desc="shown to the teacher only when enabled")
    reply: str = dspy.OutputField(desc="the teacher's whole reply")


KNOWLEDGE_INSTRUCTION = (
    "You are an expert teacher. A student answered the question below incorrectly. Analyse the student's "
    "response and write a learning summary and supplementary knowledge that would help the student solve "
    "questions of this kind. The learning summary explains the general approach and the pitfall, not this "
    "question's numbers. The supplementary knowledge is a numbered list of facts, definitions, formulas or "
    "techniques. Keep both short and general."
)
SUMMARY_HEADING = "Learning Summary:"
KNOWLEDGE_HEADING = "Supplementary Knowledge:"
SUMMARY_STOP = ("\nSupplementary", "\n\n", "\nTask:", "\nQuestion:")
KNOWLEDGE_STOP = ("\n\n", "\nTask:", "\nQuestion:", "\nLearning Summary")


def format_knowledge_prompt(
    task_description: str, question: str, student_response: str, gold_answer: str | None = None
) -> str:
    """Render the teacher's prompt for one knowledge-base entry; it ends with the summary heading.

    There is no worked example in the prompt because small base models copy an example instead
    of analysing the case.
    """
    case = (
        f"Task: {task_description.strip()}\nQuestion: {question.strip()}\n"
        f"Student's wrong response: {_clean_student_response(student_response)}"
    )
    if gold_answer is not None:
        case += f"\nCorrect answer: {gold_answer}"
    return f"{KNOWLEDGE_INSTRUCTION}\n\n{case}\n{SUMMARY_HEADING}"


def format_knowledge_continuation(prompt: str, summary: str) -> str:
    """Render the second prompt: the first one, the teacher's summary, then the knowledge heading and "1."."""
    return f"{prompt} {summary.strip()}\n{KNOWLEDGE_HEADING}\n1."


def _clean_student_response(text: str, max_words: int = 200) -> str:
    words = text.strip().split()
    if not words:
        return "(empty response)"
    clipped = " ".join(words[:max_words])
    if len(words) > max_words:
        clipped += " ..."
    return clipped


class KnowledgeWriterAdapter(dspy.Adapter):
    """Asks the teacher for an entry in two scaffolded calls and returns the assembled two-part reply.

    The first call continues the prompt after "Learning Summary:" and stops at the next heading
    or blank line. The second call continues after "Supplementary Knowledge:\n1.". Small base
    models follow this scaffold where they ignore a format instruction, and instruction-tuned
    models write each part on request. An empty part makes the reply unparseable, so the
    optimizer records it as a failure.
    """

    def format(self, signature, demos, inputs):
        prompt = format_knowledge_prompt(
            inputs["task_description"], inputs["question"], inputs["student_response"], inputs.get("gold_answer")
        )
        return [{"role": "user", "content": prompt}]

    def parse(self, signature, completion: str) -> dict[str, Any]:
        return {"reply": completion}

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        prompt = self.format(signature, demos, inputs)[0]["content"]
        raw_summary = _first_output(lm(messages=_user(prompt), **{"stop": list(SUMMARY_STOP), **lm_kwargs}))
        summary = " ".join(remove_repetition(raw_summary))
        if not summary:
            return [self.parse(signature, f"{SUMMARY_HEADING}\n{KNOWLEDGE_HEADING}\n")]
        continuation = format_knowledge_continuation(prompt, summary)
        raw_knowledge = _first_output(lm(messages=_user(continuation), **{"stop": list(KNOWLEDGE_STOP), **lm_kwargs}))
        items = remove_repetition(raw_knowledge)
        knowledge = "\n".join(f"{number}. {item}" for number, item in enumerate(items, start=1))
        return [self.parse(signature, f"{SUMMARY_HEADING} {summary}\n{KNOWLEDGE_HEADING}\n{knowledge}")]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_LIST_NUMBER = re.compile(r"^\s*\d+[.)]\s*")


def remove_repetition(text: str) -> list[str]:
    """Split a teacher's text into sentences and drop repeats, empty list items and echoed headings.

    Small teachers loop ("The answer is X. The answer is X. ...") or emit bare list numbers
    ("1. 2. 3."); only the first occurrence of each sentence carries information.
    """
    kept: list[str] = []
    seen: set[str] = set()
    for piece in _SENTENCE_END.split(text):
        sentence = _LIST_NUMBER.sub("", piece).strip()
        key = " ".join(sentence.lower().split())
        if len(key) < 3 or key in seen or "learning summary" in key or "supplementary knowledge" in key:
            continue
        seen.add(key)
        kept.append(sentence)
    return kept


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _first_output(outputs) -> str:
    return _output_text(outputs[0]) if outputs else ""


class KnowledgeWriter(dspy.Predict):
    """The teacher's knowledge-writing predictor, served through `KnowledgeWriterAdapter`."""

    def __init__(self, **config):
        super().__init__(WriteKnowledge, **config)

    def forward(self, **kwargs):
        with dspy.context(adapter=KnowledgeWriterAdapter()):
            return super().forward(**kwargs)
