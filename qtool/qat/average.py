"""Tail averaging of the QAT state (``qat.average_epochs``): the mean of the trained parameters over the last epochs.

Averaging the iterates (Polyak; SWA) takes out the step-to-step noise of the last epochs without another pass.
Here the window slides: after epoch ``e`` the averaged state is the mean of the trained parameters (weights,
biases, log-scales) at the ends of epochs ``max(1, e-K+1) .. e``. Training continues from the raw state; the
average is what is evaluated, offered to the keep rule, snapshotted and exported (:mod:`qtool.qat.train`).
Buffers (observed ranges, zero points) are not averaged. A learned scale is averaged as its log, i.e. the
geometric mean of the scales.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class TailAverage:
    """The mean of ``params`` over the last ``window`` calls of :meth:`push`."""

    def __init__(self, params: list[nn.Parameter], window: int) -> None:
        if window < 1:
            raise ValueError(f"an average needs a window of at least 1 epoch, got {window}")
        self.params, self.window = list(params), int(window)
        self.states: list[list[torch.Tensor]] = []

    def push(self) -> None:
        """Add the parameters' current values (an epoch's end); the oldest beyond the window drops out."""
        self.states.append([p.detach().clone() for p in self.params])
        del self.states[: max(0, len(self.states) - self.window)]

    def mean(self) -> list[torch.Tensor]:
        """Per parameter, the mean of the values in the window (the current values when the window is empty)."""
        if not self.states:
            return [p.detach().clone() for p in self.params]
        return [torch.stack(values).mean(dim=0) for values in zip(*self.states, strict=True)]

    def apply(self) -> None:
        """Load the mean into the parameters for good."""
        with torch.no_grad():
            for p, value in zip(self.params, self.mean(), strict=True):
                p.copy_(value)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The mean in the parameters inside the block; the raw values (bit for bit) after it."""
        raw = [p.detach().clone() for p in self.params]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, raw, strict=True):
                    p.copy_(value)

    def state_dict(self) -> dict:
        """The window and its states (for a checkpoint to resume from)."""
        return {"window": self.window, "states": [[t.clone() for t in s] for s in self.states]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave (same parameters, in the same order)."""
        if int(state["window"]) != self.window:
            raise ValueError(f"the checkpoint averages over {state['window']} epochs, this run over {self.window}")
        self.states = [[t.clone() for t in s] for s in state["states"]]
