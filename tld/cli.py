"""The one ``key=value`` command-line parser of tld's commands (``tld.train``, ``tld.evaluate``, ``tld.demo``,
``tld.prepare``, ``tld.autoencoder``, ...), at the bottom layer so that any module's command can use it.

    pairs = parse_key_values(["steps=300", "--lr=1e-3"])   # [("steps", "300"), ("lr", "1e-3")]
    coerce_value("300", "int")                             # 300
"""

from __future__ import annotations

import ast

__all__ = ["parse_key_values", "coerce_value", "parse_literal"]


def parse_key_values(args: list[str], hint: str = " (for example: preset=smoke max_steps=100)") -> list[tuple]:
    """``["key=value", ...]`` -> ``[(key, value), ...]`` in order; ``--max-steps=3`` reads as ``max_steps``.

    Args:
        args: the command-line words.
        hint: appended to the error for a word without ``=`` (an example, or the usage line).
    """
    pairs = []
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected key=value, got {arg!r}{hint}")
        k, v = arg.split("=", 1)
        pairs.append((k.strip().lstrip("-").replace("-", "_"), v.strip()))
    return pairs


def coerce_value(value: str, kind: str):
    """The text ``value`` as a ``kind`` (``bool``, ``int``, ``float``, ``dict`` or ``str``); ValueError if it is not one."""
    if kind == "bool":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"not a bool: {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        if kind == "int":
            return int(float(value)) if float(value).is_integer() else int(value)
        if kind == "float":
            return float(value)
        if kind == "dict":
            return dict(ast.literal_eval(value))
    except SyntaxError:
        raise ValueError(f"not a {kind}: {value!r}") from None
    return value


def parse_literal(value: str):
    """A model override's value: true/false/none, a Python literal (3, 0.5, (1, 2)), else the string."""
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
