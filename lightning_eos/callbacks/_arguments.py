"""Argument checks for the monitors' constructors: fail when the monitor is built, naming the fix.

A YAML config or a typo can hand a monitor ``every_n_steps: 1.5`` or ``tol: 0``; Python
accepts both, and the monitor would fail (or quietly measure something else) in the middle
of a run. These checks turn that into one error at construction, as LightningCLI builds
the callbacks.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """``value`` is an integer (not a bool, not ``1.5``) of at least ``minimum``.

    >>> check_int("every_n_steps", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: every_n_steps=1.5 must be an integer >= 1.
    """
    if optional and value is None:
        return
    valid = isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum
    if not valid:
        none = " or None" if optional else ""
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{none}.")


def check_positive(name: str, value: Any, optional: bool = False) -> None:
    """``value`` is a finite real number above 0.

    >>> check_positive("tol", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: tol=nan must be a finite number > 0.
    """
    if optional and value is None:
        return
    valid = (
        isinstance(value, Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    if not valid:
        none = " or None" if optional else ""
        raise ValueError(f"{name}={value!r} must be a finite number > 0{none}.")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """``value`` is one of ``choices``.

    >>> check_choice("mode", "test", ("train", "eval"))
    Traceback (most recent call last):
    ...
    ValueError: mode='test'; choose one of 'train', 'eval'.
    """
    if value not in choices:
        names = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r}; choose one of {names}.")
