"""Options as data: a dataclass field declared with ``option(default, help, check, ...)`` carries its range,
default, help text and command-line flag, so that one declaration gives the check of a config built in
Python (``validate``) and the argparse flag of the command line (``add_options``), with the same one-line
message for a wrong value either way.

A check is a (predicate, "what it allows") pair: ``int_range(1)``, ``number(0, lo_open=True)``,
``one_of("a", "b")``, ``optional(check)``, ``BOOL``, ``TEXT``; ``arg_type(check, int)`` turns one into an
argparse type for options that are not dataclass fields.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, field, fields
from typing import Callable, Optional

from .errors import UserError


# checks: (predicate, what it allows) -------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_range(lo: int, hi: Optional[int] = None):
    return (lambda v: _is_int(v) and v >= lo and (hi is None or v <= hi),
            f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]")


def number(lo: float, lo_open: bool = False, hi: Optional[float] = None, hi_open: bool = False):
    def ok(v):
        return (_is_number(v) and (v > lo if lo_open else v >= lo) and
                (hi is None or (v < hi if hi_open else v <= hi)))
    if hi is None:
        return ok, f"a number {'>' if lo_open else '>='} {lo:g}"
    return ok, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def optional(check):
    ok, text = check
    return (lambda v: v is None or ok(v)), text


def one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(str(c) for c in choices)


BOOL = ((lambda v: isinstance(v, bool)), "true or false")
TEXT = ((lambda v: v is None or (isinstance(v, str) and v != "")), "a non-empty text")


def option(default, help: str, check=TEXT, *, flag: Optional[str] = None, kind: str = "value",
           choices=None, metavar: Optional[str] = None, group: str = "training", cli: bool = True):
    """A config field (see the module docstring). kind: "value" (parsed with the field's type), "text" (passed on as given, for the
    command to read), "flag" (a switch that sets True),
    "negflag" (``flag`` sets False), "bool" (--x / --no-x), "optional-value" (the flag alone means
    ``const``: see ``compile``). ``flag`` defaults to --field-name; ``cli=False`` keeps it off the parser."""
    meta = {"help": help, "check": check, "flag": flag, "kind": kind, "choices": choices, "metavar": metavar,
            "group": group, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# the command line ------------------------------------------------------------------------------------------
def validate(config) -> None:
    """Every field of ``config`` (declared with ``option``) passes its check; else a one-line UserError naming
    the field's flag and what it allows."""
    for f in fields(config):
        if "check" not in f.metadata:
            continue
        ok, allowed = f.metadata["check"]
        value = getattr(config, f.name)
        if not ok(value):
            name = "--" + f.name.replace("_", "-") if f.metadata.get("kind") == "negflag" else flag_of(f)
            raise UserError(f"{name} must be {allowed}, got {value!r}")


def arg_type(check, convert: Callable[[str], object] = str) -> Callable[[str], object]:
    """An argparse type: the text converted (int, float or str), then ``check``; a wrong value is argparse's
    one-line error "expected <what the check allows>, got <text>"."""
    ok, allowed = check

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def flag_of(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _parse_as(f) -> Callable[[str], object]:
    """The argparse type of a field: its text parsed as the annotation's kind of value, then its check."""
    hint = str(f.type)  # the annotation's text, e.g. "Optional[int]"
    return arg_type(f.metadata["check"], int if "int" in hint else float if "float" in hint else str)


def add_options(parser: argparse.ArgumentParser, cls, names=None, defaults: Optional[dict] = None) -> None:
    """Add the fields ``names`` of dataclass ``cls`` (all with a command line when None) to ``parser`` as
    flags, in their groups.
    Every flag's default is None ("not given"), so a caller can tell what the user set; its help names the
    field's default (or ``defaults[name]`` when the caller fills it differently)."""
    groups = {}
    for f in fields(cls):
        meta = f.metadata
        if not meta["cli"] or (names is not None and f.name not in names):
            continue
        g = groups.get(meta["group"])
        if g is None:
            g = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        default = (defaults or {}).get(f.name, None if f.default is MISSING else f.default)
        text = meta["help"]
        if "default" not in text:
            text += f" (default: {default})"
        kind, flag = meta["kind"], flag_of(f)
        if kind == "flag":
            g.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        elif kind == "negflag":
            g.add_argument(flag, dest=f.name, action="store_false", default=None, help=text)
        elif kind == "bool":
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == "optional-value":
            g.add_argument(flag, dest=f.name, nargs="?", const="inductor", default=None, metavar=meta["metavar"],
                           help=text)
        elif kind == "text":  # read by the command (a JSON file or inline JSON)
            g.add_argument(flag, dest=f.name, default=None, metavar=meta["metavar"], help=text)
        elif meta["choices"] is not None:
            g.add_argument(flag, dest=f.name, choices=meta["choices"], default=None, help=text)
        else:
            g.add_argument(flag, dest=f.name, type=_parse_as(f), default=None,
                           metavar=meta["metavar"], help=text)


def given_options(args: argparse.Namespace, cls, names=None) -> dict:
    """The values of ``cls``'s fields (only ``names`` when given) the user gave on the command line (flags left
    out are not in the dict)."""
    known = {f.name for f in fields(cls)} if names is None else set(names)
    return {k: v for k, v in vars(args).items() if k in known and v is not None}


__all__ = ["option", "validate", "add_options", "given_options", "arg_type", "flag_of", "int_range", "number", "optional",
           "one_of", "BOOL", "TEXT"]
