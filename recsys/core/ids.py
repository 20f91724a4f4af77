"""The one set of rules for IDs and text values that arrive between builds (posted events,
catalogue changes, stream messages, URLs), so that every route stores an ID in the same
canonical form and every reader (the service, a build) reads it back as the same ID.

Why strict integers: Python's `int()` reads "9_99" as 999, "١٢" as 12 and " 7 " as 7, so
three different texts would name one user. Integer IDs are ASCII digits with an optional
minus sign, no leading zeros, within 64 bits; anything else is refused, never aliased.
Text IDs are stripped of surrounding spaces (as ingest strips a log's text IDs), must be
valid UTF-8 (no lone surrogates), printable and at most MAX_ID_CHARS long."""

import math
import re

MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 256  # a feature value or an event type
MAX_WEIGHT = 1_000_000.0  # the largest event weight stored; larger ones are refused
MAX_EVENT_CHARS = 64  # an event type
LATEST_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z: the last timestamp stored
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_CANONICAL_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


class IdError(ValueError):
    """Why an ID or text value was refused (a message for the client, one line)."""


def checked_text(value: object, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """`value` stripped, if it is printable, valid UTF-8 text of 1..max_chars characters."""
    if not isinstance(value, str):
        raise IdError(f"{what} must be text")
    text = value.strip()
    if not text:
        raise IdError(f"empty {what}")
    if len(text) > max_chars:
        raise IdError(f"{what} is longer than {max_chars} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise IdError(f"{what} is not valid UTF-8 (a lone surrogate)") from None
    if not text.isprintable():
        raise IdError(f"{what} holds a control or other non-printable character")
    return text


def canonical_integer(value: object) -> int | None:
    """The integer an ID names, or None if it names none canonically (bool, float, text that
    is not plain ASCII digits, leading zeros, beyond 64 bits)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else None
    if not isinstance(value, str) or not _CANONICAL_INTEGER.fullmatch(value.strip()):
        return None
    number = int(value.strip())
    return number if INT64_MIN <= number <= INT64_MAX else None


def checked_id(value: object, what: str, integers: bool) -> int | str:
    """An ID in its canonical form: an int for a catalogue of integers, else text; IdError
    saying why not."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise IdError(f"{what} must be an integer or a string")
    if isinstance(value, str):
        value = checked_text(value, what, MAX_ID_CHARS)
    if not integers:
        return str(value)
    number = canonical_integer(value)
    if number is None:
        raise IdError(
            f"{what} must be a plain integer within 64 bits (ASCII digits, no leading zeros "
            "or separators): this catalogue's IDs are integers"
        )
    return number


def checked_weight(value: object, what: str = "weight") -> float:
    """A finite event weight in [0, MAX_WEIGHT]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IdError(f"{what} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double (10**400)
        raise IdError(f"{what} must be at most {MAX_WEIGHT:g}") from None
    if not math.isfinite(number) or number < 0:
        raise IdError(f"invalid {what} (not a number, infinite or negative)")
    if number > MAX_WEIGHT:
        raise IdError(f"{what} must be at most {MAX_WEIGHT:g}")
    return number
