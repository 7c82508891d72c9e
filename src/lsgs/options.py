"""Option checks, declared once by the class that owns the option.

A class with user-facing options declares each one's check in a table ``{argument: Check}`` (the evaluation
harness: ``lsgs.evaluation.harness.HARNESS_OPTIONS``; LSGS scoring: ``lsgs.modules.scoring.SCORING_OPTIONS``).
Its ``__init__`` checks its arguments with :func:`check_options`, and every other reader (``lsgs study scoring``
checks its ``--grid`` values before anything runs) uses the same checks and takes the defaults from the
constructor's signature (:func:`signature_defaults`): no choice list, bound or default is written twice.

A check's ``rule`` is the end of its error line, ``<where><argument>=<value> <rule>``, e.g.
``model.map_reference="image" must be one of ['reconstruction', 'input']``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lsgs.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """The rule one option's value must follow.

    Attributes:
        accepts: whether a value is valid.
        rule: what a valid value is, as the end of an error line (``must be a number in (0, 1)``).
        choices: the valid values of a choice option (the owner's constant, e.g. ``MAP_REFERENCES``), else None.
    """

    accepts: Callable[[Any], bool]
    rule: str
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """None for a valid value, else ``rule``."""
        return None if self.accepts(value) else self.rule


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _or_null(check: Check, meaning: str | None, rule: str) -> Check:
    """``check``, or also null (``None``, with ``rule`` as the rule) when ``meaning`` (what null stands for) is
    given."""
    if meaning is None:
        return check
    return Check(lambda v: v is None or check.accepts(v), f"{rule} (null: {meaning})", check.choices)


def one_of(choices: Sequence[Any], null: str | None = None) -> Check:
    """One of ``choices`` (a constant of the owner); ``null``: what None means, when None is valid too."""
    choices = tuple(choices)
    def accepts(value: Any) -> bool:
        return any(type(value) is type(choice) and value == choice for choice in choices)  # True is not 1

    rule = f"must be one of {list(choices)}"
    return _or_null(Check(accepts, rule, choices), null, f"{rule} or null")


def flag(null: str | None = None) -> Check:
    """``true`` or ``false``; ``null``: what None means, when None is valid too."""
    return _or_null(Check(lambda v: isinstance(v, bool), "must be true or false"), null, "must be true, false or null")


def integer(minimum: int | None = None) -> Check:
    """An int (not a bool), at least ``minimum`` when given."""
    if minimum is None:
        return Check(_is_int, "must be an int")
    return Check(lambda v: _is_int(v) and v >= minimum, f"must be an int >= {minimum}")


def number(minimum: float, strict: bool = False, unit: str = "", null: str | None = None) -> Check:
    """A finite number ``>= minimum`` (``> minimum`` when ``strict``); with a ``unit`` (``nats``), infinity is valid
    too (no bound); ``null``: what None means, when None is valid too."""
    sign = ">" if strict else ">="

    def accepts(value: Any) -> bool:
        if not _is_number(value) or (not unit and math.isinf(value)):
            return False
        return value > minimum if strict else value >= minimum

    bound = f"number of {unit} {sign} {minimum:g}" if unit else f"finite number {sign} {minimum:g}"
    return _or_null(Check(accepts, f"must be a {bound}"), null, f"must be null or a {bound}")


def fraction(include_one: bool = False) -> Check:
    """A number in (0, 1), or in (0, 1] with ``include_one``."""
    if include_one:
        return Check(lambda v: _is_number(v) and 0.0 < v <= 1.0, "must be a number in (0, 1]")
    return Check(lambda v: _is_number(v) and 0.0 < v < 1.0, "must be a number in (0, 1)")


def show(value: Any) -> str:
    """A value as a config file spells it (JSON: ``"image"``, ``null``, ``true``), for error lines."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_options(options: Mapping[str, Check], values: Mapping[str, Any], where: str = "model.") -> None:
    """Check every argument of ``options`` found in ``values`` (an ``__init__``'s ``locals()``).

    Raises:
        ConfigError: one line, ``<where><argument>=<value> <rule>``, for the first invalid value.
    """
    for name, check in options.items():
        if name in values and (problem := check.problem(values[name])) is not None:
            raise ConfigError(f"{where}{name}={show(values[name])} {problem}")


def signature_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls``'s constructor arguments, following ``**kwargs`` to the parent constructors."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        for parameter in parameters:
            if parameter.default is not parameter.empty:
                defaults.setdefault(parameter.name, parameter.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return defaults
