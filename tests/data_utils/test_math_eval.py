"""data_utils/math_eval.py: values, the real Math23K sample, refusals, and a fuzz that only MathEvalError escapes."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_utils import math_eval
from data_utils.math_eval import MathEvalError, equations_equal, evaluate_expression, strip_equation_prefix


@pytest.mark.parametrize(
    "text, value",
    [
        ("1+2*3", 7),
        ("(1+2)*3", 9),
        ("[(1+2)*3-1]/2", 4),
        ("10-4-3", 3),  # left-associative
        ("12/3/2", 2),
        ("2^3^2", 512),  # right-associative power
        ("2**3", 8),
        ("-2^2", -4),  # unary minus binds looser than power
        ("2^-1", 0.5),
        ("--3", 3),
        ("3.5*2", 7),
        (".5+1.", 1.5),
        ("25%", 0.25),
        ("(1-25%)*80", 60),
        ("((2)/(3))", 2 / 3),
        ("5((7)/(10))", 5.7),
        ("40((1)/(5))", 40.2),
        ("5(7/10)", 5.7),
        ("-1((1)/(2))", -1.5),  # unary minus applies to the whole mixed number
        ("（１＋２）×３÷［４－１］", 3),  # full-width brackets, digits and operators
        (" 1 + 2 ", 3),
    ],
)
def test_values(text, value):
    assert evaluate_expression(text) == pytest.approx(value)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("1+", "ends early"),
        ("(1+2", r"expected '\)'"),
        ("[1+2)", r"expected '\]'"),
        ("1 2", "unexpected"),
        ("2(3+4)", "mixed number"),  # implicit product is refused, not guessed
        ("x+1", "unexpected character"),
        ("1e5", "unexpected character"),
        ("1/0", "division by zero"),
        ("1/(2-2)", "division by zero"),
        ("0^-1", "negative power"),
        ("(-8)^(1/3)", "non-integer exponent"),
        ("9^9^9", "exponent"),
        ("10^64*10^64*10^64*10^64*10^64", "not finite"),
        ("1" * 600, "limit"),
        ("(" * 100 + "1" + ")" * 100, "nesting"),
        ("-" * 100 + "1", "nesting"),
        ("1" * 50, "chars"),
    ],
)
def test_refusals(text, reason):
    with pytest.raises(MathEvalError, match=reason):
        evaluate_expression(text)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/pwned')",
        "().__class__.__bases__[0].__subclasses__()",
        "open('/etc/passwd').read()",
        "lambda: 1",
        "exec('1')",
        "1;import os",
        "eval('1+1')",
    ],
)
def test_code_is_refused_without_running(text, monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("the evaluator must never call eval/exec/compile/__import__")

    for name in ("eval", "exec", "compile", "__import__"):
        monkeypatch.setattr(builtins, name, forbidden)
    with pytest.raises(MathEvalError):
        evaluate_expression(text)


def test_is_value_error_subclass():
    assert issubclass(MathEvalError, ValueError)
    with pytest.raises(MathEvalError, match="string"):
        evaluate_expression(12)  # type: ignore[arg-type]


def test_equations_equal():
    assert equations_equal("x=(1+2)*3", "3*3+0")
    assert equations_equal("1/3", "((1)/(3))")
    assert equations_equal("100.00001", "100")  # relative tolerance for large values
    assert not equations_equal("0.00011", "0")  # absolute tolerance near zero
    assert not equations_equal("__import__('os')", "1")
    with pytest.raises(MathEvalError):
        equations_equal("1", "x=")
    assert strip_equation_prefix("x=1+2") == "1+2"
    assert strip_equation_prefix("1+2") == "1+2"


def test_real_math23k_gold_equations_match_answers(shared_data):
    problems = json.loads((shared_data / "math23k" / "test23k_processed.json").read_text(encoding="utf-8"))
    assert len(problems) == 1000
    special = [p for p in problems if any(ch in p["ans"] for ch in "%/(")]
    assert len(special) == 107  # percentages, fractions and mixed numbers are all in the sample
    mismatches = []
    for p in problems:
        value = evaluate_expression(strip_equation_prefix(p["equation"]))
        answer = evaluate_expression(p["ans"])
        if abs(value - answer) > 1e-4 * max(1.0, abs(answer)):
            mismatches.append((p["id"], p["equation"], p["ans"], value))
    assert mismatches == []


_ALPHABET = "0123456789.+-*/^%()[]（）×÷ x=_ae'\""


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=80))
def test_fuzz_only_math_eval_error(text):
    try:
        value = evaluate_expression(text)
    except MathEvalError:
        return
    assert isinstance(value, float) and math.isfinite(value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_any_unicode_only_math_eval_error(text):
    try:
        evaluate_expression(text)
    except MathEvalError:
        pass


# Build well-formed random expressions to exercise the success paths, checked against Python arithmetic.
_leaf = st.integers(min_value=0, max_value=999).map(str)


def _combine(children):
    return st.tuples(children, st.sampled_from(["+", "-", "*"]), children).map(lambda t: f"({t[0]}{t[1]}{t[2]})")


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaf, _combine, max_leaves=12))
def test_fuzz_well_formed_integer_expressions(text):
    # Only + - * on small ints: the exact value is computable with int arithmetic, no eval needed.
    assert evaluate_expression(text) == pytest.approx(_int_eval(text), rel=1e-12)


def _int_eval(s: str) -> int:
    """Independent evaluator for the fully bracketed integer form built above (never eval)."""
    if s[0] != "(":
        return int(s)
    depth = 0
    for i, ch in enumerate(s[1:-1], start=1):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and ch in "+-*" and i > 1:
            left, right = _int_eval(s[1:i]), _int_eval(s[i + 1 : -1])
            return {"+": left + right, "-": left - right, "*": left * right}[ch]
    raise ValueError(s)


def test_limits_are_documented_constants():
    assert math_eval.MAX_INPUT_CHARS >= 200  # the longest Math23K equation fits with room
