"""A small, safe expression language for sweep filters and the `eval` resolver.

Python expression syntax restricted to literals, names (dotted names are looked up as config
paths), arithmetic, comparisons, boolean logic, `x if c else y` and a few pure functions.
Expressions are checked once when compiled and then interpreted; nothing reaches `eval`.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from typing import Any

from airflow_oellm.config.errors import shown

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {
    ast.Not: operator.not_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "round": round,
    "min": min,
    "max": max,
    "abs": abs,
    "len": len,
}
_MAX_POWER = 4096
_MAX_SEQUENCE = 100_000
_MAX_TEXT = 10_000  # characters of an expression
_MAX_INT_BITS = 10_000  # about 3,000 digits: well inside what Python converts to text (4,300)


class ExpressionError(ValueError):
    pass


def _repeated_length(left: Any, right: Any) -> int:
    """Length of `sequence * count` before computing it (0 when it is no repetition)."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and not isinstance(count, bool):
            return len(sequence) * max(count, 0)
    return 0


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _check(node: ast.AST, text: str) -> None:
    for child in ast.walk(node):
        ok = (
            isinstance(
                child,
                (
                    ast.Expression,
                    ast.BoolOp,
                    ast.And,
                    ast.Or,
                    ast.BinOp,
                    ast.UnaryOp,
                    ast.Compare,
                    ast.IfExp,
                    ast.Constant,
                    ast.Name,
                    ast.Load,
                    ast.List,
                    ast.Tuple,
                    ast.Call,
                    ast.Attribute,
                ),
            )
            or type(child) in _BINARY
            or type(child) in _UNARY
            or type(child) in _COMPARE
        )
        if not ok:
            raise ExpressionError(f"{type(child).__name__} is not allowed in expression {text!r}")
        if isinstance(child, ast.Attribute) and _dotted(child) is None:
            raise ExpressionError(f"only dotted names may use '.', in expression {text!r}")
        if isinstance(child, ast.Call):
            if not isinstance(child.func, ast.Name) or child.func.id not in FUNCTIONS:
                raise ExpressionError(f"unknown function in expression {text!r}; allowed: {', '.join(FUNCTIONS)}")
            if child.keywords:
                raise ExpressionError(f"keyword arguments are not allowed in expression {text!r}")


class Expression:
    """A compiled expression; call `evaluate(variables)`."""

    def __init__(self, text: str):
        self.text = text
        if len(text) > _MAX_TEXT:
            raise ExpressionError(f"expression longer than {_MAX_TEXT:,} characters: {shown(text, 200)}")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"invalid expression {shown(text, 200)}: {exc.msg}") from None
        except (ValueError, RecursionError, MemoryError) as exc:  # NUL bytes, nesting too deep for the parser
            raise ExpressionError(f"invalid expression {shown(text, 200)}: {type(exc).__name__}") from None
        _check(tree, text)
        self._tree = tree.body

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        try:
            return self._eval(self._tree, variables)
        except RecursionError:
            raise ExpressionError(f"expression nested too deeply: {shown(self.text, 200)}") from None

    def _bounded(self, value: Any) -> Any:
        """A result no later step chokes on: ints Python can still print, sequences of bounded length."""
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise ExpressionError(f"number too large in expression {shown(self.text, 200)}")
        if isinstance(value, (str, list, tuple)) and len(value) > _MAX_SEQUENCE:
            raise ExpressionError(f"result longer than {_MAX_SEQUENCE:,} in expression {shown(self.text, 200)}")
        return value

    def _lookup(self, name: str, variables: Mapping[str, Any]) -> Any:
        if name in variables:
            return variables[name]
        head, _, rest = name.partition(".")
        if rest and head in variables:
            value = variables[head]
            for part in rest.split("."):
                if isinstance(value, Mapping) and part in value:
                    value = value[part]
                else:
                    break
            else:
                return value
        if name in FUNCTIONS:
            raise ExpressionError(f"{name} is a function; call it, in expression {self.text!r}")
        known = ", ".join(sorted(variables)) or "none"
        raise ExpressionError(f"unknown name '{name}' in expression {self.text!r}; known names: {known}")

    def _eval(self, node: ast.AST, v: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            return self._lookup(_dotted(node) or "", v)
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                result: Any = True
                for value in node.values:
                    result = self._eval(value, v)
                    if not result:
                        return result
                return result
            result = False
            for value in node.values:
                result = self._eval(value, v)
                if result:
                    return result
            return result
        if isinstance(node, ast.UnaryOp):
            try:
                return _UNARY[type(node.op)](self._eval(node.operand, v))
            except TypeError as exc:
                raise ExpressionError(f"{exc} in expression {shown(self.text, 200)}") from None
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, v), self._eval(node.right, v)
            if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > _MAX_POWER:
                raise ExpressionError(f"exponent too large in expression {shown(self.text, 200)}")
            if isinstance(node.op, ast.Mult) and _repeated_length(left, right) > _MAX_SEQUENCE:
                raise ExpressionError(f"repetition too large in expression {shown(self.text, 200)}")
            if isinstance(node.op, ast.Mod) and isinstance(left, str):
                # printf-style formatting takes widths from its arguments: `'%*d' % (10**9, 1)`
                raise ExpressionError(f"'%' formatting of text is not allowed in expression {shown(self.text, 200)}")
            try:
                return self._bounded(_BINARY[type(node.op)](left, right))
            except (TypeError, ZeroDivisionError, OverflowError) as exc:
                raise ExpressionError(f"{exc} in expression {shown(self.text, 200)}") from None
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, v)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._eval(comparator, v)
                try:
                    ok = _COMPARE[type(op)](left, right)
                except TypeError as exc:
                    raise ExpressionError(f"{exc} in expression {self.text!r}") from None
                if not ok:
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self._eval(node.body, v) if self._eval(node.test, v) else self._eval(node.orelse, v)
        if isinstance(node, ast.List):
            return [self._eval(e, v) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(e, v) for e in node.elts)
        if isinstance(node, ast.Call):
            func = FUNCTIONS[node.func.id]  # type: ignore[attr-defined]
            try:
                return self._bounded(func(*(self._eval(a, v) for a in node.args)))
            except (TypeError, ValueError, OverflowError) as exc:
                raise ExpressionError(f"{exc} in expression {shown(self.text, 200)}") from None
        raise ExpressionError(f"cannot evaluate {type(node).__name__} in expression {self.text!r}")
