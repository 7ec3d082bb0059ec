"""Config fields that are command-line flags, and the checks a config's ``__post_init__`` runs.

Every component owns its config (``ParallelConfig``, ``Qwen25VLModelConfig``, ``CPPOLossConfig``,
``RolloutConfig``, ``DataConfig``); the trainer composes them (training/config.py) and generates
one flag per option field from this metadata, so a setting has one name from the command line to
the code that reads it:

    @dataclass(kw_only=True)
    class LossConfig:
        kl_coef: float = option(0.01, "coefficient of the KL-to-reference term")   # --kl-coef
        chunk_size: Optional[int] = None      # a plain field: set by code, never a flag

    def __post_init__(self):
        check_float(self, "kl_coef", 0.0)     # ValueError("--kl-coef: must be in [0.0, inf], ...")

Spelling: ``--`` + the field name with ``-`` for ``_``; a boolean option that defaults to True is
switched off by ``--no-<name>`` (``negated``). Errors are ``ValueError`` whose message starts with
the flag (``bad``): the same text whether the config came from the command line, a YAML file or
Python.

This module imports nothing of the package (every room may use it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

__all__ = ["bad", "check_bool", "check_choice", "check_float", "check_int", "cli_name", "flag",
           "help_text", "is_option", "negated", "option", "option_fields"]

_HELP = "help"


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is a command-line flag (``help``: its ``--help`` text)."""
    if not help:
        raise ValueError("option() needs a help text")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_HELP: help})


def is_option(f: dataclasses.Field) -> bool:
    return _HELP in f.metadata


def option_fields(cls_or_obj) -> list[dataclasses.Field]:
    """The option fields of a config class (or instance), in declaration order."""
    return [f for f in dataclasses.fields(cls_or_obj) if is_option(f)]


def help_text(f: dataclasses.Field) -> str:
    return f.metadata[_HELP]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def negated(f: dataclasses.Field) -> bool:
    """A boolean option on by default: its flag is ``--no-<name>``."""
    return f.type in ("bool", bool) and f.default is True


def cli_name(f: dataclasses.Field) -> str:
    return ("--no-" + f.name.replace("_", "-")) if negated(f) else flag(f.name)


def bad(name: str, message: str) -> ValueError:
    """The error of a bad setting: ``--<name>: <message>``."""
    return ValueError(f"{flag(name)}: {message}")


def check_int(obj, name: str, minimum: int, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(name, f"must be an integer >= {minimum}, got {value!r}")


def check_float(obj, name: str, lo: float = -math.inf, hi: float = math.inf, *,
                lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """A finite number in the interval (ints accepted and stored as float)."""
    value = getattr(obj, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise bad(name, f"must be in {lb}{lo}, {hi}{rb}, got {value!r}")
    setattr(obj, name, float(value))


def check_choice(obj, name: str, choices: Sequence, *, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if value not in choices:
        raise bad(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_bool(obj, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise bad(name, f"must be true or false, got {getattr(obj, name)!r}")
