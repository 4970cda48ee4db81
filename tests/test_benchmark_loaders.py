"""Tests for the GSM8K, ARC and AGIEval loaders, their metrics and programs/gsm8k.py."""

import json
import os
import shutil
from pathlib import Path

import dspy
import pytest

from nesycd.benchmarks import agieval, arc, gsm8k
from nesycd.benchmarks import load_agieval, load_arc, load_gsm8k
from nesycd.benchmarks.answers import normalize_choice
from nesycd.data_dir import DATA_DIR_ENV
from nesycd.errors import ConfigError, DataError
from nesycd.program import load_program

TESTS = Path(__file__).parent
FIXTURE_DIR = TESTS / "fixtures"
GSM8K_PROGRAM = TESTS.parent / "programs" / "gsm8k.py"
FIXTURE_SUBSETS = ["lsat-lr", "logiqa-en", "sat-math", "sat-en-without-passage"]

_REAL_DATA = os.environ.get(DATA_DIR_ENV, "")
REAL_DATA_DIR = Path(_REAL_DATA) if _REAL_DATA else None


def _needs_real(folder):
    return pytest.mark.skipif(
        REAL_DATA_DIR is None or not (REAL_DATA_DIR / folder).is_dir(),
        reason=f"set {DATA_DIR_ENV} to a folder that contains {folder}/ to run this test",
    )


needs_real_gsm8k = _needs_real("gsm8k")
needs_real_arc = _needs_real("arc")
needs_real_agieval = _needs_real("agieval")

# Counts of the released files (GSM8K 2021-11-19, ARC train/dev, AGIEval v1).
REAL_GSM8K_COUNTS = {"train": 7473, "test": 1319}
REAL_ARC_COUNTS = {
    ("ARC-Challenge", "Train"): 1119,
    ("ARC-Challenge", "Dev"): 299,
    ("ARC-Easy", "Train"): 2251,
    ("ARC-Easy", "Dev"): 570,
}
REAL_AGIEVAL_COUNTS = {
    "lsat-ar": 230,
    "lsat-lr": 510,
    "lsat-rc": 269,
    "logiqa-en": 651,
    "sat-math": 220,
    "sat-en": 206,
    "sat-en-without-passage": 206,
    "aqua-rat": 254,
}
EXAMPLE_FIELDS = {"id", "task", "task_description", "question", "answer", "answer_type"}
INPUT_KEYS = {"question", "task", "task_description"}


def _copy_fixtures(tmp_path, folder):
    shutil.copytree(FIXTURE_DIR / folder, tmp_path / folder)
    return tmp_path


def _write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _is_letter_answer(answer, option_count):
    letter = normalize_choice(answer)
    return answer == f"({letter})" and letter in "ABCDE"[:option_count]


def _option_count(question):
    options = question.rsplit("\nOptions:\n", 1)[1]
    return len(options.split("\n"))


# GSM8K


def test_gsm8k_fixture_fields():
    example = load_gsm8k(FIXTURE_DIR, "train")[0]
    assert set(example.keys()) == EXAMPLE_FIELDS
    assert set(example.inputs().keys()) == INPUT_KEYS
    assert example.id == "gsm8k/train/0"
    assert example.task == "gsm8k"
    assert example.task_description == gsm8k.TASK_DESCRIPTION
    assert example.question == "Tom has 7 marbles and finds 5 more. How many marbles does he have now?"
    assert example.answer == "12"
    assert example.answer_type == "number"


def test_gsm8k_answer_drops_commas():
    assert load_gsm8k(FIXTURE_DIR, "train")[1].answer == "1250"


def test_gsm8k_negative_answer():
    assert load_gsm8k(FIXTURE_DIR, "train")[2].answer == "-5"


def test_gsm8k_test_split():
    examples = load_gsm8k(FIXTURE_DIR, "test")
    assert [example.id for example in examples] == ["gsm8k/test/0", "gsm8k/test/1"]
    assert [example.answer for example in examples] == ["36", "6"]


def test_gsm8k_limit():
    assert [example.answer for example in load_gsm8k(FIXTURE_DIR, "train", limit=2)] == ["12", "1250"]


def test_gsm8k_limit_zero():
    assert load_gsm8k(FIXTURE_DIR, "train", limit=0) == []


def test_gsm8k_negative_limit():
    with pytest.raises(ConfigError, match="limit"):
        load_gsm8k(FIXTURE_DIR, "train", limit=-1)


def test_gsm8k_unknown_split():
    with pytest.raises(ConfigError, match="'dev'") as caught:
        load_gsm8k(FIXTURE_DIR, "dev")
    assert "train, test" in str(caught.value)


@pytest.mark.parametrize(
    ("solution", "expected"),
    [("x\n#### 42", "42"), ("#### 1,080", "1080"), ("#### -7", "-7"), ("#### 2.5", "2.5"), ("no marker", None)],
)
def test_gsm8k_final_answer(solution, expected):
    assert gsm8k.final_answer(solution) == expected


def test_gsm8k_final_answer_rejects_words():
    assert gsm8k.final_answer("#### twelve") is None


def test_gsm8k_missing_file(tmp_path):
    with pytest.raises(DataError) as caught:
        load_gsm8k(tmp_path, "test")
    assert str(tmp_path / "gsm8k" / "test.jsonl") in str(caught.value)


def test_gsm8k_invalid_json_line(tmp_path):
    path = _copy_fixtures(tmp_path, "gsm8k") / "gsm8k" / "train.jsonl"
    lines = path.read_text().splitlines()
    _write_lines(path, [lines[0], lines[1], '{"question": "q" "answer": "#### 1"}'])
    with pytest.raises(DataError) as caught:
        load_gsm8k(tmp_path, "train")
    message = str(caught.value)
    assert str(path) in message
    assert "line 3" in message
    assert "invalid JSON" in message


def test_gsm8k_missing_marker_line(tmp_path):
    path = tmp_path / "gsm8k" / "train.jsonl"
    _write_lines(path, [json.dumps({"question": "q", "answer": "It is 4."})])
    with pytest.raises(DataError) as caught:
        load_gsm8k(tmp_path, "train")
    message = str(caught.value)
    assert str(path) in message
    assert "line 1" in message
    assert "#### <number>" in message


def test_gsm8k_missing_question_line(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    _write_lines(path, [json.dumps({"question": "q", "answer": "#### 1"}), json.dumps({"answer": "#### 2"})])
    with pytest.raises(DataError) as caught:
        load_gsm8k(tmp_path, "test")
    message = str(caught.value)
    assert str(path) in message
    assert "line 2" in message
    assert "'question'" in message


def test_gsm8k_array_line(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    _write_lines(path, ['["q", "#### 1"]'])
    with pytest.raises(DataError, match="line 1: a JSON list instead of an object"):
        load_gsm8k(tmp_path, "test")


def test_gsm8k_blank_lines_skipped(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    _write_lines(path, ["", json.dumps({"question": "q", "answer": "#### 1"}), "  "])
    assert [example.answer for example in load_gsm8k(tmp_path, "test")] == ["1"]


def test_gsm8k_empty_file(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    _write_lines(path, [])
    with pytest.raises(DataError, match="contains no examples"):
        load_gsm8k(tmp_path, "test")


def test_gsm8k_invalid_utf8_line(tmp_path):
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff"}\n')
    with pytest.raises(DataError) as caught:
        load_gsm8k(tmp_path, "test")
    message = str(caught.value)
    assert "line 2" in message
    assert "UTF-8" in message


def test_gsm8k_metric():
    example = load_gsm8k(FIXTURE_DIR, "train")[1]
    assert gsm8k.metric(example, dspy.Prediction(answer="$1,250"))
    assert not gsm8k.metric(example, dspy.Prediction(answer="125"))
    assert not gsm8k.metric(example, dspy.Prediction(answer=None))


# ARC


def test_arc_fixture_fields():
    example = load_arc(FIXTURE_DIR, "ARC-Easy", "Train")[0]
    assert set(example.keys()) == EXAMPLE_FIELDS
    assert set(example.inputs().keys()) == INPUT_KEYS
    assert example.id == "arc_easy/Fixture_Easy_1"
    assert example.task == "arc_easy"
    assert example.task_description == arc.SUBSETS["ARC-Easy"][1]
    assert example.answer == "(C)"
    assert example.answer_type == "choice"


def test_arc_question_renders_options():
    question = load_arc(FIXTURE_DIR, "ARC-Easy", "Train")[0].question
    expected = (
        "Which part of a plant takes in water from the soil?\n"
        "Options:\n(A) leaf\n(B) flower\n(C) root\n(D) stem"
    )
    assert question == expected


def test_arc_numeric_labels_become_letters():
    example = load_arc(FIXTURE_DIR, "ARC-Easy", "Train")[1]
    assert example.answer == "(A)"
    assert "(A) chemical energy" in example.question


def test_arc_numeric_answer_key_by_position():
    assert load_arc(FIXTURE_DIR, "ARC-Easy", "Dev")[1].answer == "(D)"


def test_arc_three_choices():
    question = load_arc(FIXTURE_DIR, "ARC-Easy", "Train")[2].question
    assert question.endswith("(C) solid")
    assert "(D)" not in question


def test_arc_five_choices():
    example = load_arc(FIXTURE_DIR, "ARC-Challenge", "Dev")[0]
    assert example.task == "arc_challenge"
    assert example.question.endswith("(E) more plants")
    assert example.answer == "(D)"


def test_arc_limit():
    assert len(load_arc(FIXTURE_DIR, "ARC-Easy", "Train", limit=2)) == 2


def test_arc_unknown_subset():
    with pytest.raises(ConfigError, match="'ARC-Hard'"):
        load_arc(FIXTURE_DIR, "ARC-Hard", "Train")


def test_arc_unknown_split():
    with pytest.raises(ConfigError, match="'dev'"):
        load_arc(FIXTURE_DIR, "ARC-Easy", "dev")


def test_arc_missing_test_split():
    with pytest.raises(DataError) as caught:
        load_arc(FIXTURE_DIR, "ARC-Challenge", "Test")
    message = str(caught.value)
    assert str(FIXTURE_DIR / "arc" / "ARC-Challenge" / "ARC-Challenge-Test.jsonl") in message
    assert "split='Dev'" in message


def test_arc_test_split_loads_when_present(tmp_path):
    data_dir = _copy_fixtures(tmp_path, "arc")
    shutil.copy(
        data_dir / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl", data_dir / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    )
    assert len(load_arc(data_dir, "ARC-Easy", "Test")) == 2


def test_arc_missing_train_file(tmp_path):
    with pytest.raises(DataError) as caught:
        load_arc(tmp_path, "ARC-Easy", "Train")
    assert str(tmp_path / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl") in str(caught.value)


def test_arc_answer_key_not_a_label(tmp_path):
    path = _copy_fixtures(tmp_path, "arc") / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["answerKey"] = "E"
    _write_lines(path, [json.dumps(record) for record in records])
    with pytest.raises(DataError) as caught:
        load_arc(tmp_path, "ARC-Easy", "Dev")
    message = str(caught.value)
    assert str(path) in message
    assert "line 2" in message
    assert "answerKey 'E'" in message


def test_arc_missing_stem(tmp_path):
    path = tmp_path / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    _write_lines(path, [json.dumps({"id": "x", "question": {"choices": []}, "answerKey": "A"})])
    with pytest.raises(DataError) as caught:
        load_arc(tmp_path, "ARC-Easy", "Dev")
    message = str(caught.value)
    assert "line 1" in message
    assert "'question.stem'" in message


def test_arc_one_choice(tmp_path):
    path = tmp_path / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    record = {"id": "x", "question": {"stem": "s", "choices": [{"text": "t", "label": "A"}]}, "answerKey": "A"}
    _write_lines(path, [json.dumps(record)])
    with pytest.raises(DataError, match="2 to 5 choices"):
        load_arc(tmp_path, "ARC-Easy", "Dev")


def test_arc_duplicate_id(tmp_path):
    path = _copy_fixtures(tmp_path, "arc") / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    first = path.read_text().splitlines()[0]
    _write_lines(path, [first, first])
    with pytest.raises(DataError) as caught:
        load_arc(tmp_path, "ARC-Easy", "Dev")
    message = str(caught.value)
    assert "line 2" in message
    assert "'Fixture_Easy_4' appears twice" in message


def test_arc_metric():
    example = load_arc(FIXTURE_DIR, "ARC-Easy", "Dev")[0]
    assert arc.metric(example, dspy.Prediction(answer="(B) thermometer"))
    assert not arc.metric(example, dspy.Prediction(answer="A"))


# AGIEval


def test_agieval_fixture_fields():
    example = load_agieval(FIXTURE_DIR, ["lsat-lr"])[0]
    assert set(example.keys()) == EXAMPLE_FIELDS
    assert set(example.inputs().keys()) == INPUT_KEYS
    assert example.id == "lsat-lr/0"
    assert example.task == "lsat-lr"
    assert example.task_description == agieval.SUBSETS["lsat-lr"]
    assert example.answer == "(B)"
    assert example.answer_type == "choice"


def test_agieval_passage_question_options():
    expected = (
        "Every cat in the shelter is vaccinated. Whiskers is in the shelter.\n\n"
        "Which one of the following must be true?\n"
        "Options:\n"
        "(A) Whiskers is a dog.\n"
        "(B) Whiskers is vaccinated.\n"
        "(C) Every vaccinated animal is a cat.\n"
        "(D) Whiskers was born in the shelter.\n"
        "(E) No dog is vaccinated."
    )
    assert load_agieval(FIXTURE_DIR, ["lsat-lr"])[0].question == expected


def test_agieval_empty_passage_left_out():
    question = load_agieval(FIXTURE_DIR, ["sat-math"])[0].question
    assert question.startswith("If $2x+3=11$")


def test_agieval_null_passage_left_out():
    question = load_agieval(FIXTURE_DIR, ["sat-en-without-passage"])[0].question
    assert question.startswith("The main purpose")


def test_agieval_options_sorted_by_label():
    question = load_agieval(FIXTURE_DIR, ["logiqa-en"])[0].question
    assert question.endswith(
        "(A) Zhao finished first.\n(B) Li did not finish last.\n(C) Wang finished before Li.\n(D) Wang finished last."
    )


def test_agieval_bare_and_missing_labels():
    question = load_agieval(FIXTURE_DIR, ["logiqa-en"])[1].question
    assert question.endswith("Options:\n(A) Sunday\n(B) Monday\n(C) Tuesday\n(D) Wednesday")


def test_agieval_groups_by_subset():
    examples = load_agieval(FIXTURE_DIR, FIXTURE_SUBSETS)
    tasks = [example.task for example in examples]
    assert tasks == ["lsat-lr", "logiqa-en", "logiqa-en", "sat-math", "sat-en-without-passage"]


def test_agieval_limit_per_subset():
    examples = load_agieval(FIXTURE_DIR, ["logiqa-en", "sat-math"], limit=1)
    assert [example.id for example in examples] == ["logiqa-en/0", "sat-math/0"]


def test_agieval_default_needs_all_files():
    with pytest.raises(DataError) as caught:
        load_agieval(FIXTURE_DIR)
    assert str(FIXTURE_DIR / "agieval" / "lsat-ar.jsonl") in str(caught.value)


def test_agieval_unknown_subset():
    with pytest.raises(ConfigError, match="'math'") as caught:
        load_agieval(FIXTURE_DIR, ["math"])
    assert "aqua-rat" in str(caught.value)


def test_agieval_duplicate_subset():
    with pytest.raises(ConfigError, match="listed twice"):
        load_agieval(FIXTURE_DIR, ["sat-math", "sat-math"])


def test_agieval_subset_string():
    with pytest.raises(ConfigError, match="list of names"):
        load_agieval(FIXTURE_DIR, "sat-math")


def test_agieval_label_out_of_range(tmp_path):
    path = _copy_fixtures(tmp_path, "agieval") / "agieval" / "sat-math.jsonl"
    record = json.loads(path.read_text())
    record["label"] = "E"
    _write_lines(path, [json.dumps(record)])
    with pytest.raises(DataError) as caught:
        load_agieval(tmp_path, ["sat-math"])
    message = str(caught.value)
    assert str(path) in message
    assert "line 1" in message
    assert "label 'E'" in message


def test_agieval_repeated_option_letter(tmp_path):
    path = tmp_path / "agieval" / "sat-math.jsonl"
    record = {"passage": "", "question": "q", "options": ["(A)1", "(A)2"], "label": "A"}
    _write_lines(path, [json.dumps(record)])
    with pytest.raises(DataError) as caught:
        load_agieval(tmp_path, ["sat-math"])
    message = str(caught.value)
    assert "line 1" in message
    assert "repeats the letter (A)" in message


def test_agieval_skipped_option_letter(tmp_path):
    path = tmp_path / "agieval" / "sat-math.jsonl"
    record = {"passage": "", "question": "q", "options": ["(A)1", "(C)2"], "label": "A"}
    _write_lines(path, [json.dumps(record)])
    with pytest.raises(DataError, match="option letters are A, C instead of A, B"):
        load_agieval(tmp_path, ["sat-math"])


def test_agieval_missing_options(tmp_path):
    path = tmp_path / "agieval" / "sat-math.jsonl"
    _write_lines(path, [json.dumps({"passage": None, "question": "q", "options": None, "label": None})])
    with pytest.raises(DataError) as caught:
        load_agieval(tmp_path, ["sat-math"])
    message = str(caught.value)
    assert str(path) in message
    assert "'options'" in message


def test_agieval_invalid_json_line(tmp_path):
    path = _copy_fixtures(tmp_path, "agieval") / "agieval" / "logiqa-en.jsonl"
    lines = path.read_text().splitlines()
    _write_lines(path, [lines[0], lines[1][:-1]])
    with pytest.raises(DataError) as caught:
        load_agieval(tmp_path, ["logiqa-en"])
    message = str(caught.value)
    assert str(path) in message
    assert "line 2" in message


def test_agieval_metric():
    example = load_agieval(FIXTURE_DIR, ["sat-math"])[0]
    assert agieval.metric(example, dspy.Prediction(answer="B"))
    assert not agieval.metric(example, dspy.Prediction(answer="4"))


# programs/gsm8k.py


@pytest.fixture(scope="module")
def gsm8k_spec():
    return load_program(GSM8K_PROGRAM)


def test_program_loads(gsm8k_spec):
    assert gsm8k_spec.name == "gsm8k"
    assert gsm8k_spec.load_demos is not None


def test_program_defaults(gsm8k_spec):
    assert gsm8k_spec.defaults == {"tasks": ["gsm8k"], "train_per_task": 16, "test_per_task": 8}


def test_program_load_data(gsm8k_spec):
    train, test = gsm8k_spec.load_data(FIXTURE_DIR, tasks=["gsm8k"], train_per_task=2, test_per_task=1)
    assert [example.id for example in train] == ["gsm8k/train/0", "gsm8k/train/1"]
    assert [example.id for example in test] == ["gsm8k/test/0"]


def test_program_load_data_all(gsm8k_spec):
    train, test = gsm8k_spec.load_data(FIXTURE_DIR)
    assert len(train) == 3
    assert len(test) == 2


def test_program_rejects_other_task(gsm8k_spec):
    with pytest.raises(ConfigError, match="'navigate'"):
        gsm8k_spec.load_data(FIXTURE_DIR, tasks=["navigate"])


def test_program_rejects_negative_count(gsm8k_spec):
    with pytest.raises(ConfigError, match="test_per_task"):
        gsm8k_spec.load_data(FIXTURE_DIR, test_per_task=-1)


def test_program_demos(gsm8k_spec):
    demos = gsm8k_spec.load_demos(FIXTURE_DIR, ["gsm8k"])
    assert len(demos) == 3
    for demo in demos:
        assert demo.task == "gsm8k"
        assert demo.question.strip()
        assert demo.reasoning.strip()
        assert gsm8k.final_answer(f"#### {demo.answer}") == demo.answer


def test_program_demo_reasoning_computes_answer(gsm8k_spec):
    for demo in gsm8k_spec.load_demos(FIXTURE_DIR, ["gsm8k"]):
        assert f"= {demo.answer} " in demo.reasoning or f"= ${demo.answer}." in demo.reasoning


def test_program_demos_other_task(gsm8k_spec):
    assert gsm8k_spec.load_demos(FIXTURE_DIR, ["navigate"]) == []


def test_program_metric(gsm8k_spec):
    example = load_gsm8k(FIXTURE_DIR, "test")[0]
    assert gsm8k_spec.metric(example, dspy.Prediction(answer="36 pages"))


# Real data


@needs_real_gsm8k
@pytest.mark.parametrize("split", sorted(REAL_GSM8K_COUNTS))
def test_real_gsm8k(split):
    examples = load_gsm8k(REAL_DATA_DIR, split)
    assert len(examples) == REAL_GSM8K_COUNTS[split]
    invalid = [example.id for example in examples if gsm8k.final_answer(f"#### {example.answer}") != example.answer]
    assert invalid == []


@needs_real_arc
@pytest.mark.parametrize(("subset", "split"), sorted(REAL_ARC_COUNTS))
def test_real_arc(subset, split):
    examples = load_arc(REAL_DATA_DIR, subset, split)
    assert len(examples) == REAL_ARC_COUNTS[(subset, split)]
    invalid = [
        example.id for example in examples if not _is_letter_answer(example.answer, _option_count(example.question))
    ]
    assert invalid == []


@needs_real_arc
@pytest.mark.parametrize("subset", ["ARC-Easy", "ARC-Challenge"])
def test_real_arc_test_missing(subset):
    if (REAL_DATA_DIR / "arc" / subset / f"{subset}-Test.jsonl").is_file():
        pytest.skip(f"the {subset} Test file is present")
    with pytest.raises(DataError, match="split='Dev'"):
        load_arc(REAL_DATA_DIR, subset, "Test")


@needs_real_agieval
def test_real_agieval():
    examples = load_agieval(REAL_DATA_DIR)
    counts = {subset: 0 for subset in REAL_AGIEVAL_COUNTS}
    for example in examples:
        counts[example.task] += 1
    assert counts == REAL_AGIEVAL_COUNTS
    invalid = [
        example.id for example in examples if not _is_letter_answer(example.answer, _option_count(example.question))
    ]
    assert invalid == []
