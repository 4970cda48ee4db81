"""BIG-Bench Hard as a nesycd program: retrieve knowledge -> reason -> answer.

`nesycd compile programs/bbh.py` loads `program`, `load_data` and `metric` from this file.
Swap the retriever in one line, for example `program.retriever = NoRetriever()`.
"""

import dspy

from nesycd import DenseRetriever, ReasonStep
from nesycd.benchmarks import bbh

# Offline defaults sized for a 2-core CPU; override with --tasks, --train-per-task, --test-per-task.
DEFAULTS = {
    "tasks": ["boolean_expressions", "navigate", "sports_understanding", "web_of_lies", "causal_judgement"],
    "train_per_task": 8,
    "test_per_task": 6,
}


class BBHProgram(dspy.Module):
    """Retrieve knowledge-base entries for the question, reason step by step, answer."""

    def __init__(self):
        super().__init__()
        self.retriever = DenseRetriever(k=3, insert=1)
        self.reason = ReasonStep()

    def forward(self, question: str, task: str, task_description: str):
        hits = self.retriever(query=f"{task_description}\n{question}", task=task)
        step = self.reason(
            task_description=task_description, question=question, knowledge=hits.passages, task=task
        )
        return dspy.Prediction(
            reasoning=step.reasoning, answer=step.answer, knowledge=hits.passages, knowledge_ids=hits.inserted_ids
        )


program = BBHProgram()


def load_data(data_dir, *, tasks=None, train_per_task=None, test_per_task=None):
    """Return (trainset, testset): each task split deterministically, 40% test (seed 42)."""
    return bbh.load_bbh(data_dir, tasks, train_per_task=train_per_task, test_per_task=test_per_task)


def load_demos(data_dir, tasks):
    """Return the few-shot chain-of-thought demonstrations shown to the teacher, three per task."""
    return [demo for task in tasks for demo in bbh.load_cot_demos(data_dir, task)]


metric = bbh.metric
