"""Tests for answer extraction, choice normalisation and answer comparison."""

import pytest

from nesycd.benchmarks.answers import (
    ANSWER_MARKER,
    answers_match,
    extract_answer,
    normalize_choice,
)
from nesycd.errors import DataError

# (model output, gold answer, answer type, expected match)
SCORED_OUTPUTS = [
    # choice
    ("Step one. Therefore, the answer is (B).", "(B)", "choice", True),
    ("Step one. Therefore, the answer is (C).", "(B)", "choice", False),
    ("First (A) looks right. Therefore, the answer is (A). On reflection, Therefore, the answer is (D).", "(D)", "choice", True),
    ("Therefore, the answer is (A). Later: therefore, the answer is (E).", "(A)", "choice", False),
    ("therefore, the answer is (c).", "(C)", "choice", True),
    ("The stack empties. Therefore, the answer is **(B)**.", "(B)", "choice", True),
    ("Therefore, the answer is Option B.", "(B)", "choice", True),
    ("Therefore, the answer is option (b)", "(B)", "choice", True),
    ("Therefore, the answer is (B) 03/15/2021.", "(B)", "choice", True),
    ("Therefore, the answer is B.", "(B)", "choice", True),
    ("Therefore, the answer is b)", "(B)", "choice", True),
    ("Therefore, the answer is 03/15/2021.", "(B)", "choice", False),
    ("Therefore, the answer is Monsters, Inc.", "Monsters, Inc", "choice", True),
    ("So the answer is (F).", "(F)", "choice", True),
    ("Reasoning.\nAnswer: (G)", "(G)", "choice", True),
    ("Therefore, the answer is:\n\n(B)", "(B)", "choice", True),
    ("Therefore, the answer is (A).\nQuestion: Which is bigger?\nTherefore, the answer is (C).", "(A)", "choice", True),
    ("Therefore, the answer is (A).\nQ: Another one?\nA: Let's think step by step. So the answer is (B).", "(B)", "choice", False),
    ("I am not sure which option fits.", "(A)", "choice", False),
    # yes_no
    ("He meant to do it. Therefore, the answer is Yes.", "Yes", "yes_no", True),
    ("Therefore, the answer is No.", "Yes", "yes_no", False),
    ("Therefore, the answer is Yes, because the route returns to the start.", "Yes", "yes_no", True),
    ("Therefore, the answer is **no**.", "No", "yes_no", True),
    ("Therefore, the answer is \"yes\".", "yes", "yes_no", True),
    ("Therefore, the answer is - No", "No", "yes_no", True),
    ("Therefore, the answer is nope.", "No", "yes_no", False),
    ("The player is a footballer. So the answer is no.", "no", "yes_no", True),
    # true_false
    ("not False = True. Therefore, the answer is True.", "True", "true_false", True),
    ("Therefore, the answer is false.", "False", "true_false", True),
    ("Therefore, the answer is True.", "False", "true_false", False),
    ("Therefore, the answer is False, since both sides are False.", "False", "true_false", True),
    # valid_invalid
    ("Therefore, the answer is invalid.", "invalid", "valid_invalid", True),
    ("Therefore, the answer is valid.", "invalid", "valid_invalid", False),
    ("Therefore, the answer is invalid.", "valid", "valid_invalid", False),
    ("Therefore, the answer is deductively valid.", "valid", "valid_invalid", True),
    ("Therefore, the answer is not valid.", "invalid", "valid_invalid", True),
    ("Therefore, the answer is unclear.", "valid", "valid_invalid", False),
    # number
    ("3 + 4 + 5 = 12. Therefore, the answer is 12.", "12", "number", True),
    ("Therefore, the answer is 12.0", "12", "number", True),
    ("Therefore, the answer is 1,234.", "1234", "number", True),
    ("Therefore, the answer is $5.", "5", "number", True),
    ("Therefore, the answer is -3.", "-3", "number", True),
    ("Therefore, the answer is 3.", "-3", "number", False),
    ("Therefore, the answer is 8 objects.", "8", "number", True),
    ("Therefore, the answer is -11520.", "-11520", "number", True),
    ("Therefore, the answer is 12.5", "12", "number", False),
    ("Therefore, the answer is eight.", "8", "number", False),
    # text: word_sorting
    ("Therefore, the answer is arson aspect census.", "arson aspect census", "text", True),
    ("Therefore, the answer is arson   aspect  census", "arson aspect census", "text", True),
    ("Therefore, the answer is aspect arson census.", "arson aspect census", "text", False),
    # text: dyck_languages
    ("Therefore, the answer is ] ) ).", "] ) )", "text", True),
    ("Therefore, the answer is ]  )   )", "] ) )", "text", True),
    ("Therefore, the answer is ]))", "] ) )", "text", True),
    ("Therefore, the answer is ] )", "] ) )", "text", False),
    # no answer at all
    ("The model stopped before it answered", "(A)", "choice", False),
    ("", "12", "number", False),
]


@pytest.mark.parametrize(("output", "gold", "answer_type", "expected"), SCORED_OUTPUTS)
def test_scored_output(output, gold, answer_type, expected):
    assert answers_match(extract_answer(output), gold, answer_type) is expected


# (model output, expected extracted span)
EXTRACTED_SPANS = [
    ("Therefore, the answer is (B).", "(B)"),
    ("Therefore, the answer is (A). Therefore, the answer is (C).", "(C)"),
    ("THEREFORE, THE ANSWER IS yes.", "yes"),
    ("Therefore, the answer is **(D)**.", "(D)"),
    ("Therefore, the answer is '12'.", "12"),
    ("Therefore, the answer is 12.\nExtra words on the next line.", "12"),
    ("Therefore, the answer is ] } ].", "] } ]"),
    ("Therefore, the answer is 1.5.", "1.5"),
    ("So the answer is (E).", "(E)"),
    ("We conclude the answer is 7", "7"),
    ("Answer: valid", "valid"),
    ("So the answer is (A). Therefore, the answer is (B).", "(B)"),
    ("Q: Is it plausible?\nA: Let's think step by step. So the answer is no.", "no"),
    ("Therefore, the answer is (B).\n\nQuestion: What next?\nTherefore, the answer is (C).", "(B)"),
    ("Therefore, the answer is (B).\nQ: What next?\nA: So the answer is (C).", "(B)"),
    ("No marker anywhere in this output.", None),
    ("Therefore, the answer is.", None),
    ("Therefore, the answer is ****", None),
    ("", None),
]


@pytest.mark.parametrize(("output", "expected"), EXTRACTED_SPANS)
def test_extract_answer(output, expected):
    assert extract_answer(output) == expected


def test_marker_constant():
    assert ANSWER_MARKER == "Therefore, the answer is"


CHOICES = [
    ("(B)", "B"),
    ("B", "B"),
    ("b", "B"),
    ("b)", "B"),
    ("B.", "B"),
    ("Option B", "B"),
    ("option (b)", "B"),
    ("Option C: the third one", "C"),
    ("(B) some option text", "B"),
    ("**(K)**", "K"),
    (" (A) ", "A"),
    ("Options: (A)", None),
    ("A cat", None),
    ("Brown", None),
    ("12", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("text", "expected"), CHOICES)
def test_normalize_choice(text, expected):
    assert normalize_choice(text) == expected


@pytest.mark.parametrize("answer_type", ["choice", "yes_no", "true_false", "valid_invalid", "number", "text"])
def test_none_prediction_never_matches(answer_type):
    assert answers_match(None, "valid", answer_type) is False


def test_unknown_answer_type_rejected():
    with pytest.raises(DataError, match="'multiple_choice'"):
        answers_match("(A)", "(A)", "multiple_choice")
