"""The NesyCD paper's setup as a nesycd program: train on BBH + GSM8K, report in-domain and out-of-domain.

`nesycd compile programs/paper.py` trains on the BBH training split and GSM8K train. `nesycd
evaluate` then scores the compiled program on the in-domain test sets (BBH test split, GSM8K
test) and the out-of-domain ones (ARC Easy and Challenge, the English multiple-choice AGIEval
subsets), the benchmarks that `DEFAULTS["benchmarks"]` lists.

Tasks are BBH task names plus "gsm8k". The name "bbh" selects all 27 BBH tasks, and "all" selects
all 27 plus GSM8K, the training set of the NesyCD paper (Liao et al., AAAI 2025). `--train-per-task` and `--test-per-task` apply to each BBH
task and to GSM8K alike.
"""

from pathlib import Path

import dspy

from nesycd import DenseRetriever, ReasonStep
from nesycd.benchmarks import bbh, gsm8k
from nesycd.errors import ConfigError

# Offline defaults sized for a 2-core CPU. `--tasks all` without per-task limits is the paper's full training set.
DEFAULTS = {
    "tasks": ["boolean_expressions", "navigate", "sports_understanding", "web_of_lies", gsm8k.TASK],
    "train_per_task": 6,
    "test_per_task": 4,
    # Read by `nesycd evaluate`: the benchmarks to score. BBH and GSM8K are in-domain because they are trained on.
    "benchmarks": ["bbh", "gsm8k", "arc_easy", "arc_challenge", "agieval"],
}

TASK_GROUPS = {"bbh": list(bbh.TASKS), "all": [*bbh.TASKS, gsm8k.TASK]}


class PaperProgram(dspy.Module):
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


program = PaperProgram()


def load_data(data_dir, *, tasks=None, train_per_task=None, test_per_task=None):
    """Return (trainset, testset): BBH train/test splits (40% test, seed 42) plus GSM8K train/test."""
    bbh_tasks, with_gsm8k = split_tasks(tasks or DEFAULTS["tasks"])
    trainset, testset = [], []
    if bbh_tasks:
        trainset, testset = bbh.load_bbh(data_dir, bbh_tasks, train_per_task=train_per_task, test_per_task=test_per_task)
    if with_gsm8k:
        trainset += gsm8k.load_gsm8k(data_dir, "train", limit=train_per_task)
        testset += gsm8k.load_gsm8k(data_dir, "test", limit=test_per_task)
    return trainset, testset


def load_demos(data_dir, tasks):
    """Return the teacher's few-shot demonstrations: three per BBH task, and the three GSM8K ones."""
    bbh_tasks, with_gsm8k = split_tasks(tasks)
    demos = [demo for task in bbh_tasks for demo in bbh.load_cot_demos(data_dir, task)]
    if with_gsm8k:
        demos += _gsm8k_demos(data_dir)
    return demos


def split_tasks(tasks):
    """Return (BBH task names, whether GSM8K is included) for task names and the groups "bbh" and "all"."""
    names = []
    for task in tasks:
        names += TASK_GROUPS.get(task, [task])
    unknown = [task for task in names if task != gsm8k.TASK and task not in bbh.TASKS]
    if unknown:
        raise ConfigError(
            f"Unknown task {', '.join(map(repr, unknown))} for programs/paper.py. Pass BBH task names, "
            f"{gsm8k.TASK!r}, 'bbh' (all 27 BBH tasks) or 'all' (BBH and GSM8K)."
        )
    bbh_tasks = list(dict.fromkeys(task for task in names if task != gsm8k.TASK))
    return bbh_tasks, gsm8k.TASK in names


def _gsm8k_demos(data_dir):
    # The GSM8K demonstrations are defined in programs/gsm8k.py. It is read only while compiling, because a
    # compiled folder contains a copy of this file alone.
    from nesycd.program import load_program

    path = Path(__file__).with_name("gsm8k.py")
    if not path.is_file():
        raise ConfigError(f"{path} is missing; programs/paper.py takes its GSM8K demonstrations from it.")
    return load_program(path).load_demos(data_dir, [gsm8k.TASK])


metric = bbh.metric
