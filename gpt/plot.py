"""The loss plot of a training run: train and validation loss against tokens seen (chapter 5's figure).

Drawn with matplotlib's object API on the Agg canvas, so it needs no display and never touches
pyplot's global state (safe inside a training loop, a test, or a process without a screen).
"""

from __future__ import annotations

from pathlib import Path

from .rundir import atomic_write


def plot_losses(evals: list[dict], path, title: str | None = None) -> Path | None:
    """Write a PNG of ``train_loss`` and ``val_loss`` against ``tokens`` from a list of eval records.

    Each record is a dict like ``{"tokens": 5120, "epoch": 1, "train_loss": 7.9, "val_loss": 8.1}``
    (``val_loss`` may be None). The file is written to a temporary name and renamed, so a reader never
    sees half a PNG. Returns the path, or None when there is nothing to plot yet.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evals = [r for r in evals if r.get("train_loss") is not None]
    if not evals:
        return None
    tokens = [r["tokens"] for r in evals]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(tokens, [r["train_loss"] for r in evals], label="training loss")
    val = [(t, r["val_loss"]) for t, r in zip(tokens, evals) if r.get("val_loss") is not None]
    if val:
        ax.plot([t for t, _ in val], [v for _, v in val], linestyle="-.", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    if any("epoch" in r for r in evals) and tokens[-1] > tokens[0]:
        # a second x axis on top with the epoch, as the book's plot_losses has (linear in tokens seen)
        ep = [r.get("epoch", 0) for r in evals]
        if ep[-1] > ep[0]:
            scale = (ep[-1] - ep[0]) / (tokens[-1] - tokens[0])
            top = ax.secondary_xaxis("top", functions=(lambda t: ep[0] + (t - tokens[0]) * scale,
                                                       lambda e: tokens[0] + (e - ep[0]) / scale))
            top.set_xlabel("epochs")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
