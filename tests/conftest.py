"""Shared fixtures: offline environment, the data folder, a BBH-format fixture and tiny models."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
REPO = TESTS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _boolean_expression(rng: random.Random) -> str:
    words = [rng.choice(["True", "False"])]
    for _ in range(rng.randint(1, 2)):
        words += [rng.choice(["and", "or"]), rng.choice(["", "not "]) + rng.choice(["True", "False"])]
    return " ".join(words)


@pytest.fixture(scope="session")
def boolean_data_dir(tmp_path_factory) -> Path:
    """A data folder with a generated BBH-format boolean_expressions task of 20 questions."""
    root = tmp_path_factory.mktemp("data")
    (root / "bbh" / "cot-prompts").mkdir(parents=True)
    rng = random.Random(7)
    examples = []
    while len(examples) < 20:
        expression = _boolean_expression(rng)
        target = str(eval(expression))  # the expression is built from True/False/and/or/not only
        examples.append({"input": f"{expression} is", "target": target})
    (root / "bbh" / "boolean_expressions.json").write_text(json.dumps({"canary": "test fixture", "examples": examples}))
    prompt = (TESTS / "fixtures" / "bbh" / "cot-prompts" / "boolean_expressions.txt").read_text()
    (root / "bbh" / "cot-prompts" / "boolean_expressions.txt").write_text(prompt)
    return root


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the SmolLM2 tokenizer, saved to a folder."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-student", seed=1)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, boolean_data_dir, tiny_student) -> Path:
    """A tiny model trained to answer "True" with a fixed rationale and to write a fixed KB entry."""
    from nesycd.adapter import format_knowledge_prompt, format_prompt
    from nesycd.benchmarks import bbh
    from tiny_model import train_tiny_teacher

    train, test = bbh.load_bbh(boolean_data_dir, ["boolean_expressions"])
    demos = [demo.toDict() for demo in bbh.load_cot_demos(boolean_data_dir, "boolean_expressions")]
    examples = train + test
    cot = [format_prompt(ex.task_description, ex.question, demos=demos) for ex in examples]
    # Student responses in a real compile are the tiny student's noise, so train on random token soup.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    rng = random.Random(3)
    knowledge = []
    for index in range(3 * len(examples)):
        example = examples[index % len(examples)]
        noise = tokenizer.decode([rng.randrange(len(tokenizer)) for _ in range(rng.randint(4, 40))])
        knowledge.append(format_knowledge_prompt(example.task_description, example.question, noise))
    return train_tiny_teacher(tmp_path_factory.mktemp("models") / "tiny-teacher", {"cot": cot, "knowledge": knowledge})
