"""The README and docs/architecture.md stay true to the code: every setting, command and module
is described where a reader looks for it."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    wanted = [f"UPTAKE_{name.upper()}" for name in Settings.model_fields]
    missing = [var for var in wanted if f"`{var}`" not in README]
    assert not missing, f"README.md does not describe {missing}"


def test_every_command_is_in_the_readmes_table() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in sub.choices if f"`uptake {name}" not in README]
    assert not missing, f"README.md's Commands table lacks {missing}"


def test_every_module_is_in_the_architecture() -> None:
    modules = [
        p
        for package in ("adaptation", "service")
        for p in sorted((ROOT / package).rglob("*.py"))
        if p.name != "__init__.py"
    ]
    missing = [str(p.relative_to(ROOT)) for p in modules if f"{p.name}`" not in ARCHITECTURE]
    assert not missing, f"docs/architecture.md does not mention {missing}"


def _options(parser: argparse.ArgumentParser, command: str = "uptake") -> list[tuple[str, str]]:
    """Every option of every subcommand, with its help text."""
    found: list[tuple[str, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _options(sub, f"{command} {name}")
        elif action.option_strings:
            found.append((f"{command} {action.option_strings[-1]}", action.help or ""))
    return found


def test_every_cli_option_says_what_it_does() -> None:
    bare = [option for option, text in _options(build_parser()) if not text.strip()]
    assert not bare, f"--help shows no text for {bare}"
