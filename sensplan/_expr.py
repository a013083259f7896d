"""Cost expressions: arithmetic over a layer's dims as pruning leaves them, stored as plain JSON.

A method that changes a layer's structure (low-rank factorization splits one weight into two)
describes what the layer then stores as expressions of the layer's *pruned* weight dims ``d0``,
``d1``, ... (``d0`` = output channels, ``d1`` = input channels per group, then the kernel dims). The
scanner records the expressions in ``scan.json``; the planner evaluates them (numpy, no torch and no
method code) for every pruning option of the groups that shrink those dims, so the cost of a
factorized layer stays exact when its channels are pruned too.

Write them with ordinary arithmetic plus the helpers below::

    out, inp = unit.dims[0], unit.dims[1]             # Expr variables "d0", "d1"
    rank = maximum(1, round_half_up(0.5 * minimum(out, inp * 9)))
    Structure((Stored(rank, inp * 9), Stored(out, rank)), macs=64 * (rank * inp * 9 + out * rank))

JSON form: a number, a variable name (``"d1"``), or ``[op, arg, ...]`` with op one of ``+ - * /
min max floor ceil``. :meth:`Expr.degree` tells the planner whether an expression is linear in a
variable, which decides how it is priced exactly (see planner/_costs.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

Number = int | float
ExprLike = Union["Expr", int, float]

_BINARY = {"+", "-", "*", "/"}
_NARY = {"min", "max"}
_UNARY = {"floor", "ceil"}


class Expr:
    """An immutable arithmetic expression (a constant, a variable or an operation on expressions)."""

    __slots__ = ("args", "op")

    def __init__(self, op: str, args: tuple[Any, ...]) -> None:
        self.op = op
        self.args = args

    # -- construction ------------------------------------------------------------------------------
    def __add__(self, other: ExprLike) -> Expr:
        return _binary("+", self, other)

    def __radd__(self, other: ExprLike) -> Expr:
        return _binary("+", other, self)

    def __sub__(self, other: ExprLike) -> Expr:
        return _binary("-", self, other)

    def __rsub__(self, other: ExprLike) -> Expr:
        return _binary("-", other, self)

    def __mul__(self, other: ExprLike) -> Expr:
        return _binary("*", self, other)

    def __rmul__(self, other: ExprLike) -> Expr:
        return _binary("*", other, self)

    def __truediv__(self, other: ExprLike) -> Expr:
        return _binary("/", self, other)

    def __rtruediv__(self, other: ExprLike) -> Expr:
        return _binary("/", other, self)

    def __neg__(self) -> Expr:
        return _binary("-", 0, self)

    def __repr__(self) -> str:
        if self.op == "const":
            return repr(self.args[0])
        if self.op == "var":
            return str(self.args[0])
        if self.op in _BINARY:
            return f"({self.args[0]!r} {self.op} {self.args[1]!r})"
        return f"{self.op}({', '.join(repr(a) for a in self.args)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expr) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self))

    # -- data --------------------------------------------------------------------------------------
    @property
    def value(self) -> Number | None:
        """The number, for a constant (None otherwise)."""
        return self.args[0] if self.op == "const" else None  # type: ignore[no-any-return]

    def to_json(self) -> Any:
        if self.op == "const":
            return self.args[0]
        if self.op == "var":
            return self.args[0]
        return [self.op, *(a.to_json() for a in self.args)]

    @classmethod
    def from_json(cls, obj: Any) -> Expr:
        """Parse the JSON form; a malformed one raises ``ValueError`` saying where."""
        if isinstance(obj, bool):
            raise ValueError(f"A cost expression cannot be a boolean ({obj!r}).")
        if isinstance(obj, (int, float)):
            if not math.isfinite(obj):
                raise ValueError(f"A cost expression constant must be finite. Got {obj!r}.")
            return const(obj)
        if isinstance(obj, str):
            return var(obj)
        if isinstance(obj, list) and obj and isinstance(obj[0], str):
            op, raw = obj[0], obj[1:]
            args = tuple(cls.from_json(a) for a in raw)
            if (op in _BINARY and len(args) == 2) or (op in _NARY and args) or (op in _UNARY and len(args) == 1):
                return Expr(op, args)
        raise ValueError(f"{obj!r} is not a cost expression (a number, a variable name, or [op, args...] "
                         f"with op one of {sorted(_BINARY | _NARY | _UNARY)}).")

    # -- analysis ----------------------------------------------------------------------------------
    def variables(self) -> frozenset[str]:
        if self.op == "var":
            return frozenset(self.args)
        if self.op == "const":
            return frozenset()
        return frozenset().union(*(a.variables() for a in self.args))

    def degree(self, name: str) -> float:
        """The polynomial degree in variable ``name`` (0 if absent; ``inf`` where the expression is
        not a polynomial in it, e.g. a ``min`` or a ``floor`` of something that depends on it)."""
        if self.op == "const":
            return 0.0
        if self.op == "var":
            return 1.0 if self.args[0] == name else 0.0
        degs: list[float] = [a.degree(name) for a in self.args]
        if self.op in ("+", "-"):
            return max(degs)
        if self.op == "*":
            return degs[0] + degs[1]
        if self.op == "/":
            return degs[0] if degs[1] == 0 else math.inf
        return 0.0 if all(d == 0 for d in degs) else math.inf

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        """The value with each variable taken from ``env`` (numbers or numpy arrays, broadcast)."""
        if self.op == "const":
            return self.args[0]
        if self.op == "var":
            try:
                return env[self.args[0]]
            except KeyError:
                raise ValueError(f"The cost expression uses {self.args[0]!r}, which is not one of the "
                                 f"layer's dims ({', '.join(sorted(env))}).") from None
        vals = [a.evaluate(env) for a in self.args]
        return _EVAL[self.op](vals)


def _np() -> Any:
    import numpy  # only where expressions are evaluated over arrays (the planner)

    return numpy


_EVAL: dict[str, Callable[[list[Any]], Any]] = {
    "+": lambda v: v[0] + v[1],
    "-": lambda v: v[0] - v[1],
    "*": lambda v: v[0] * v[1],
    "/": lambda v: v[0] / v[1],
    "min": lambda v: _reduce(_np().minimum, v),
    "max": lambda v: _reduce(_np().maximum, v),
    "floor": lambda v: _np().floor(v[0]),
    "ceil": lambda v: _np().ceil(v[0]),
}


def _reduce(fn: Any, vals: Sequence[Any]) -> Any:
    out = vals[0]
    for v in vals[1:]:
        out = fn(out, v)
    return out


def const(value: Number) -> Expr:
    return Expr("const", (value,))


def var(name: str) -> Expr:
    if not name or not isinstance(name, str):
        raise ValueError(f"A variable needs a non-empty string name. Got {name!r} instead.")
    return Expr("var", (name,))


def as_expr(x: ExprLike) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"A cost expression takes numbers and expressions. Got {type(x).__name__}.")
    return const(int(x) if isinstance(x, numbers.Integral) else float(x))


def _binary(op: str, a: ExprLike, b: ExprLike) -> Expr:
    x, y = as_expr(a), as_expr(b)
    if x.value is not None and y.value is not None:
        return as_expr(_EVAL[op]([x.value, y.value]))
    # identities keep the stored JSON short
    if op == "+" and x.value == 0:
        return y
    if op in ("+", "-") and y.value == 0:
        return x
    if op == "*" and (x.value == 1 or y.value == 1):
        return y if x.value == 1 else x
    if op == "/" and y.value == 1:
        return x
    return Expr(op, (x, y))


def minimum(*xs: ExprLike) -> Expr:
    return _nary("min", xs)


def maximum(*xs: ExprLike) -> Expr:
    return _nary("max", xs)


def _nary(op: str, xs: Sequence[ExprLike]) -> Expr:
    if not xs:
        raise ValueError(f"{op} needs at least one argument.")
    args = tuple(as_expr(x) for x in xs)
    if all(a.value is not None for a in args):
        return as_expr((min if op == "min" else max)(a.value for a in args if a.value is not None))
    return args[0] if len(args) == 1 else Expr(op, args)


def floor(x: ExprLike) -> Expr:
    e = as_expr(x)
    return const(math.floor(e.value)) if e.value is not None else Expr("floor", (e,))


def ceil(x: ExprLike) -> Expr:
    e = as_expr(x)
    return const(math.ceil(e.value)) if e.value is not None else Expr("ceil", (e,))


def round_half_up(x: ExprLike) -> Expr:
    """``floor(x + 0.5)``: the rounding sensplan uses for counts (0.5 -> 1)."""
    return floor(as_expr(x) + 0.5)


def product(xs: Sequence[ExprLike]) -> Expr:
    out = const(1)
    for x in xs:
        out = out * x
    return out


def dims(n: int) -> tuple[Expr, ...]:
    """The variables ``d0 .. d{n-1}``: a weight's dims as pruning leaves them."""
    return tuple(var(f"d{i}") for i in range(n))


@dataclass(frozen=True)
class Stored:
    """One weight tensor a restructured layer stores: ``rows`` (output channels: one quantization
    scale each) by ``cols`` values per row. Both are expressions of the layer's pruned dims."""

    rows: ExprLike
    cols: ExprLike

    def to_data(self) -> dict[str, Any]:
        return {"rows": as_expr(self.rows).to_json(), "cols": as_expr(self.cols).to_json()}


@dataclass(frozen=True)
class Structure:
    """What a layer stores and computes after a structural method: its weight ``tensors`` (in
    place of the one original weight; other tensors such as the bias are unchanged) and its
    ``macs`` per sample, as expressions of the pruned dims.

    The effect field ``structure`` holds :meth:`to_data`; :func:`parse_structure` reads it back.
    """

    tensors: tuple[Stored, ...]
    macs: ExprLike

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("A Structure needs at least one stored tensor.")

    def to_data(self) -> dict[str, Any]:
        return {"tensors": [t.to_data() for t in self.tensors], "macs": as_expr(self.macs).to_json()}


@dataclass(frozen=True)
class ParsedStructure:
    """A structure read back: per stored tensor (rows, cols), and the MACs, as expressions."""

    tensors: tuple[tuple[Expr, Expr], ...]
    macs: Expr

    def numel(self) -> Expr:
        total = const(0)
        for rows, cols in self.tensors:
            total = total + rows * cols
        return total

    def rows(self) -> Expr:
        total = const(0)
        for rows, _ in self.tensors:
            total = total + rows
        return total


def parse_structure(data: Any) -> ParsedStructure:
    """The ``structure`` effect field (as :meth:`Structure.to_data` wrote it, or the object)."""
    if isinstance(data, Structure):
        data = data.to_data()
    try:
        tensors = tuple((Expr.from_json(t["rows"]), Expr.from_json(t["cols"])) for t in data["tensors"])
        if not tensors:
            raise ValueError("no stored tensor")
        return ParsedStructure(tensors, Expr.from_json(data["macs"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{data!r} is not a structure (tensors: [{{rows, cols}}, ...], macs): "
                         f"{type(e).__name__}: {e}") from None


def default_structure(shape: Sequence[int], macs: Number) -> ParsedStructure:
    """An unrestructured layer: its one weight (``d0`` rows by the product of the other dims) and
    its MACs, proportional to the weight's element count."""
    d = dims(len(shape))
    numel0 = math.prod(shape) if shape else 1
    cols = product(d[1:])
    return ParsedStructure(((d[0], cols),), (float(macs) / max(1, numel0)) * product(d))


__all__ = ["Expr", "ParsedStructure", "Stored", "Structure", "as_expr", "ceil", "const", "default_structure",
           "dims", "floor", "maximum", "minimum", "parse_structure", "product", "round_half_up", "var"]
