"""Route filters evaluated by Arrow compute: a live batch routed without a Polars query.

:class:`~pipelines.routing.Router` compiles each route's filter (SQL, checked by
:func:`~pipelines.routing.safe_filter_sql`) for Polars. Over a live batch of a few events
that query costs 1-3 ms: the conversion of the columns it reads, and its evaluation on
Polars' thread pool, which on loaded cores waits to be scheduled. This module compiles the
same parsed tree to pyarrow compute calls on the caller's thread instead, for the part of
the language whose meaning the two engines share exactly:

- column references, top-level (``key``, ``source``) or struct fields (``data.amount``),
  of integer, floating, boolean or text type;
- number, text, boolean and null literals; ``=``, ``<>``, ``<``, ``<=``, ``>``, ``>=``
  between two numbers, two texts or two booleans;
- ``AND``, ``OR``, ``NOT`` (SQL's three-valued logic), ``IS [NOT] NULL``, ``IN`` lists and
  ``BETWEEN`` of literals, ``LIKE`` / ``ILIKE`` without an escape character, ``LOWER``,
  ``UPPER``, ``LENGTH``, ``starts_with`` and ``ends_with`` of a text literal.

Anything else (arithmetic, ``CAST``, ``COALESCE``, a column the schema does not have
exactly as named) compiles to ``None`` and the router keeps Polars for it. A null result
is no match, as in a Polars filter. The tests hold the two engines equal on generated
filters and tables.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

#: A compiled expression: the batch -> its value per row (an Arrow array or scalar).
Compiled = Callable[[pa.Table], pa.Array | pa.Scalar]
_Kind = str  # "int", "float", "text", "bool", "null"
_NUMBERS = ("int", "float")


class _Unsupported(Exception):
    """The tree has a part this compiler leaves to Polars."""


def compile_filter(tree: exp.Expression, schema: pa.Schema) -> Callable[[pa.Table], pa.Array] | None:
    """The filter ``tree`` as a function of a batch in ``schema``: a boolean array, null
    already counted as no match; ``None`` when the tree has a part left to Polars."""
    try:
        compiled, kind = _compile(tree, schema)
    except _Unsupported:
        return None
    if kind not in ("bool", "null"):
        return None

    def mask(batch: pa.Table) -> pa.Array:
        return pc.fill_null(_array(compiled(batch), batch), False)  # a constant: one per row
    return mask


def _kind(data_type: pa.DataType) -> _Kind:
    if pa.types.is_integer(data_type):
        return "int"
    if pa.types.is_floating(data_type):
        return "float"
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return "text"
    if pa.types.is_boolean(data_type):
        return "bool"
    if pa.types.is_null(data_type):
        return "null"
    raise _Unsupported(f"type {data_type}")


def _compile(node: exp.Expression, schema: pa.Schema) -> tuple[Compiled, _Kind]:
    if node.args.get("negate"):  # x IS NOT NULL, x NOT IN (...): NOT of the plain form
        positive = node.copy()
        positive.set("negate", False)
        plain = _logical(positive, schema)
        return (lambda b: pc.invert(plain(b))), "bool"
    if isinstance(node, exp.Paren):
        return _compile(node.this, schema)
    if isinstance(node, exp.Column):
        return _column(node, schema)
    if isinstance(node, exp.Literal | exp.Boolean | exp.Null | exp.Neg):
        scalar = _literal(node)
        return (lambda _: scalar), _kind(scalar.type)
    if isinstance(node, exp.And | exp.Or):
        left, right = _logical(node.this, schema), _logical(node.expression, schema)
        both = pc.and_kleene if isinstance(node, exp.And) else pc.or_kleene
        return (lambda b: both(left(b), right(b))), "bool"
    if isinstance(node, exp.Not):
        inner = _logical(node.this, schema)
        return (lambda b: pc.invert(inner(b))), "bool"
    if isinstance(node, exp.Is):
        if not isinstance(node.expression, exp.Null):
            raise _Unsupported("IS other than IS NULL")
        value, _ = _compile(node.this, schema)
        return (lambda b: pc.is_null(_array(value(b), b))), "bool"
    if type(node) in _COMPARISONS:
        return _comparison(_COMPARISONS[type(node)], node.this, node.expression, schema)
    if isinstance(node, exp.Between):
        low = _comparison("greater_equal", node.this, node.args["low"], schema)[0]
        high = _comparison("less_equal", node.this, node.args["high"], schema)[0]
        return (lambda b: pc.and_kleene(low(b), high(b))), "bool"
    if isinstance(node, exp.In):
        return _in(node, schema)
    if isinstance(node, exp.Like | exp.ILike):
        return _like(node, schema)
    if isinstance(node, exp.Lower | exp.Upper):
        text = _text(node.this, schema)
        function = pc.utf8_lower if isinstance(node, exp.Lower) else pc.utf8_upper
        return (lambda b: function(text(b))), "text"
    if isinstance(node, exp.Length):
        text = _text(node.this, schema)
        return (lambda b: pc.utf8_length(text(b))), "int"
    if isinstance(node, exp.StartsWith | exp.EndsWith):
        text, affix = _text(node.this, schema), _text_literal(node.expression)
        function = pc.starts_with if isinstance(node, exp.StartsWith) else pc.ends_with
        return (lambda b: function(_array(text(b), b), pattern=affix)), "bool"
    raise _Unsupported(type(node).__name__)


_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "equal", exp.NEQ: "not_equal", exp.GT: "greater", exp.GTE: "greater_equal",
    exp.LT: "less", exp.LTE: "less_equal",
}


def _column(node: exp.Column, schema: pa.Schema) -> tuple[Compiled, _Kind]:
    path = [part.name for part in node.parts]
    if path[0] not in schema.names:
        raise _Unsupported(f"column {path[0]!r}")
    data_type = schema.field(path[0]).type
    for name in path[1:]:
        if not pa.types.is_struct(data_type) or data_type.get_field_index(name) < 0:
            raise _Unsupported(f"field {name!r}")
        data_type = data_type.field(name).type
    kind = _kind(data_type)
    top, fields = path[0], path[1:]

    def value(batch: pa.Table) -> pa.Array:
        array = batch.column(top).combine_chunks()
        for name in fields:  # struct_field gives null under a null parent (StructArray.field not)
            array = pc.struct_field(array, [name])
        return array
    return value, kind


def _literal(node: exp.Expression) -> pa.Scalar:
    if isinstance(node, exp.Neg):  # a negative number
        inner = _literal(node.this)
        if _kind(inner.type) not in _NUMBERS:
            raise _Unsupported("- of something other than a number")
        return pa.scalar(-inner.as_py(), inner.type)
    if isinstance(node, exp.Null):
        return pa.scalar(None, pa.null())
    if isinstance(node, exp.Boolean):
        return pa.scalar(bool(node.this), pa.bool_())
    assert isinstance(node, exp.Literal)
    if node.is_string:
        return pa.scalar(node.this, pa.string())
    text = node.this
    try:
        return pa.scalar(int(text), pa.int64())
    except ValueError:
        pass
    try:
        return pa.scalar(float(text), pa.float64())
    except ValueError:
        raise _Unsupported(f"number {text!r}") from None


def _logical(node: exp.Expression, schema: pa.Schema) -> Compiled:
    compiled, kind = _compile(node, schema)
    if kind not in ("bool", "null"):
        raise _Unsupported("a logical operand that is not boolean")
    if kind == "null":
        return lambda b: pa.nulls(b.num_rows, pa.bool_())
    return compiled


def _text(node: exp.Expression, schema: pa.Schema) -> Compiled:
    compiled, kind = _compile(node, schema)
    if kind != "text":
        raise _Unsupported("a text function of something else")
    return compiled


def _text_literal(node: exp.Expression) -> str:
    if not (isinstance(node, exp.Literal) and node.is_string):
        raise _Unsupported("a pattern that is not a text literal")
    return str(node.this)


def _comparison(function: str, left_node: exp.Expression, right_node: exp.Expression,
                schema: pa.Schema) -> tuple[Compiled, _Kind]:
    left, left_kind = _compile(left_node, schema)
    right, right_kind = _compile(right_node, schema)
    if "null" in (left_kind, right_kind):
        return (lambda b: pa.nulls(b.num_rows, pa.bool_())), "bool"
    if left_kind != right_kind and not {left_kind, right_kind} <= set(_NUMBERS):
        raise _Unsupported(f"{left_kind} against {right_kind}")
    compare = getattr(pc, function)
    return (lambda b: _array(compare(left(b), right(b)), b)), "bool"


def _in(node: exp.In, schema: pa.Schema) -> tuple[Compiled, _Kind]:
    value, kind = _compile(node.this, schema)
    items = node.expressions
    if not items or not all(isinstance(i, exp.Literal | exp.Neg) for i in items):
        raise _Unsupported("IN of something other than literals")
    scalars = [_literal(i) for i in items]
    # the literals a column of each kind may be looked up among (an integer among fractions
    # is Polars' own cast, left to it)
    allowed = {"int": {"int"}, "float": {"int", "float"}, "text": {"text"}}.get(kind, set())
    if not {_kind(s.type) for s in scalars} <= allowed:
        raise _Unsupported("IN across types")
    options = pa.array([s.as_py() for s in scalars],
                       {"int": pa.int64(), "float": pa.float64()}.get(kind))

    def member(batch: pa.Table) -> pa.Array:
        values = _array(value(batch), batch)
        found = pc.is_in(values, value_set=options)
        return pc.if_else(pc.is_valid(values), found, None)  # null IN (...) is null
    return member, "bool"


def _like(node: exp.Like | exp.ILike, schema: pa.Schema) -> tuple[Compiled, _Kind]:
    text, pattern = _text(node.this, schema), _text_literal(node.expression)
    if "\\" in pattern or node.args.get("escape"):
        raise _Unsupported("LIKE with an escape character")
    ignore_case = isinstance(node, exp.ILike)
    return (lambda b: pc.match_like(_array(text(b), b), pattern=pattern,
                                    ignore_case=ignore_case)), "bool"


def _array(value: pa.Array | pa.Scalar, batch: pa.Table) -> pa.Array:
    """``value`` as an array: a literal (or a function of one) once per row."""
    if isinstance(value, pa.Scalar):
        return pa.array([value.as_py()] * batch.num_rows, value.type)
    return value

