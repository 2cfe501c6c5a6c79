"""A method's options, declared once: ``option(default, doc=..., choices=..., low=..., ...)``.

Each option is a field of the method's frozen dataclass whose metadata holds an
:class:`OptionSpec`: its meaning and its allowed values. :func:`check_options` (run by
``Algorithm.validate``) checks every declared option against it and the field's annotation
(``int``, ``float``, ``str``, ``bool`` and unions of them with ``None``), and the same
declaration feeds ``fedrnd list`` and the config reference, so the three cannot disagree.

A subclass that only changes a default (``prox_mu: float = 0.01``) keeps its parent's
declaration: the spec is looked up along the method's bases.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np

_KEY = "option"
_SIMPLE = (int, float, str, bool, type(None))


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """What an option means and which values it takes (beyond its annotation's type).

    ``choices`` constrain string values (and name every allowed value of a ``str`` option);
    ``low``/``high`` bound numbers (closed unless ``low_open``/``high_open``); ``integer``
    requires an integer even where the annotation says ``float``; ``finite`` rejects ``inf``
    (``nan`` is never accepted); ``allow_none`` accepts ``None`` where the annotation does not
    say so.
    """

    doc: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    allow_none: bool = False
    finite: bool = False


def option(default: Any = dataclasses.MISSING, *, doc: str,
           choices: Sequence[Any] | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False,
           integer: bool = False, allow_none: bool = False, finite: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field declaring one option of a method (see :class:`OptionSpec`)."""
    spec = OptionSpec(" ".join(doc.split()), None if choices is None else tuple(choices), low,
                      high, low_open, high_open, integer, allow_none, finite)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_KEY: spec})


def same_option(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field declared as option ``name`` of ``cls`` (its default unless ``default``), for an
    option another class exposes under a name of its own."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return dataclasses.field(default=f.default if default is dataclasses.MISSING else default,
                             metadata=f.metadata)


def _kinds(hint: Any) -> frozenset[type] | None:
    """The simple types an annotation allows, or ``None`` when it is not simple."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else (hint,)
    if not all(a in _SIMPLE for a in args):
        return None
    return frozenset(args)


@functools.cache
def declared_options(cls: type) -> dict[str, tuple[OptionSpec | None, frozenset[type] | None]]:
    """Every option of a method class (its fields but the engine): ``(spec, kinds)``, the
    spec ``None`` for a field declared without :func:`option`, ``kinds`` ``None`` for an
    annotation that is not a simple type."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no type checks
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "engine" or not f.init:
            continue
        spec = next((fs[f.name].metadata[_KEY] for k in cls.__mro__
                     if f.name in (fs := vars(k).get("__dataclass_fields__", {}))
                     and _KEY in fs[f.name].metadata), None)
        out[f.name] = (spec, _kinds(hints[f.name]) if f.name in hints else None)
    return out


def option_doc(cls: type, name: str) -> str:
    """The declared meaning of option ``name`` of ``cls`` (``""`` when undeclared)."""
    spec = declared_options(cls).get(name, (None, None))[0]
    return spec.doc if spec is not None else ""


def _number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(
        v, bool | np.bool_)


def _integer_only(spec: OptionSpec, kinds: frozenset[type]) -> bool:
    return spec.integer or (int in kinds and float not in kinds)


def allowed(spec: OptionSpec, kinds: frozenset[type] | None) -> str:
    """The allowed values in words: ``an integer >= 1 or None``, ``one of ['a', 'b']``."""
    kinds = kinds if kinds is not None else frozenset()
    strings = [c for c in spec.choices or () if isinstance(c, str)]
    none = type(None) in kinds or spec.allow_none or None in (spec.choices or ())
    parts = []
    if int in kinds or float in kinds:
        what = "an integer" if _integer_only(spec, kinds) else (
            "a finite number" if spec.finite else "a number")
        lo = None if spec.low is None else f"{spec.low:g}"
        hi = None if spec.high is None else f"{spec.high:g}"
        if lo is not None and hi is not None:
            what += (f" in {'(' if spec.low_open else '['}{lo}, "
                     f"{hi}{')' if spec.high_open else ']'}")
        elif lo is not None:
            what += f" {'>' if spec.low_open else '>='} {lo}"
        elif hi is not None:
            what += f" {'<' if spec.high_open else '<='} {hi}"
        parts.append(what)
    if bool in kinds:
        parts += ["true", "false"]
    if str in kinds:
        if not strings:
            parts.append("a string")
        elif parts:
            parts.append(" or ".join(repr(s) for s in strings))
        else:
            return f"one of {[None, *strings] if none else strings}"
    if none:
        parts.append("None")
    if not parts:
        return f"one of {list(spec.choices or ())}"
    return " or ".join(parts) if len(parts) <= 2 else ", ".join(parts[:-1]) + " or " + parts[-1]


def accepts(spec: OptionSpec, kinds: frozenset[type] | None, v: Any) -> bool:
    """Whether ``v`` is an allowed value of an option declared by ``spec``, ``kinds``."""
    if v is None:
        return kinds is None or type(None) in kinds or spec.allow_none or \
            None in (spec.choices or ())
    if isinstance(v, bool | np.bool_):
        return kinds is None or bool in kinds
    if _number(v):
        if kinds is not None:
            if not (int in kinds or float in kinds):
                return False
            if _integer_only(spec, kinds) and not isinstance(v, int | np.integer):
                return False
        x = float(v)
        if math.isnan(x) or (spec.finite and not math.isfinite(x)):
            return False
        if spec.low is not None and (x <= spec.low if spec.low_open else x < spec.low):
            return False
        return spec.high is None or (x < spec.high if spec.high_open else x <= spec.high)
    if isinstance(v, str):
        if kinds is not None and str not in kinds:
            return False
        strings = [c for c in spec.choices or () if isinstance(c, str)]
        return not strings or v in strings
    return kinds is None


def check_options(alg: Any) -> None:
    """``ValueError`` naming the method, the option, what it allows and the value received,
    for the first declared option of ``alg`` whose value its declaration does not allow."""
    for name, (spec, kinds) in declared_options(type(alg)).items():
        if spec is None:
            continue
        v = getattr(alg, name)
        if not accepts(spec, kinds, v):
            raise ValueError(f"{alg.name} {name} must be {allowed(spec, kinds)}, got {v!r}")
