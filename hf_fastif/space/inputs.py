"""A visitor's input: the checks that turn what the page sends into values, or a `ValueError` that says what to
choose instead, and the live explanation's k slider."""

from __future__ import annotations

import numpy as np

from .settings import LIVE_SETTINGS, MAX_TEXT_CHARS


def check_text(text, name: str) -> str:
    """``text`` stripped, or a ValueError saying what to type (an API call's list or number was its repr)."""
    if text is not None and not isinstance(text, str):
        raise ValueError(f"The {name} must be text, got {type(text).__name__} {str(text)[:40]!r}.")
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as err:  # (a lone surrogate, which JSON and JavaScript strings may hold: the tokenizer
        raise ValueError(f"The {name} holds a character that is not valid text ({text[err.start]!r} at "  # raised
                         f"position {err.start}, half of a UTF-16 pair); type it again.") from None  # TypeError)
    text = "" if text is None else text.strip()
    if not text:
        raise ValueError(f"Type a {name}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"The {name} has {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed.")
    return text


def check_test_id(value) -> int:
    """A test id as the exact whole number it is, or a ValueError saying what to choose: any id a table can hold
    (int64: negative ids too, and ids past 2**53, which `check_int` rounded through float to a neighbour)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if isinstance(value, (float, np.floating)) and float(value).is_integer():  # a JSON client's 3.0
        return int(value)
    raise ValueError(f"Choose a test example (a test id, a whole number), got {value!r}.")


def candidate_slider(max_candidates: int) -> dict:
    """The live explanation's k slider over ``1 … max_candidates``: steps of 10 from 10 where the maximum is on that
    grid, else steps of 1 from 1 (a training set of fewer than 10 rows got a slider from 10 to its row count, whose
    every position was refused), starting at `LIVE_SETTINGS`' k or the maximum. One row: fixed at 1 (gradio refuses a
    slider whose minimum is its maximum)."""
    if max_candidates <= 1:
        return dict(minimum=0, maximum=1, step=1, value=1, interactive=False)
    tens = max_candidates >= 20 and max_candidates % 10 == 0
    return dict(minimum=10 if tens else 1, maximum=max_candidates, step=10 if tens else 1,
                value=min(LIVE_SETTINGS["influence_knn_k"], max_candidates))


def check_int(value, name: str, low: int, high: int | None) -> int:
    """``value`` as a whole number in ``[low, high]``, or a ValueError saying what to choose (an API call's
    ``true`` is not 1)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Choose a {name} (a whole number), got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Choose a {name} (a whole number).") from None
    if not number.is_integer():
        raise ValueError(f"The {name} must be a whole number, got {value!r}.")
    if number < low or (high is not None and number > high):
        raise ValueError(f"The {name} must be between {low} and {high}, got {int(number)}." if high is not None
                         else f"The {name} must be at least {low}, got {int(number)}.")
    return int(number)
