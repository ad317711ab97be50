"""The plots of a training run, as the book draws them: pretraining's training and validation loss against
tokens seen (chapter 5), finetuning's loss and accuracy per epoch (chapter 6; chapter 7's loss).

Drawn with matplotlib's object API on the Agg canvas, so it needs no display and never touches
pyplot's global state (safe inside a training loop, a test, or a process without a screen).
"""

from __future__ import annotations

import math
from pathlib import Path

from .rundir import atomic_write

LOSSES = ("loss", [("train_loss", "training loss"), ("val_loss", "validation loss")])
ACCURACIES = ("accuracy", [("train_accuracy", "training accuracy"), ("val_accuracy", "validation accuracy")])


def plot_losses(evals: list[dict], path, title: str | None = None) -> Path | None:
    """Write a PNG of ``train_loss`` and ``val_loss`` against ``tokens`` from a list of eval records.

    Each record is a dict like ``{"tokens": 5120, "epoch": 1, "train_loss": 7.9, "val_loss": 8.1}``
    (``val_loss`` may be None). The file is written to a temporary name and renamed, so a reader never
    sees half a PNG. Returns the path, or None when there is nothing to plot yet.
    """
    return plot_curves(evals, path, [LOSSES], x="tokens", x_label="tokens seen", title=title)


def plot_finetuning(evals: list[dict], path, title: str | None = None) -> Path | None:
    """A finetuning run's loss and, when the records have one (a classifier's), its accuracy, side by side,
    against ``examples`` seen, with the epochs on a second axis on top. As :func:`plot_losses` otherwise."""
    panels = [LOSSES] + ([ACCURACIES] if any("val_accuracy" in r for r in evals) else [])
    return plot_curves(evals, path, panels, x="examples", x_label="examples seen", title=title)


def plot_curves(evals: list[dict], path, panels: list, x: str, x_label: str, title: str | None = None) -> Path | None:
    """One plot per panel, side by side: ``panels`` is a list of ``(y label, [(key, line label), ...])``; each
    line is that key of the records against their ``x``. None when there is nothing to plot yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first_key = panels[0][1][0][0]
    evals = [r for r in evals if r.get(first_key) is not None]
    if not evals:
        return None
    fig = Figure(figsize=(6 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    xs = [r[x] for r in evals]
    for i, (y_label, lines) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for (key, label), style in zip(lines, ("-", "-.")):
            points = [(t, r[key]) for t, r in zip(xs, evals) if r.get(key) is not None and math.isfinite(r[key])]
            if points:  # markers while there are few points: one evaluation is still a visible dot
                ax.plot([t for t, _ in points], [v for _, v in points], linestyle=style, label=label,
                        marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(loc="best")
        _epoch_axis(ax, xs, evals)
    if title:
        (fig.axes[0].set_title if len(panels) == 1 else fig.suptitle)(title)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def _epoch_axis(ax, xs: list, evals: list[dict]) -> None:
    """A second x axis on top with the epoch, as the book's plot_losses has (linear in what is seen)."""
    ep = [r.get("epoch", 0) for r in evals]
    if not any("epoch" in r for r in evals) or xs[-1] <= xs[0] or ep[-1] <= ep[0]:
        return
    scale = (ep[-1] - ep[0]) / (xs[-1] - xs[0])
    top = ax.secondary_xaxis("top", functions=(lambda t: ep[0] + (t - xs[0]) * scale,
                                               lambda e: xs[0] + (e - ep[0]) / scale))
    top.set_xlabel("epochs")
