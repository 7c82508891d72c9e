"""``lsgs.options``: each check against the values it must accept and refuse, the one-line error, the defaults read
off the signatures; and the study reading its grid and defaults from ``ScoringModule`` (no copy of its own)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest

import lsgs.study as study
from lsgs.errors import ConfigError
from lsgs.evaluation import AnomalyMapModule
from lsgs.evaluation.harness import HARNESS_OPTIONS, METRIC_REGIONS
from lsgs.modules.scoring import (
    NLL_THRESHOLD_SCOPES,
    RESTORATION_OPTIONS,
    SCORING_OPTIONS,
    ScoringModule,
)
from lsgs.nn.image_score import IMAGE_SCORES
from lsgs.nn.restoration import MAP_REFERENCES
from lsgs.options import check_options, flag, fraction, integer, number, one_of, show, signature_defaults


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (one_of(("a", "b")), ["a", "b"], ["c", None, 1, True, ["a"]]),
        (one_of(("a", "b"), null="default"), ["a", None], ["c", False]),
        (one_of((1, 2)), [1, 2], [True, 1.0, "1"]),
        (flag(), [True, False], [None, 0, 1, "true"]),
        (flag(null="default"), [True, False, None], [0, "no"]),
        (integer(), [0, -3, 10**12], [1.0, True, "1", None]),
        (integer(minimum=1), [1, 5], [0, -1, 2.0, True]),
        (number(0.0), [0, 0.0, 2.5, 10**9], [-1e-9, math.inf, math.nan, True, "1", None]),
        (number(0.0, strict=True), [1e-9, 3], [0, 0.0, -1, math.inf]),
        (number(0.0, unit="nats", null="quantile"), [0.0, 7, math.inf, None], [-0.1, math.nan, -math.inf, False]),
        (fraction(), [0.5, 1e-9], [0, 0.0, 1, 1.0, -0.5, math.nan, True]),
        (fraction(include_one=True), [0.5, 1, 1.0], [0, 1.5, math.nan]),
    ],
)
def test_each_check_accepts_and_refuses(check: Any, good: list[Any], bad: list[Any]) -> None:
    assert [check.problem(v) for v in good] == [None] * len(good)
    assert all(check.problem(v) == check.rule for v in bad), [v for v in bad if check.problem(v) is None]


def test_rules_read_as_the_end_of_an_error_line() -> None:
    assert one_of(("a", "b")).rule == "must be one of ['a', 'b']"
    assert one_of(("a", "b"), null="its own").rule == "must be one of ['a', 'b'] or null (null: its own)"
    assert flag(null="d").rule == "must be true, false or null (null: d)"
    assert integer(minimum=1).rule == "must be an int >= 1" and integer().rule == "must be an int"
    assert number(0.0).rule == "must be a finite number >= 0"
    assert number(0.5, strict=True).rule == "must be a finite number > 0.5"
    assert number(0.0, unit="nats", null="q").rule == "must be null or a number of nats >= 0 (null: q)"
    assert fraction().rule == "must be a number in (0, 1)" and fraction(True).rule == "must be a number in (0, 1]"
    assert one_of(MAP_REFERENCES).choices == MAP_REFERENCES


def test_check_options_names_the_first_bad_value_in_one_line() -> None:
    options = {"a": integer(minimum=1), "b": one_of(("x", "y"))}
    check_options(options, {"a": 1, "b": "x", "unrelated": object()})
    check_options(options, {})  # arguments the caller does not have are not checked
    with pytest.raises(ConfigError, match=r'^model\.b="z" must be one of \[\'x\', \'y\'\]$'):
        check_options(options, {"a": 1, "b": "z"})
    with pytest.raises(ConfigError, match=r"^--x: a=0 must be an int >= 1$"):
        check_options(options, {"a": 0, "b": "z"}, where="--x: ")
    assert [show(v) for v in ("s", None, True, 1.5, math.inf, (1, 2))] == ['"s"', "null", "true", "1.5", "Infinity",
                                                                         "[1, 2]"]  # fmt: skip
    assert show(object).startswith("<class")


def test_signature_defaults_follow_kwargs_to_the_parent() -> None:
    class Base:
        def __init__(self, a: int = 1, b: str = "x", c: float = 0.5) -> None: ...

    class Child(Base):
        def __init__(self, d: int, b: str = "y", **kwargs: Any) -> None: ...

    class Closed(Base):
        def __init__(self, e: int = 3) -> None: ...

    assert signature_defaults(Child) == {"b": "y", "a": 1, "c": 0.5}
    assert signature_defaults(Closed) == {"e": 3}


def test_scoring_and_harness_declare_a_check_for_arguments_they_have() -> None:
    """Each declared option is an argument of its owner's constructor, and the choice checks are the owners'
    constants (the study and the constructors read the same objects)."""
    harness = inspect.signature(AnomalyMapModule.__init__).parameters
    scoring = inspect.signature(ScoringModule.__init__).parameters
    assert set(HARNESS_OPTIONS) <= set(harness) and set(SCORING_OPTIONS) <= set(scoring)
    assert set(RESTORATION_OPTIONS) <= set(SCORING_OPTIONS)
    assert HARNESS_OPTIONS["metric_region"].choices == METRIC_REGIONS
    assert HARNESS_OPTIONS["image_score"].choices == IMAGE_SCORES
    assert SCORING_OPTIONS["map_reference"].choices == MAP_REFERENCES
    assert SCORING_OPTIONS["nll_threshold_scope"].choices == NLL_THRESHOLD_SCOPES
    assert ScoringModule.option_checks == {**SCORING_OPTIONS, **HARNESS_OPTIONS}


def test_the_study_reads_its_grid_and_defaults_from_scoring_module() -> None:
    assert study.GRID_OPTIONS is ScoringModule.option_checks
    assert {
        **{n: p.default for n, p in inspect.signature(AnomalyMapModule.__init__).parameters.items()
           if p.default is not p.empty},
        **{n: p.default for n, p in inspect.signature(ScoringModule.__init__).parameters.items()
           if p.default is not p.empty},
    } == study.SCORING_DEFAULTS  # fmt: skip
    assert study.SCORING_DEFAULTS["nll_quantile"] == 0.9 and study.SCORING_DEFAULTS["val_quantile"] == 0.99
    # A grid value fails with the same rule as the constructor.
    with pytest.raises(ConfigError, match=r'^--grid: map_reference="image" must be one of') as grid_error:
        study.parse_grid('{"map_reference": ["image"]}')
    with pytest.raises(ConfigError, match=r'^model.map_reference="image" must be one of') as init_error:
        check_options(SCORING_OPTIONS, {"map_reference": "image"})
    assert str(grid_error.value).split("=", 1)[1] == str(init_error.value).split("=", 1)[1]
