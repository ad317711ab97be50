"""How long a run will take: the times of its steps, evaluations and epoch ends, and an estimate of the rest.

A progress bar's ETA counts steps only, and it is not there at all when the output goes to a file. A run
also evaluates every few steps, and an evaluation can cost as much as several steps. So the engine times
each part and, once a few steps are timed, prints one line: the time left, what it is made of, and the
clock time the run should end at. The first step of a run is not counted: it carries the warm-up (memory
allocation, kernel autotuning, ``torch.compile``). When that first estimate had no evaluation timed yet
(finetuning evaluates after each epoch), a second line follows the first evaluation.

How fast a run trains (:class:`Throughput`): tokens and examples per second, model FLOP/s and, on a GPU
whose peak is known (or measured), the MFU, in the progress bar and in each evaluation's record of
``log.jsonl`` (``"speed"``).
"""

from __future__ import annotations

import datetime

TIMED_STEPS = 3  # steps timed (after the first) before the first estimate
DAY, YEAR = 86400, 365.25 * 86400


def duration(seconds: float) -> str:
    """``seconds`` as a person says it: "40 s", "6 min 5 s", "2 h 13 min", "12 days", "3,171 years"."""
    s = round(seconds)
    if s < 60:
        return f"{max(seconds, 0):.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 else f"{round(seconds / 60)} min"
    if s < 2 * DAY:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s / DAY:,.0f} days" if s < 2 * YEAR else f"{s / YEAR:,.0f} years"


def count_due(step: int, total: int, every: int) -> int:
    """How many of the steps after ``step`` up to ``total`` are a multiple of ``every`` or the last one: the
    evaluations (or epoch ends) left, counted without walking the steps (a run may have billions)."""
    return total // every - step // every + (total % every != 0) if total > step else 0


class RunClock:
    """The durations the engine reports (:meth:`step`, :meth:`evaluation`, :meth:`epoch_end`) and the
    estimate they give (:meth:`estimate`)."""

    def __init__(self):
        self.steps: list[float] = []  # seconds of each step after the first
        self.warm = False  # the first step (the warm-up) is over
        self.eval_s: float | None = None  # the last evaluation's seconds
        self.epoch_end_s = 0.0  # the last epoch end's seconds (a sample, say)
        self.shown_without_evals = False

    def step(self, seconds: float) -> bool:
        """Record a step; True when the first estimate is due."""
        if not self.warm:
            self.warm = True
            return False
        self.steps.append(seconds)
        return len(self.steps) == TIMED_STEPS

    def evaluation(self, seconds: float) -> bool:
        """Record an evaluation; True when it completes an estimate shown without evaluations."""
        self.eval_s = seconds
        due, self.shown_without_evals = self.shown_without_evals, False
        return due

    def epoch_end(self, seconds: float) -> None:
        self.epoch_end_s = seconds

    def estimate(self, steps: int, evals: int, epoch_ends: int, then: str = "") -> str:
        """One line: the time that ``steps`` more steps, ``evals`` evaluations and ``epoch_ends`` epoch ends
        take at the rates measured so far, and when the run should end. ``then`` names untimed work after
        the last step (a test set)."""
        step_s = sum(self.steps) / len(self.steps)
        left = steps * step_s + epoch_ends * self.epoch_end_s
        parts = [f"{steps:,} steps of {duration(step_s)}"]
        if evals and self.eval_s is None:
            parts.append(f"{evals:,} evaluation{'s' if evals > 1 else ''} not timed yet")
            self.shown_without_evals = True
        elif evals:
            left += evals * self.eval_s
            parts.append(f"{evals:,} evaluation{'s' if evals > 1 else ''} of {duration(self.eval_s)}")
        try:
            end = datetime.datetime.now() + datetime.timedelta(seconds=left)
            done = f"training done around {end:%H:%M}" if left < DAY else f"training done around {end:%Y-%m-%d %H:%M}"
        except OverflowError:
            done = "training done after the year 9999"
        return f"estimate: {duration(left)} more ({', '.join(parts)}); {done}" + (f", then {then}" if then else "")

    def estimate_rest(self, step: int, total: int, eval_every: int, steps_per_epoch: int, then: str = "") -> str:
        """:meth:`estimate` for a run at ``step`` of ``total`` that evaluates every ``eval_every`` steps and at
        the end, and ends an epoch every ``steps_per_epoch`` steps and at the end."""
        return self.estimate(total - step, count_due(step, total, eval_every), count_due(step, total, steps_per_epoch),
                             then)


class Throughput:
    """The training's speed: tokens and examples per second of the steps' own time (not the evaluations'),
    the model FLOP/s of one device and, against its peak, the MFU (:mod:`gpt.flops`), for the progress bar
    (each step) and the log (the steps since the last evaluation). :meth:`rates` is the one place that turns
    counts and seconds into the figures both show.

    ``peak``: one device's dense peak FLOP/s in the training's precision (None on a CPU: FLOP/s only);
    ``devices``: how many devices share a step's FLOPs (the processes)."""

    def __init__(self, peak: float | None = None, devices: int = 1):
        self.peak, self.devices = peak, devices
        self.tokens, self.examples, self.flops, self.seconds = 0, 0, 0.0, 0.0  # since the last since_last

    def step(self, tokens: int, examples: int, seconds: float, flops: float = 0.0) -> dict:
        """Record a step (all processes' tokens, examples and model FLOPs); its own rates."""
        self.tokens, self.examples = self.tokens + tokens, self.examples + examples
        self.flops, self.seconds = self.flops + flops, self.seconds + seconds
        return self.rates(tokens, examples, seconds, flops)

    def since_last(self) -> dict | None:
        """The rates of the steps since the last call (None if there were none), and start counting anew."""
        counts = (self.tokens, self.examples, self.seconds, self.flops)
        self.tokens, self.examples, self.flops, self.seconds = 0, 0, 0.0, 0.0
        return self.rates(*counts) if counts[2] > 0 else None

    def rates(self, tokens: int, examples: int, seconds: float, flops: float = 0.0) -> dict:
        """{"tokens_per_s", "examples_per_s", "flops_per_s" (one device's), and "mfu" where there is a peak}."""
        seconds = max(seconds, 1e-9)
        per_device = flops / self.devices / seconds
        out = {"tokens_per_s": round(tokens / seconds, 1), "examples_per_s": round(examples / seconds, 2),
               "flops_per_s": float(f"{per_device:.4g}")}
        if self.peak:
            out["mfu"] = float(f"{per_device / self.peak:.4g}")
        return out

    @staticmethod
    def postfix(rates: dict) -> dict[str, str]:
        """The progress bar's fields: tokens/s, examples/s, and the MFU where there is a peak, else TFLOP/s."""
        out = {"tok_s": f"{rates['tokens_per_s']:,.0f}", "ex_s": f"{rates['examples_per_s']:,.1f}"}
        if "mfu" in rates:
            out["mfu"] = f"{100 * rates['mfu']:.1f}%"
        else:
            out["tflops"] = f"{rates['flops_per_s'] / 1e12:.3g}"
        return out
