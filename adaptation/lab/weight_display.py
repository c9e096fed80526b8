"""Showing per-token weights to a person: a coloured terminal rendering and a PNG heat-strip.

Colour intensity is relative to the text's largest weight, so what stands out is what the
weighting model singles out in this text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from adaptation.weighting.camels import TokenWeight

RESET = "\x1b[0m"


def _pieces(text: str, spans: Sequence[TokenWeight]) -> list[tuple[str, float | None]]:
    """The whole text cut into token pieces (with weights) and the gaps between them (None)."""
    out: list[tuple[str, float | None]] = []
    pos = 0
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        if span.end <= pos:
            continue
        start = max(span.start, pos)
        if start > pos:
            out.append((text[pos:start], None))
        out.append((text[start : span.end], span.weight))
        pos = span.end
    if pos < len(text):
        out.append((text[pos:], None))
    return out


def _ramp(t: float) -> tuple[int, int, int]:
    """White (weight 0) through yellow to red (the text's largest weight)."""
    t = min(max(t, 0.0), 1.0)
    return 255, int(255 - 155 * t), int(255 - 255 * min(1.0, 1.6 * t))


def ansi_rendering(text: str, spans: Sequence[TokenWeight]) -> str:
    """The text with each token's background coloured by its weight (24-bit ANSI colours)."""
    top = max((s.weight for s in spans), default=0.0) or 1.0
    parts: list[str] = []
    for piece, weight in _pieces(text, spans):
        if weight is None:
            parts.append(piece)
            continue
        r, g, b = _ramp(weight / top)
        for i, line in enumerate(piece.split("\n")):
            if i:
                parts.append("\n")
            if line:
                parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{line}{RESET}")
    return "".join(parts)


def weight_table(text: str, spans: Sequence[TokenWeight]) -> str:
    """One token per line with its weight, for logs and terminals without colour."""
    return "\n".join(f"{s.weight:8.4f}  {text[s.start : s.end]!r}" for s in spans)


def summary(spans: Sequence[TokenWeight]) -> str:
    if not spans:
        return "no tokens"
    w = [s.weight for s in spans]
    return f"{len(w)} tokens, weight min {min(w):.4f}, mean {sum(w) / len(w):.4f}, max {max(w):.4f}"


def heat_strip_png(
    text: str,
    spans: Sequence[TokenWeight],
    path: str | os.PathLike[str],
    width_chars: int = 80,
    title: str | None = None,
) -> Path:
    """Draw the text as rows of tokens on coloured cells, wrapped at `width_chars`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.patches import Rectangle

    top = max((s.weight for s in spans), default=0.0) or 1.0
    norm = Normalize(vmin=0.0, vmax=top)
    # The dark end of YlOrRd would hide black text.
    cmap = LinearSegmentedColormap.from_list(
        "weight", plt.get_cmap("YlOrRd")(np.linspace(0, 0.7, 256))
    )
    cells: list[tuple[int, int, str, float | None]] = []
    row, col = 0, 0
    for piece, weight in _pieces(text, spans):
        for i, line in enumerate(piece.split("\n")):
            if i:
                row, col = row + 1, 0
            if not line:
                continue
            if col + len(line) > width_chars and col > 0:
                row, col = row + 1, 0
            cells.append((row, col, line, weight))
            col += len(line)
    rows = row + 1
    cols = max((c + len(line) for _, c, line, _ in cells), default=1)
    fig, ax = plt.subplots(figsize=(cols * 0.11 + 1.2, rows * 0.28 + 0.9))
    for r, c, line, weight in cells:
        if weight is not None:
            ax.add_patch(Rectangle((c, -r - 1), len(line), 1, color=cmap(norm(weight)), lw=0))
        ax.text(
            c + len(line) / 2,
            -r - 0.5,
            line,
            va="center",
            ha="center",
            family="monospace",
            fontsize=10,
        )
    ax.set_xlim(0, cols)
    ax.set_ylim(-rows, 0)
    ax.axis("off")
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=ax,
        fraction=0.03,
        pad=0.01,
        label="token weight",
    )
    if title:
        ax.set_title(title, fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return out
