"""Where built artifacts live: under UPTAKE_HOME (default ~/.cache/uptake)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def uptake_home() -> Path:
    return Path(os.environ.get("UPTAKE_HOME", Path.home() / ".cache" / "uptake")).expanduser()


def demo_model_dir() -> Path:
    return uptake_home() / "demo"


def demo_world_dir() -> Path:
    return uptake_home() / "world"


def demo_weighter_dir(quick: bool = False) -> Path:
    return uptake_home() / ("camels-quick" if quick else "camels")


def base_weighter_dir(base: str) -> Path:
    """Where `UPTAKE_STRATEGY=camels` looks for the weighting model meta-trained against a
    packaged base (named canonically) when UPTAKE_WEIGHTER is unset."""
    return uptake_home() / f"camels-{base}"


def squad_split_dir() -> Path:
    """Where the build command of a packaged base's weighting model reads the SQuAD split."""
    return uptake_home() / "squad-split"


def demo_mac_dir(quick: bool = False) -> Path:
    return uptake_home() / ("mac-quick" if quick else "mac")


def built_in_place(out: Path, build: Callable[[Path], object]) -> Path:
    """Build into a sibling temporary directory and rename it into place, so an interrupted
    build never leaves a directory that looks finished."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
