"""Options declared once: one `Option` both adds its flag to a parser and says which config
field the parsed value fills, so a command's handler never copies flags into a config by hand.
Also the value types the lab's flags share (comma lists, trust weights)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SAME = "same"


@dataclass(frozen=True)
class Option:
    """A flag, its help, its argparse keywords, and the config field it fills (None: the
    handler reads it itself)."""

    flag: str
    help: str
    field: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return _dest(self.flag, self.kwargs)


def _dest(flag: str, kwargs: dict[str, Any]) -> str:
    """Where argparse puts the flag's value."""
    return str(kwargs.get("dest") or flag.lstrip("-").replace("-", "_"))


def opt(flag: str, help: str, to: str | None = SAME, **kwargs: Any) -> Option:
    """An option whose value fills the config field of the same name, unless `to` names
    another field or is None."""
    return Option(flag, help, _dest(flag, kwargs) if to == SAME else to, kwargs)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        parser.add_argument(option.flag, help=option.help, **option.kwargs)


def config_values(
    args: argparse.Namespace, options: Iterable[Option], given_only: bool = False
) -> dict[str, Any]:
    """Each option's parsed value under its config field; with `given_only`, only the options
    set on the command line (their default None), so the config's own defaults hold."""
    values = {o.field: getattr(args, o.dest) for o in options if o.field is not None}
    return {k: v for k, v in values.items() if v is not None} if given_only else values


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def at_least_one(text: str) -> int:
    return _at_least(text, 1)


def at_least_zero(text: str) -> int:
    return _at_least(text, 0)


def _at_least(text: str, least: int) -> int:
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def self_edit_prompt_name(text: str) -> str:
    from adaptation.prompts import SELF_EDIT_PROMPTS  # here: it loads torch

    if text not in SELF_EDIT_PROMPTS:
        raise argparse.ArgumentTypeError(
            f"unknown self-edit prompt {text!r}; use one of {', '.join(SELF_EDIT_PROMPTS)}"
        )
    return text


def trust_weights(text: str) -> dict[str, float]:
    from adaptation.trust import SourceTrust

    weights: dict[str, float] = {}
    for item in names(text):
        source, sep, weight = item.rpartition("=")
        if not sep or not source:
            raise argparse.ArgumentTypeError(f"expected SOURCE=WEIGHT, got {item!r}")
        try:
            weights[source] = float(weight)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{item!r}: the weight must be a number") from err
    try:
        SourceTrust(weights)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return weights
