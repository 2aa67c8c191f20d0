"""The ``where`` language of patterns: a small, safe expression grammar.

An expression is parsed once (nothing is ever ``eval``-ed) and compiled twice: to a Polars
expression, evaluated over a whole batch, and to a Python function, evaluated on the few
candidate events of the NFA when the expression refers to earlier steps' events.

Grammar (lowest precedence first)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("==" | "=" | "!=" | "<>" | "<" | "<=" | ">" | ">=") sum
                    | ["not"] "in" "(" literal ("," literal)* ")"
                    | "is" ["not"] "null")?
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/" | "%") unary)*
    unary   := "-" unary | atom
    atom    := number | 'text' | "text" | true | false | null | name | "(" expr ")"
    name    := identifier ("." identifier)*

A name is a field of the current event (``data.TX_AMOUNT``, ``key``, ``event_type``,
``source``, ``correlation_id``, ``event_id``) or of the last event an earlier step matched
(``small.data.TX_AMOUNT``). Null behaves as in SQL: a comparison with null is unknown, and
an unknown condition does not match.

Example:
    >>> cond = parse_condition("data.TX_AMOUNT > 10 * small.data.TX_AMOUNT")
    >>> sorted(cond.steps)
    ['small']
    >>> cond.evaluate({"data": {"TX_AMOUNT": 60}}, {"small": {"data": {"TX_AMOUNT": 5}}})
    True
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl

__all__ = ["Condition", "ExpressionError", "parse_condition"]

#: Envelope columns a condition may name (``data`` with a field).
EVENT_FIELDS = ("event_id", "event_type", "source", "correlation_id", "key", "data")

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
    | (?P<text>'(?:[^']|'')*'|"(?:[^"\\]|\\.)*")
    | (?P<op><=|>=|==|!=|<>|[-+*/%<>=(),])
    | (?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    )""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}
_COMPARE = {"==": operator.eq, "=": operator.eq, "!=": operator.ne, "<>": operator.ne,
            "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
          "%": operator.mod}

Node = tuple[Any, ...]


class ExpressionError(ValueError):
    """A ``where`` expression that does not parse, or names what it may not."""


def _tokens(text: str) -> list[tuple[str, Any]]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise ExpressionError(f"cannot read {text[position:].strip()[:20]!r} at character {position}")
        position = match.end()
        kind = match.lastgroup
        value = match.group(kind)  # type: ignore[arg-type]
        if kind == "number":
            tokens.append(("lit", float(value) if any(c in value for c in ".eE") else int(value)))
        elif kind == "text":
            body = value[1:-1]
            tokens.append(("lit", body.replace("''", "'") if value[0] == "'"
                           else re.sub(r"\\(.)", r"\1", body)))
        elif kind == "name" and value.lower() in _KEYWORDS:
            tokens.append(("kw", value.lower()))
        else:
            tokens.append((kind, value))  # type: ignore[arg-type]
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens, self.at = _tokens(text), 0

    def peek(self, kind: str, value: Any = None) -> bool:
        if self.at >= len(self.tokens):
            return False
        got_kind, got = self.tokens[self.at]
        return got_kind == kind and (value is None or got == value)

    def take(self, kind: str, value: Any = None) -> Any:
        if not self.peek(kind, value):
            found = self.tokens[self.at][1] if self.at < len(self.tokens) else "the end"
            raise ExpressionError(f"expected {value or kind}, found {found!r}")
        self.at += 1
        return self.tokens[self.at - 1][1]

    def parse(self) -> Node:
        node = self.disjunction()
        if self.at != len(self.tokens):
            raise ExpressionError(f"unexpected {self.tokens[self.at][1]!r}")
        return node

    def disjunction(self) -> Node:
        node = self.conjunction()
        while self.peek("kw", "or"):
            self.at += 1
            node = ("or", node, self.conjunction())
        return node

    def conjunction(self) -> Node:
        node = self.negation()
        while self.peek("kw", "and"):
            self.at += 1
            node = ("and", node, self.negation())
        return node

    def negation(self) -> Node:
        if self.peek("kw", "not"):
            self.at += 1
            return ("not", self.negation())
        return self.comparison()

    def comparison(self) -> Node:
        node = self.sum()
        if self.at < len(self.tokens) and self.tokens[self.at][0] == "op" \
                and self.tokens[self.at][1] in _COMPARE:
            op = self.take("op")
            return ("cmp", op, node, self.sum())
        negated = self.peek("kw", "not") and self.at + 1 < len(self.tokens) \
            and self.tokens[self.at + 1] == ("kw", "in")
        if negated or self.peek("kw", "in"):
            self.at += 2 if negated else 1
            self.take("op", "(")
            values = [self.take("lit")]
            while self.peek("op", ","):
                self.at += 1
                values.append(self.take("lit"))
            self.take("op", ")")
            node = ("in", node, tuple(values))
            return ("not", node) if negated else node
        if self.peek("kw", "is"):
            self.at += 1
            negated = self.peek("kw", "not")
            self.at += 1 if negated else 0
            self.take("kw", "null")
            node = ("isnull", node)
            return ("not", node) if negated else node
        return node

    def sum(self) -> Node:
        node = self.product()
        while self.peek("op", "+") or self.peek("op", "-"):
            node = ("arith", self.take("op"), node, self.product())
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.peek("op", "*") or self.peek("op", "/") or self.peek("op", "%"):
            node = ("arith", self.take("op"), node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek("op", "-"):
            self.at += 1
            return ("arith", "-", ("lit", 0), self.unary())
        return self.atom()

    def atom(self) -> Node:
        if self.peek("lit"):
            return ("lit", self.take("lit"))
        if self.peek("kw", "true") or self.peek("kw", "false") or self.peek("kw", "null"):
            return ("lit", {"true": True, "false": False, "null": None}[self.take("kw")])
        if self.peek("op", "("):
            self.at += 1
            node = self.disjunction()
            self.take("op", ")")
            return node
        return _name(self.take("name"))


def _name(text: str) -> Node:
    """``("field", step or None, path)`` of a dotted name."""
    parts = tuple(text.split("."))
    if parts[0] in EVENT_FIELDS:
        step, path = None, parts
    else:
        step, path = parts[0], parts[1:]
    if not path or path[0] not in EVENT_FIELDS or (path[0] == "data") != (len(path) == 2) \
            or len(path) > 2:
        raise ExpressionError(f"{text!r} is not a field: use data.<field>, key, event_type, "
                              f"source, correlation_id, event_id, or <step>. before one of them")
    return ("field", step, path)


def _walk(node: Node) -> list[Node]:
    out = [node]
    for child in node[1:]:
        if isinstance(child, tuple) and child and isinstance(child[0], str) \
                and child[0] in {"or", "and", "not", "cmp", "in", "isnull", "arith", "lit", "field"}:
            out += _walk(child)
    return out


@dataclass(frozen=True)
class Condition:
    """A parsed ``where``: what it refers to, and its two compiled forms.

    Attributes:
        text: the expression as written.
        steps: names of the earlier steps it refers to (empty: the current event only).
        fields: payload fields of the current event it reads.
        step_fields: payload fields it reads of each referred step's event.
    """

    text: str
    tree: Node = field(repr=False)
    steps: frozenset[str] = frozenset()
    fields: frozenset[str] = frozenset()
    step_fields: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def polars(self, typed: frozenset[str] | set[str] | None = None) -> pl.Expr:
        """The condition over a batch of envelope rows (current-event conditions only);
        unknown (null) is false.

        Args:
            typed: the payload fields that are columns of ``data`` (default: all it names);
                others are read from the JSON text of an untyped payload (``data.json``).
        """
        if self.steps:
            raise ExpressionError(f"{self.text!r} refers to steps {sorted(self.steps)}")
        return _polars(self.tree, self.fields if typed is None else typed).fill_null(False) \
            .cast(pl.Boolean)

    def evaluate(self, event: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]]) -> bool:
        """The condition on one event (a dict of envelope fields, ``data`` a dict), given
        the last event each earlier step matched."""
        return _python(self.tree, event, steps) is True


def parse_condition(text: str) -> Condition:
    """Parse a ``where`` expression.

    Raises:
        ExpressionError: it does not parse, or names something that is not a field.
    """
    tree = _Parser(text).parse()
    refs = [n for n in _walk(tree) if n[0] == "field"]
    steps = frozenset(n[1] for n in refs if n[1] is not None)
    fields = frozenset(n[2][1] for n in refs if n[1] is None and n[2][0] == "data")
    step_fields = {s: frozenset(n[2][1] for n in refs if n[1] == s and n[2][0] == "data")
                   for s in steps}
    return Condition(text, tree, steps, fields, step_fields)


def payload_field(name: str, typed: frozenset[str] | set[str], numeric: bool = False) -> pl.Expr:
    """A payload field: a column of ``data`` when typed, else read from ``data.json``
    (text; ``numeric``: as a float, for comparisons with numbers and arithmetic)."""
    if name in typed:
        return pl.col("data").struct.field(name)
    text = pl.col("data").struct.field("json").str.json_path_match(f"$.{name}")
    return text.cast(pl.Float64, strict=False) if numeric else text


def _numeric(node: Node) -> bool:
    return node[0] == "arith" or (node[0] == "lit" and isinstance(node[1], int | float)
                                  and not isinstance(node[1], bool))


def _polars(node: Node, typed: frozenset[str] | set[str], numeric: bool = False) -> pl.Expr:
    kind = node[0]
    if kind == "lit":
        return pl.lit(node[1])
    if kind == "field":
        path = node[2]
        return payload_field(path[1], typed, numeric) if path[0] == "data" else pl.col(path[0])
    if kind == "or":
        return _polars(node[1], typed) | _polars(node[2], typed)
    if kind == "and":
        return _polars(node[1], typed) & _polars(node[2], typed)
    if kind == "not":
        return ~_polars(node[1], typed)
    if kind == "isnull":
        return _polars(node[1], typed).is_null()
    if kind == "in":
        values = list(node[2])
        value = _polars(node[1], typed, all(isinstance(v, int | float) for v in values))
        return pl.when(value.is_null()).then(None).otherwise(
            value.is_in(pl.lit(pl.Series(values)).implode()))
    if kind == "cmp":
        numbers = _numeric(node[2]) or _numeric(node[3])
        return _COMPARE[node[1]](_polars(node[2], typed, numbers), _polars(node[3], typed, numbers))
    return _ARITH[node[1]](_polars(node[2], typed, True), _polars(node[3], typed, True))


def _python(node: Node, event: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "field":
        source = event if node[1] is None else steps.get(node[1])
        if source is None:
            return None
        path = node[2]
        return (source.get("data") or {}).get(path[1]) if path[0] == "data" else source.get(path[0])
    if kind in ("or", "and"):
        left, right = (_python(n, event, steps) for n in node[1:])
        return _kleene(kind, left, right)
    if kind == "not":
        value = _python(node[1], event, steps)
        return None if value is None else not value
    if kind == "isnull":
        return _python(node[1], event, steps) is None
    if kind == "in":
        value = _python(node[1], event, steps)
        return None if value is None else value in node[2]
    left, right = _python(node[2], event, steps), _python(node[3], event, steps)
    if left is None or right is None:
        return None
    function: Callable[[Any, Any], Any] = (_COMPARE if kind == "cmp" else _ARITH)[node[1]]
    try:
        return function(left, right)
    except (TypeError, ZeroDivisionError):
        return None


def _kleene(kind: str, left: Any, right: Any) -> Any:
    if kind == "and":
        if left is False or right is False:
            return False
        return None if left is None or right is None else bool(left and right)
    if left is True or right is True:
        return True
    return None if left is None or right is None else bool(left or right)
