"""A safe arithmetic evaluator for Math23K equations and answers.

The original toolkit scored Math23K by exact token match and its orphaned ``eval_math.py`` ran Python ``eval()``
on model output (``reference/original-toolkit.md`` §5.2, SPEC §10). This module replaces both with a small
recursive-descent parser that only understands arithmetic, so a generated ``__import__('os')`` is a parse
error, never code.

Grammar (whitespace between tokens is ignored, except that a mixed number needs its fraction to touch it)::

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary)*
    unary   := ('-' | '+') unary | power
    power   := postfix (('^' | '**') unary)?          # right-associative: 2^3^2 = 2^9
    postfix := primary '%'*                            # N% = N / 100
    primary := NUMBER mixed? | '(' expr ')' | '[' expr ']'
    mixed   := '(' frac ')'  directly after NUMBER     # 5((7)/(10)) = 5 + 7/10 (Math23K answer style)
    frac    := atom '/' atom ;  atom := NUMBER | '(' NUMBER ')'

Full-width characters are folded by NFKC (（）［］＋－％ and full-width digits), and × ÷ · are read as * / *.
Only a fraction may follow a number directly: ``2(3+4)`` is refused rather than guessed (implicit product or
mixed number?); Math23K equations never use implicit multiplication.

Limits against denial of service: input length, bracket depth, exponent magnitude, and a finite result at
every step; any violation raises :class:`MathEvalError`.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["MathEvalError", "evaluate_expression", "equations_equal", "strip_equation_prefix", "values_close"]

MAX_INPUT_CHARS = 512  # the longest Math23K equation is ~100 chars; generated text beyond this is junk
MAX_DEPTH = 64  # bracket nesting; keeps the recursion far below Python's limit
MAX_ABS_EXPONENT = 64.0  # 10^64 is far beyond any word problem; stops 9^9^9-style blow-ups before they run
MAX_NUMBER_CHARS = 40  # digits in one literal

_EXTRA_FOLD = str.maketrans({"×": "*", "÷": "/", "·": "*", "−": "-", "–": "-", "—": "-"})
_TOKEN_RE = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(\*\*|[-+*/^%()\[\]]))")


class MathEvalError(ValueError):
    """The text is not an arithmetic expression this evaluator accepts (or it is too large to evaluate)."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "num" or "op"
    text: str
    pos: int  # character offset in the normalised text, for error messages
    glued: bool  # True when no whitespace separates it from the previous token


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_EXTRA_FOLD).strip()


def _tokenise(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            if text[pos:].strip() == "":
                break
            raise MathEvalError(f"unexpected character {text[pos]!r} at {pos} in {text!r}")
        number, op = match.group(1), match.group(2)
        start = match.start(1) if number is not None else match.start(2)
        glued = start == pos
        if number is not None:
            if len(number) > MAX_NUMBER_CHARS:
                raise MathEvalError(f"number at {start} has {len(number)} chars (limit {MAX_NUMBER_CHARS})")
            tokens.append(_Token("num", number, start, glued))
        else:
            tokens.append(_Token("op", op, start, glued))
        pos = match.end()
    return tokens


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise MathEvalError(f"{what} is not finite")
    return value


class _Parser:
    """Recursive descent over the token list; every method returns a float or raises MathEvalError."""

    def __init__(self, tokens: list[_Token], text: str):
        self.tokens = tokens
        self.text = text
        self.i = 0
        self.depth = 0

    def peek(self, offset: int = 0) -> _Token | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def at_op(self, *ops: str) -> bool:
        tok = self.peek()
        return tok is not None and tok.kind == "op" and tok.text in ops

    def take_op(self, op: str) -> None:
        tok = self.peek()
        if tok is None or tok.kind != "op" or tok.text != op:
            where = "end of input" if tok is None else f"{tok.text!r} at {tok.pos}"
            raise MathEvalError(f"expected {op!r} but found {where} in {self.text!r}")
        self.i += 1

    def parse(self) -> float:
        if not self.tokens:
            raise MathEvalError("empty expression")
        value = self.expr()
        tok = self.peek()
        if tok is not None:
            raise MathEvalError(f"unexpected {tok.text!r} at {tok.pos} in {self.text!r}")
        return value

    def expr(self) -> float:
        value = self.term()
        while self.at_op("+", "-"):
            op = self.tokens[self.i].text
            self.i += 1
            rhs = self.term()
            value = _finite(value + rhs if op == "+" else value - rhs, "sum")
        return value

    def term(self) -> float:
        value = self.unary()
        while self.at_op("*", "/"):
            op = self.tokens[self.i].text
            self.i += 1
            rhs = self.unary()
            if op == "*":
                value = _finite(value * rhs, "product")
            else:
                if rhs == 0:
                    raise MathEvalError(f"division by zero in {self.text!r}")
                value = _finite(value / rhs, "quotient")
        return value

    def unary(self) -> float:
        if self.at_op("-", "+"):
            op = self.tokens[self.i].text
            self.i += 1
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> float:
        base = self.postfix()
        if self.at_op("^", "**"):
            self.i += 1
            self._enter()
            exponent = self.unary()  # right-associative, and allows 2^-1
            self.depth -= 1
            return _safe_pow(base, exponent)
        return base

    def postfix(self) -> float:
        value = self.primary()
        while self.at_op("%"):
            self.i += 1
            value = value / 100.0
        return value

    def primary(self) -> float:
        tok = self.peek()
        if tok is None:
            raise MathEvalError(f"expression ends early: {self.text!r}")
        if tok.kind == "num":
            self.i += 1
            value = float(tok.text)
            nxt = self.peek()
            if nxt is not None and nxt.kind == "op" and nxt.text == "(" and nxt.glued:
                try:
                    value += self._mixed_fraction()
                except MathEvalError as exc:
                    raise MathEvalError(
                        f"a number followed directly by '(' at {nxt.pos} must be a mixed number like 5((7)/(10)); "
                        f"write '*' for a product ({exc})"
                    ) from exc
            return value
        closer = {"(": ")", "[": "]"}.get(tok.text) if tok.kind == "op" else None
        if closer is None:
            raise MathEvalError(f"unexpected {tok.text!r} at {tok.pos} in {self.text!r}")
        self.i += 1
        self._enter()
        value = self.expr()
        self.depth -= 1
        self.take_op(closer)
        return value

    def _mixed_fraction(self) -> float:
        """Parse the ``(a/b)`` or ``((a)/(b))`` glued to a whole number; anything else is refused."""
        self.take_op("(")
        numerator = self._fraction_atom()
        self.take_op("/")
        denominator = self._fraction_atom()
        self.take_op(")")
        if denominator == 0:
            raise MathEvalError(f"division by zero in {self.text!r}")
        return numerator / denominator

    def _fraction_atom(self) -> float:
        tok = self.peek()
        if tok is not None and tok.kind == "num":
            self.i += 1
            return float(tok.text)
        self.take_op("(")
        tok = self.peek()
        if tok is None or tok.kind != "num":
            raise MathEvalError(f"mixed-number fraction must hold plain numbers: {self.text!r}")
        self.i += 1
        self.take_op(")")
        return float(tok.text)

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise MathEvalError(f"nesting deeper than {MAX_DEPTH}")


def _safe_pow(base: float, exponent: float) -> float:
    if abs(exponent) > MAX_ABS_EXPONENT:
        raise MathEvalError(f"exponent {exponent:g} exceeds the limit {MAX_ABS_EXPONENT:g}")
    if base == 0 and exponent < 0:
        raise MathEvalError("zero raised to a negative power")
    if base < 0 and not float(exponent).is_integer():
        raise MathEvalError(f"negative base {base:g} with non-integer exponent {exponent:g}")
    try:
        return _finite(math.pow(base, exponent), "power")
    except OverflowError as exc:  # math.pow raises rather than returning inf
        raise MathEvalError(f"{base:g}^{exponent:g} overflows") from exc


def evaluate_expression(text: str) -> float:
    """Value of an arithmetic expression (see the module grammar) as a finite float.

    Raises MathEvalError for anything else: letters, names, calls, unbalanced brackets, division by zero,
    over-long input, deep nesting, huge exponents, non-finite results.
    """
    if not isinstance(text, str):
        raise MathEvalError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        raise MathEvalError(f"input has {len(text)} chars (limit {MAX_INPUT_CHARS})")
    normalised = _normalise(text)
    return _Parser(_tokenise(normalised), normalised).parse()


def strip_equation_prefix(text: str) -> str:
    """Drop a leading ``x=`` (Math23K writes every equation as ``x=...``; targets are trained without it)."""
    stripped = _normalise(text)
    return stripped[2:] if stripped[:2] in ("x=", "X=") else stripped


def values_close(a: float, b: float, tol: float = 1e-4) -> bool:
    """|a - b| <= tol * max(1, |b|): absolute tolerance for small values, relative for large ones."""
    return abs(a - b) <= tol * max(1.0, abs(b))


def equations_equal(pred: str, gold: str, tol: float = 1e-4) -> bool:
    """True when both equations (optional ``x=`` prefix) evaluate to values within ``tol`` (see values_close).

    An unparsable ``pred`` is simply not equal; an unparsable ``gold`` raises MathEvalError (a data error).
    """
    gold_value = evaluate_expression(strip_equation_prefix(gold))
    try:
        pred_value = evaluate_expression(strip_equation_prefix(pred))
    except MathEvalError:
        return False
    return values_close(pred_value, gold_value, tol)
