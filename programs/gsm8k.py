"""GSM8K as a nesycd program: retrieve knowledge -> reason -> answer.

`nesycd compile programs/gsm8k.py` loads `program`, `load_data` and `metric` from this file.
Swap the retriever in one line, for example `program.retriever = NoRetriever()`.
"""

import dspy

from nesycd import DenseRetriever, ReasonStep
from nesycd.benchmarks import gsm8k
from nesycd.errors import ConfigError

# Offline defaults sized for a 2-core CPU. Override them with --train-per-task and --test-per-task.
DEFAULTS = {
    "tasks": [gsm8k.TASK],
    "train_per_task": 16,
    "test_per_task": 8,
}

# Three worked examples written for this program, not taken from the GSM8K release.
_DEMOS = (
    {
        "question": "A baker makes 48 rolls in the morning and 36 rolls in the afternoon. He packs the rolls "
        "in bags of 6. How many bags does he fill?",
        "reasoning": "The baker makes 48 + 36 = 84 rolls in total. Each bag holds 6 rolls, so he fills "
        "84 / 6 = 14 bags.",
        "answer": "14",
    },
    {
        "question": "Maria buys 3 notebooks at $4 each and a pen for $2. She pays with a $20 bill. How much "
        "change does she get?",
        "reasoning": "The notebooks cost 3 * 4 = $12. With the pen, she spends 12 + 2 = $14. Her change is "
        "20 - 14 = $6.",
        "answer": "6",
    },
    {
        "question": "A garden has 5 rows of tomato plants with 8 plants in each row. Each plant gives 3 "
        "tomatoes a week. How many tomatoes does the garden give in 2 weeks?",
        "reasoning": "The garden has 5 * 8 = 40 plants. In one week they give 40 * 3 = 120 tomatoes. In 2 weeks "
        "they give 120 * 2 = 240 tomatoes.",
        "answer": "240",
    },
)


class GSM8KProgram(dspy.Module):
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


program = GSM8KProgram()


def load_data(data_dir, *, tasks=None, train_per_task=None, test_per_task=None):
    """Return (trainset, testset): the first N questions of GSM8K's train and test files."""
    _check_tasks(tasks)
    for name, count in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if count is not None and count < 0:
            raise ConfigError(f"{name} is {count}. Pass a count of 0 or more, or None for all.")
    trainset = gsm8k.load_gsm8k(data_dir, "train", limit=train_per_task)
    testset = gsm8k.load_gsm8k(data_dir, "test", limit=test_per_task)
    return trainset, testset


def load_demos(data_dir, tasks):
    """Return the three hand-written chain-of-thought demonstrations for the teacher's prompt.

    ``data_dir`` is unused because the demonstrations are defined in this file. Tasks other than
    "gsm8k" get no demonstrations.
    """
    if gsm8k.TASK not in tasks:
        return []
    demos = []
    for demo in _DEMOS:
        example = dspy.Example(
            task=gsm8k.TASK, task_description=gsm8k.TASK_DESCRIPTION, answer_type="number", **demo
        )
        demos.append(example.with_inputs("question", "task", "task_description"))
    return demos


metric = gsm8k.metric


def _check_tasks(tasks):
    if tasks is None:
        return
    unknown = [task for task in tasks if task != gsm8k.TASK]
    if unknown:
        names = ", ".join(repr(task) for task in unknown)
        raise ConfigError(
            f"GSM8K has the single task {gsm8k.TASK!r}, not {names}. Pass --tasks {gsm8k.TASK} or leave --tasks out."
        )
