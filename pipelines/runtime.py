"""Runtime helpers that erase and generate share: multi-process launch, progress lines, Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

import torch

from .meta import quiet


def multi_cpu_launch() -> bool:
    """True under torchrun/MPI without CUDA: accelerate then needs ``cpu=True`` to use gloo."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    return world > 1 and not torch.cuda.is_available()


def say(acc, message: str) -> None:
    """One progress line from the main process, for set-up phases that take more than a second."""
    if acc.is_main_process and not quiet():
        print(message, flush=True)


def warn(acc, message: str) -> None:
    """A warning from the main process, on stderr and also under --quiet: a run that changes
    course on its own says so."""
    if acc.is_main_process:
        import sys

        print(f"warning: {message}", file=sys.stderr, flush=True)


class StopFlag:
    """Turns the first Ctrl-C into a request to checkpoint and stop after the current step.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        old = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)

    def synced(self, acc) -> bool:
        """True when any process was asked to stop, so all stop at the same step."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        return flag.item() > 0


def restart_rate(bar) -> None:
    """Count the bar's rate from now on: the first batch (kernel warm-up, first allocations)
    can take many times a later one, and an ETA from it said 1 h 10 min for a 3:40 job."""
    done = bar.n
    bar.reset(total=bar.total)
    bar.initial = bar.n = done
    bar.refresh()
