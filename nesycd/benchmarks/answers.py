"""Answer extraction from free-form model output and answer comparison per answer type."""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Callable

from nesycd.errors import DataError

logger = logging.getLogger(__name__)

ANSWER_MARKER = "Therefore, the answer is"

# Markers searched in this order. The first one that the text contains decides the answer.
ANSWER_MARKERS: tuple[str, ...] = (ANSWER_MARKER, "So the answer is", "the answer is", "Answer:")
_MARKER_PATTERNS = tuple(re.compile(re.escape(marker), re.IGNORECASE) for marker in ANSWER_MARKERS)

# A line that starts a new question means the model kept generating past its own answer.
_FOLLOW_ON_QUESTION = re.compile(r"\n[ \t]*(?:Question|Q):")

# Characters that wrap an answer span in model output: markdown bold or code, and quotes.
_WRAPPER_CHARS = "*_`\"'“”‘’"

# Multiple-choice letter patterns, tried in order on the stripped, wrapper-free text.
_CHOICE_PATTERNS: tuple[re.Pattern[str], ...] = (
    # "(B)", "(B) option text", "(b)."
    re.compile(r"^\(([a-z])\)", re.IGNORECASE),
    # "Option B", "option (b)", "Option B: option text"
    re.compile(r"^option(?:\s+\(?|\s*\()([a-z])\)?(?![a-z])", re.IGNORECASE),
    # "B", "b)", "B.", "B: option text". A bare letter must end the text or be followed by ) . or :
    re.compile(r"^([a-z])(?:[).:]|$)", re.IGNORECASE),
)

# A number with optional sign and dollar sign: "-3", "$5", "-$5", "1,234", "12.0", ".5".
_NUMBER = re.compile(
    r"(?P<sign>[-+−]?)\s*\$?\s*(?P<inner_sign>[-+−]?)"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)

_FIRST_WORD = re.compile(r"[^a-z]*([a-z]+)")

# Dyck-language answers are bracket sequences, so spacing between the brackets carries no meaning.
_BRACKETS_ONLY = re.compile(r"^[\s()\[\]{}<>]+$")


def extract_answer(text: str) -> str | None:
    """Extract the final answer span from a model's free-form output.

    The span follows the last occurrence (case-insensitive) of the first marker in
    ``ANSWER_MARKERS`` that the text contains, and ends at the next newline. Blank lines and
    a colon right after the marker are skipped. Whitespace, surrounding quotes and markdown
    emphasis, and one trailing period are removed.

    Before the search, the text is cut at the first line that starts a new question
    ("Question:" or "Q:"), because small models often go on to invent and answer a further
    question. A question echoed at the very start of the output is kept.

    Returns None when no marker is found or the span is empty.
    """
    if not text:
        return None

    own_output = _cut_follow_on_question(text.lstrip())

    for marker_pattern in _MARKER_PATTERNS:
        matches = list(marker_pattern.finditer(own_output))
        if not matches:
            continue
        after_marker = own_output[matches[-1].end() :].lstrip(" \t\r\n:")
        span = after_marker.split("\n", 1)[0]
        return _clean_span(span)

    return None


def normalize_choice(text: str | None) -> str | None:
    """Return the upper-case multiple-choice letter that ``text`` names, or None.

    Accepted forms include "(B)", "B", "b)", "B.", "Option B", "option (b)" and
    "(B) option text". Any other text, such as an option's wording alone, is not a choice.
    """
    if text is None:
        return None

    candidate = _strip_wrappers(text)
    for pattern in _CHOICE_PATTERNS:
        match = pattern.match(candidate)
        if match:
            return match.group(1).upper()
    return None


def answers_match(prediction: str | None, gold: str, answer_type: str) -> bool:
    """Return whether a predicted answer span matches the gold answer under ``answer_type``.

    ``prediction`` is an answer span such as ``extract_answer`` returns; surrounding
    quotes, markdown emphasis and one trailing period are removed before comparing.
    A None or empty prediction never matches. The answer types are the keys of
    ``ANSWER_COMPARATORS``.

    Raises:
        DataError: ``answer_type`` is not a known answer type.
    """
    comparator = ANSWER_COMPARATORS.get(answer_type)
    if comparator is None:
        known = ", ".join(sorted(ANSWER_COMPARATORS))
        raise DataError(
            f"Unknown answer type {answer_type!r}. Set the example's answer_type to one of: {known}."
        )

    if prediction is None:
        return False
    cleaned = _clean_span(str(prediction))
    if cleaned is None:
        return False
    return comparator(cleaned, str(gold))


def _cut_follow_on_question(text: str) -> str:
    match = _FOLLOW_ON_QUESTION.search(text)
    if match is None:
        return text
    return text[: match.start()]


def _strip_wrappers(text: str) -> str:
    return text.strip().strip(_WRAPPER_CHARS).strip()


def _clean_span(span: str) -> str | None:
    """Remove whitespace, wrappers and one trailing period, or return None when nothing is left."""
    cleaned = _strip_wrappers(span)
    if cleaned.endswith("."):
        cleaned = _strip_wrappers(cleaned[:-1])
    return cleaned or None


def _normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def _first_word(text: str) -> str | None:
    match = _FIRST_WORD.match(text.lower())
    if match is None:
        return None
    return match.group(1)


def _parse_number(text: str) -> Decimal | None:
    """Parse the first number in ``text``, ignoring thousands commas, "$" and any unit after it."""
    match = _NUMBER.search(text)
    if match is None:
        return None

    digits = match.group("digits").replace(",", "")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None

    signs = match.group("sign") + match.group("inner_sign")
    minus_count = sum(1 for sign in signs if sign in "-−")
    if minus_count % 2 == 1:
        return -value
    return value


def _fallacy_label(text: str) -> str | None:
    """Map a formal_fallacies answer to "valid" or "invalid", or None when it names neither."""
    lowered = text.lower()
    if "invalid" in lowered or "not valid" in lowered:
        return "invalid"
    if "valid" in lowered:
        return "valid"
    return None


def _match_text(prediction: str, gold: str) -> bool:
    if _normalize_whitespace(prediction) == _normalize_whitespace(gold):
        return True
    both_brackets = _BRACKETS_ONLY.match(prediction) and _BRACKETS_ONLY.match(gold)
    if both_brackets:
        return "".join(prediction.split()) == "".join(gold.split())
    return False


def _match_choice(prediction: str, gold: str) -> bool:
    gold_letter = normalize_choice(gold)
    if gold_letter is None:
        # NOTE: a few BBH targets are option text instead of a letter (a movie_recommendation
        # and two ruin_names targets whose options were split at commas), so compare text.
        return _normalize_whitespace(prediction).lower() == _normalize_whitespace(gold).lower()
    return normalize_choice(prediction) == gold_letter


def _match_word(prediction: str, gold: str) -> bool:
    """Compare the first word of the prediction with the gold word, ignoring case."""
    predicted_word = _first_word(prediction)
    return predicted_word is not None and predicted_word == gold.strip().lower()


def _match_fallacy(prediction: str, gold: str) -> bool:
    predicted_label = _fallacy_label(prediction)
    return predicted_label is not None and predicted_label == _fallacy_label(gold)


def _match_number(prediction: str, gold: str) -> bool:
    gold_value = _parse_number(gold)
    if gold_value is None:
        return _match_text(prediction, gold)
    return _parse_number(prediction) == gold_value


ANSWER_COMPARATORS: dict[str, Callable[[str, str], bool]] = {
    "choice": _match_choice,
    "yes_no": _match_word,
    "true_false": _match_word,
    "valid_invalid": _match_fallacy,
    "number": _match_number,
    "text": _match_text,
}
