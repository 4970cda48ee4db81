"""Tests for BBH loading, the train/test split, CoT demos, the metric and data-directory resolution."""

import json
import os
import re
import shutil
from pathlib import Path

import dspy
import pytest

from nesycd.benchmarks import answers_match, extract_answer, normalize_choice
from nesycd.benchmarks.bbh import (
    ANSWER_TYPES,
    TASKS,
    load_bbh,
    load_cot_demos,
    load_task,
    metric,
    split_task,
)
from nesycd.data_dir import DATA_DIR_ENV, resolve_data_dir
from nesycd.errors import ConfigError, DataError

FIXTURE_DIR = Path(__file__).parent / "fixtures"
FIXTURE_TASKS = ["boolean_expressions", "date_understanding"]

_REAL_DATA = os.environ.get(DATA_DIR_ENV, "")
REAL_DATA_DIR = Path(_REAL_DATA) if _REAL_DATA else None
needs_real_data = pytest.mark.skipif(
    REAL_DATA_DIR is None or not (REAL_DATA_DIR / "bbh").is_dir(),
    reason=f"set {DATA_DIR_ENV} to a folder that contains the BBH release in bbh/ to run this test",
)


def _numbered_examples(count):
    return [dspy.Example(id=f"t/{index}", question=str(index)) for index in range(count)]


def _copy_fixtures(tmp_path):
    shutil.copytree(FIXTURE_DIR / "bbh", tmp_path / "bbh")
    return tmp_path


# split_task


def test_split_is_deterministic():
    examples = _numbered_examples(50)
    first = split_task(examples)
    second = split_task(examples)
    assert [e.id for e in first[0]] == [e.id for e in second[0]]
    assert [e.id for e in first[1]] == [e.id for e in second[1]]


def test_split_disjoint_and_complete():
    examples = _numbered_examples(37)
    train, test = split_task(examples)
    train_ids = {e.id for e in train}
    test_ids = {e.id for e in test}
    assert train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == {e.id for e in examples}


@pytest.mark.parametrize("count", [0, 1, 2, 5, 146, 178, 187, 250])
def test_split_test_size(count):
    _, test = split_task(_numbered_examples(count))
    assert len(test) == round(0.4 * count)


def test_split_keeps_file_order():
    train, test = split_task(_numbered_examples(30))
    train_positions = [int(e.question) for e in train]
    test_positions = [int(e.question) for e in test]
    assert train_positions == sorted(train_positions)
    assert test_positions == sorted(test_positions)


def test_split_depends_on_seed():
    examples = _numbered_examples(100)
    _, test_42 = split_task(examples, seed=42)
    _, test_7 = split_task(examples, seed=7)
    assert [e.id for e in test_42] != [e.id for e in test_7]


def test_split_custom_fraction():
    train, test = split_task(_numbered_examples(20), test_fraction=0.25)
    assert len(test) == 5
    assert len(train) == 15


def test_split_rejects_bad_fraction():
    with pytest.raises(ConfigError, match="1.5"):
        split_task(_numbered_examples(10), test_fraction=1.5)


# load_task and load_cot_demos on the fixtures


def test_fixture_task_loads():
    examples = load_task(FIXTURE_DIR, "date_understanding")
    assert len(examples) == 3
    first = examples[0]
    assert first.id == "date_understanding/0"
    assert first.task == "date_understanding"
    assert first.task_description == "Work out a date from a short description."
    assert first.question.startswith("The meeting was moved")
    assert "(C) 04/15/2021" in first.question
    assert first.answer == "(B)"
    assert first.answer_type == "choice"
    assert set(first.inputs().keys()) == {"question", "task", "task_description"}


def test_fixture_ids_follow_file_index():
    examples = load_task(FIXTURE_DIR, "boolean_expressions")
    assert [e.id for e in examples] == [f"boolean_expressions/{i}" for i in range(5)]
    assert examples[1].answer == "False"
    assert examples[1].answer_type == "true_false"


def test_fixture_cot_demos():
    demos = load_cot_demos(FIXTURE_DIR, "boolean_expressions")
    assert len(demos) == 3
    first = demos[0]
    assert first.question == "not True or True is"
    assert first.reasoning.startswith('"not" binds tighter than "or"')
    assert first.reasoning.endswith("Then False or True = True.")
    assert "So the answer is" not in first.reasoning
    assert first.answer == "True"
    assert first.task_description == "Evaluate a small Boolean expression."


def test_fixture_cot_demo_multiline_question():
    demos = load_cot_demos(FIXTURE_DIR, "date_understanding")
    assert [d.answer for d in demos] == ["(B)", "(A)", "(C)"]
    assert demos[0].question.endswith("(C) 03/02/2023")
    assert "Options:" in demos[0].question


def test_load_bbh_fixtures():
    train, test = load_bbh(FIXTURE_DIR, FIXTURE_TASKS)
    assert len(test) == round(0.4 * 5) + round(0.4 * 3)
    assert len(train) + len(test) == 8
    assert {e.task for e in train} == set(FIXTURE_TASKS)


def test_load_bbh_per_task_limits():
    train, test = load_bbh(FIXTURE_DIR, FIXTURE_TASKS, train_per_task=1, test_per_task=1)
    assert [e.task for e in train] == FIXTURE_TASKS
    assert [e.task for e in test] == FIXTURE_TASKS


def test_load_bbh_limits_take_first_of_split():
    full_train, _ = split_task(load_task(FIXTURE_DIR, "boolean_expressions"))
    train, _ = load_bbh(FIXTURE_DIR, ["boolean_expressions"], train_per_task=2)
    assert [e.id for e in train] == [e.id for e in full_train[:2]]


def test_load_bbh_rejects_negative_count():
    with pytest.raises(ConfigError, match="train_per_task"):
        load_bbh(FIXTURE_DIR, FIXTURE_TASKS, train_per_task=-1)


def test_load_bbh_rejects_duplicate_task():
    with pytest.raises(ConfigError, match="boolean_expressions"):
        load_bbh(FIXTURE_DIR, ["boolean_expressions", "boolean_expressions"])


# error messages


def test_unknown_task_error():
    with pytest.raises(DataError, match="'boolean_expression'") as caught:
        load_task(FIXTURE_DIR, "boolean_expression")
    assert "word_sorting" in str(caught.value)


def test_missing_task_file_error(tmp_path):
    with pytest.raises(DataError) as caught:
        load_task(tmp_path, "navigate")
    assert str(tmp_path / "bbh" / "navigate.json") in str(caught.value)


def test_missing_cot_prompt_error(tmp_path):
    data_dir = _copy_fixtures(tmp_path)
    cot_path = data_dir / "bbh" / "cot-prompts" / "boolean_expressions.txt"
    cot_path.unlink()
    with pytest.raises(DataError) as caught:
        load_task(data_dir, "boolean_expressions")
    assert str(cot_path) in str(caught.value)


def test_malformed_json_error(tmp_path):
    data_dir = _copy_fixtures(tmp_path)
    task_path = data_dir / "bbh" / "boolean_expressions.json"
    task_path.write_text('{\n  "examples": [\n    {"input": "x" "target": "y"}\n  ]\n}\n')
    with pytest.raises(DataError) as caught:
        load_task(data_dir, "boolean_expressions")
    message = str(caught.value)
    assert str(task_path) in message
    assert "line 3" in message


def test_missing_key_error(tmp_path):
    data_dir = _copy_fixtures(tmp_path)
    task_path = data_dir / "bbh" / "boolean_expressions.json"
    task_path.write_text(json.dumps({"examples": [{"input": "True is"}]}))
    with pytest.raises(DataError) as caught:
        load_task(data_dir, "boolean_expressions")
    message = str(caught.value)
    assert str(task_path) in message
    assert "'target'" in message


def test_missing_examples_list_error(tmp_path):
    data_dir = _copy_fixtures(tmp_path)
    task_path = data_dir / "bbh" / "boolean_expressions.json"
    task_path.write_text(json.dumps([{"input": "True is", "target": "True"}]))
    with pytest.raises(DataError, match="'examples'") as caught:
        load_task(data_dir, "boolean_expressions")
    assert str(task_path) in str(caught.value)


def test_cot_prompt_without_header_error(tmp_path):
    data_dir = _copy_fixtures(tmp_path)
    cot_path = data_dir / "bbh" / "cot-prompts" / "boolean_expressions.txt"
    cot_path.write_text("Q: True is\nA: Let's think step by step. So the answer is True.\n")
    with pytest.raises(DataError, match="-----") as caught:
        load_cot_demos(data_dir, "boolean_expressions")
    assert str(cot_path) in str(caught.value)


def test_cot_prompt_without_final_answer_error(tmp_path):
    data_dir = _copy_fixtures(tmp_path)
    cot_path = data_dir / "bbh" / "cot-prompts" / "boolean_expressions.txt"
    cot_path.write_text("canary\n-----\nDescription.\n\nQ: True is\nA: Let's think step by step. It is True.\n")
    with pytest.raises(DataError, match="exemplar 1") as caught:
        load_cot_demos(data_dir, "boolean_expressions")
    assert str(cot_path) in str(caught.value)


# metric


def test_metric_correct_prediction():
    example = load_task(FIXTURE_DIR, "date_understanding")[0]
    assert metric(example, dspy.Prediction(reasoning="...", answer="(B)")) is True


def test_metric_wrong_prediction():
    example = load_task(FIXTURE_DIR, "date_understanding")[0]
    assert metric(example, dspy.Prediction(reasoning="...", answer="(A)")) is False


def test_metric_none_answer():
    example = load_task(FIXTURE_DIR, "boolean_expressions")[0]
    assert metric(example, dspy.Prediction(reasoning="no marker", answer=None)) is False


def test_metric_missing_answer_field():
    example = load_task(FIXTURE_DIR, "boolean_expressions")[0]
    assert metric(example, dspy.Prediction(reasoning="no answer field")) is False


# resolve_data_dir


def test_data_dir_explicit_wins(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(other))
    assert resolve_data_dir(tmp_path) == tmp_path


def test_data_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path


def test_data_dir_unset_error(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=DATA_DIR_ENV):
        resolve_data_dir()


def test_data_dir_missing_error(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="--data-dir") as caught:
        resolve_data_dir(missing)
    assert str(missing) in str(caught.value)


def test_data_dir_file_error(tmp_path):
    file_path = tmp_path / "data.txt"
    file_path.write_text("not a folder")
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_dir(file_path)


# the real BBH release


@needs_real_data
def test_real_tasks_match_files():
    present = sorted(path.stem for path in (REAL_DATA_DIR / "bbh").glob("*.json"))
    assert present == sorted(TASKS)


@needs_real_data
def test_real_split_stable():
    first_train, first_test = load_bbh(REAL_DATA_DIR)
    second_train, second_test = load_bbh(REAL_DATA_DIR)
    assert [e.id for e in first_train] == [e.id for e in second_train]
    assert [e.id for e in first_test] == [e.id for e in second_test]

    for task in TASKS:
        size = len(load_task(REAL_DATA_DIR, task))
        test_count = sum(1 for e in first_test if e.task == task)
        train_count = sum(1 for e in first_train if e.task == task)
        assert test_count == round(0.4 * size), task
        assert train_count == size - test_count, task


@needs_real_data
@pytest.mark.parametrize("task", TASKS)
def test_real_cot_demos(task):
    demos = load_cot_demos(REAL_DATA_DIR, task)
    assert len(demos) == 3
    for demo in demos:
        assert demo.question, task
        assert demo.reasoning, task
        assert demo.task_description, task
        rebuilt = f"Let's think step by step. {demo.reasoning} So the answer is {demo.answer}."
        assert extract_answer(rebuilt) == demo.answer, task
        assert answers_match(demo.answer, demo.answer, ANSWER_TYPES[task]), task


_TARGET_FORMATS = {
    "choice": lambda target: normalize_choice(target) is not None,
    "yes_no": lambda target: target.lower() in {"yes", "no"},
    "true_false": lambda target: target in {"True", "False"},
    "valid_invalid": lambda target: target in {"valid", "invalid"},
    "number": lambda target: re.fullmatch(r"-?\d+", target) is not None,
    "text": lambda target: bool(target.strip()),
}


@needs_real_data
@pytest.mark.parametrize("task", TASKS)
def test_real_answer_type_fits_targets(task):
    targets = [e.answer for e in load_task(REAL_DATA_DIR, task)]
    fits = _TARGET_FORMATS[ANSWER_TYPES[task]]
    misfits = [target for target in targets if not fits(target)]
    # A few choice targets in the release are option text instead of a letter.
    assert len(misfits) <= 0.01 * len(targets), misfits


@needs_real_data
@pytest.mark.parametrize("task", TASKS)
def test_real_targets_compare(task):
    distinct_targets = sorted({e.answer for e in load_task(REAL_DATA_DIR, task)})[:12]
    answer_type = ANSWER_TYPES[task]
    for gold in distinct_targets:
        assert answers_match(gold, gold, answer_type), gold
        for other in distinct_targets:
            if other != gold:
                assert not answers_match(other, gold, answer_type), (other, gold)
