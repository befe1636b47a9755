"""A schedule sized to a wall-clock budget (`vitlab train --budget 10m`): warmup and cosine end at the budget.

The number of optimizer steps that fit is measured, not guessed: the first steps of the run (at least
``min_steps``, and about ``probe_fraction`` of the budget) run at learning rate 0 while their throughput is timed;
Adam's moment estimates warm up on them, the weights do not move. Their rate, averaged over the processes, sizes the
rest of the budget, and is measured once more, over the steps since the probe, when the warmup ends (`refit`);
the count is recorded in the run's config (``steps``, ``probe_steps``, ``warmup_steps``), and a resumed run reads
it back from its checkpoint instead of measuring again, so resume stays exact; a checkpoint taken while a count is
still to fix keeps the probe's clock (`BudgetProbe.state_dict`), and the resumed run fixes it at the same step.
Only training time counts: evaluation and checkpoints are not in the budget (as in the trainer's ``train_time_s``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vitlab.errors import VitlabError
from vitlab.train.optim import lr_at

_UNITS = {"s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh]?)")


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``600``, ``"600"``, ``"90s"``, ``"10m"``, ``"1h30m"``."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = _DURATION.findall(s)
        if not s or "".join(n + u for n, u in parts) != s:
            raise VitlabError(
                f"cannot read the budget {text!r}: write seconds (600) or a duration like 90s, 10m, 1h30m"
            )
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if not seconds > 0:
        raise VitlabError(f"the budget must be positive, got {text!r}")
    return seconds


class BudgetProbe:
    """Times the first steps of a run and fixes how many steps fit in ``budget_s`` of training time.

    Call `observe` after every optimizer step with the step count and the training time so far; it returns None
    while measuring and the total number of steps once (when it has enough); `refit` measures it again later.
    ``reduce`` sums a tensor over the processes (``all_reduce_sum``), so that every process stops measuring at the
    same step and fixes the same count."""

    def __init__(
        self,
        budget_s: float,
        *,
        min_steps: int = 2,
        probe_fraction: float = 0.02,
        max_probe_s: float = 15.0,
        reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
        world_size: int = 1,
    ) -> None:
        self.budget_s = budget_s
        self.min_steps = max(min_steps, 1)  # timed steps, after the first one observed
        self.probe_s = min(probe_fraction * budget_s, max_probe_s)
        self.reduce, self.world_size = reduce, world_size
        self.rate: float | None = None  # steps per second, once measured
        self.start: tuple[int, float] | None = None  # (step, training time) where the clock started
        self.fixed_at: tuple[int, float] | None = None  # (step, training time) where the probe fixed its count
        self.count: int | None = None  # the step count, once fixed
        self.refit_at: int | None = None  # the step where `after_step` measures again (the trainer's warmup end)

    @property
    def measuring(self) -> bool:
        """A count still to fix: the first, or the one measured again at ``refit_at``."""
        return self.rate is None or self.refit_at is not None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run fixes the count at the step, and from the clock, that an
        uninterrupted one does."""
        return {
            "start": self.start,
            "fixed_at": self.fixed_at,
            "rate": self.rate,
            "count": self.count,
            "refit_at": self.refit_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.rate, self.count, self.refit_at = (state[k] for k in ("start", "rate", "count", "refit_at"))
        self.fixed_at = state.get("fixed_at")  # checkpoints before it refit from the clock's start

    def after_step(self, step: int, train_time: float) -> tuple[int, str] | None:
        """(the step count, why) when this step fixes it: the probe's first count, or the count measured again at
        ``refit_at``; None on every other step."""
        if self.rate is None:
            if (count := self.observe(step, train_time)) is None:
                return None
            self.fixed_at = (step, train_time)
            why = f"{self.rate:.2f} steps/s over the first {step} steps (at lr 0)"
            if count == step:
                why += "; measuring took the whole budget, no step is left to learn: raise --budget"
        elif step == self.refit_at:
            before, self.refit_at = self.count, None
            count = self.refit(step, train_time)
            since = self._refit_from(train_time)[0]
            why = f"{self.rate:.2f} steps/s over steps {since}-{step} (the warmup), {before} before"
        else:
            return None
        self.count = count
        return count, why

    def observe(self, step: int, train_time: float) -> int | None:
        if self.start is None:  # the first step is slow (allocation, caches): the clock starts after it
            self.start = (step, train_time)
            return None
        s0, t0 = self.start
        if step - s0 < self.min_steps:
            return None
        # (done here, rate here) summed over the processes: every process takes the same decision
        done = float(train_time - t0 >= self.probe_s or train_time >= self.budget_s)
        rate = (step - s0) / max(train_time - t0, 1e-9)
        votes = self.reduce(torch.tensor([done, rate], dtype=torch.float64))
        if votes[0].item() == 0:
            return None
        self.rate = votes[1].item() / self.world_size
        return self._count(step, train_time)

    def refit(self, step: int, train_time: float) -> int:
        """The count measured again (the trainer does it when the warmup ends), over the steps since the probe fixed
        its count: the probe's first seconds can run faster than the run's average (a 10-minute run overshot its
        budget by 13% on the probe's count alone), and slower (caches still cold: averaging from the clock's start,
        5-minute caption runs trained 186 s). Until the warmup ends the learning rates do not depend on the count,
        so changing it there changes no step already taken."""
        s0, t0 = self._refit_from(train_time)
        rate = (step - s0) / max(train_time - t0, 1e-9)
        self.rate = self.reduce(torch.tensor([rate], dtype=torch.float64)).item() / self.world_size
        return self._count(step, train_time)

    def _refit_from(self, train_time: float) -> tuple[int, float]:
        """(step, training time) where `refit`'s window starts: where the probe fixed its count, when the steps since
        span as long as the probe did; else where the clock started (a warmup of a few steps, an epoch of a small
        set, times too little: one slow step there, an epoch boundary, halved a 2-minute run's count)."""
        if self.fixed_at is not None and train_time - self.fixed_at[1] >= self.probe_s:
            return self.fixed_at
        return self.start

    def _count(self, step: int, train_time: float) -> int:
        """Steps in all: those taken and those the rest of the budget holds at ``self.rate``."""
        return step + max(0, math.floor((self.budget_s - train_time) * self.rate))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every step: linear warmup then cosine to ``min_lr`` over steps ``probe_steps`` to
    ``total_steps``; the ``probe_steps`` before them (a budget's throughput measurement) run at 0."""

    total_steps: int
    warmup_steps: int
    lr: float
    min_lr: float
    probe_steps: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.probe_steps:
            return 0.0
        return lr_at(
            step - self.probe_steps,
            total_steps=self.total_steps - self.probe_steps,
            warmup_steps=self.warmup_steps,
            lr=self.lr,
            min_lr=self.min_lr,
        )


def budget_warmup(warmup_steps: int, total_steps: int, probe_steps: int) -> int:
    """A budget's warmup: the recipe's, but at most a fifth of the steps that remain after the probe (a short
    budget must not spend itself warming up)."""
    return min(warmup_steps, (total_steps - probe_steps) // 5)
