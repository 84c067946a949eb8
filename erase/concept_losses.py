"""Each concept's own forget loss: recorded per step in the train log, summarised at the end.

A run that erases a list shares its steps between the concepts, and the mean loss hides a
concept that was drawn rarely or stopped moving. Each step records the unweighted forget loss
of the items it drew, keyed by their prompt (or caption); ``summary_lines`` reads the log back.
With several processes the log holds process 0's draws only (a sample of the step's items).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

# Above this many concepts the summary gives the spread instead of one line per concept.
MOST_LINES = 20


class ConceptLosses:
    """Collects (item ids, per-item losses) over a step's micro-batches; ``pop`` gives the
    step's mean loss per concept and starts the next step."""

    def __init__(self, captions: list[str]):
        self.captions = captions  # [N] the prompt or caption of each forget item
        self._ids: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """``ids`` [B] forget-item indices, ``losses`` [B] their objective losses (unweighted);
        kept on the device until ``pop`` so the step does not wait for them."""
        self._ids.append(ids.detach().cpu())
        self._losses.append(losses.detach().float())

    def pop(self) -> dict[str, float]:
        """{concept: mean loss of its items drawn this step}; empty when nothing was added."""
        if not self._ids:
            return {}
        ids = torch.cat(self._ids).tolist()
        losses = torch.cat([x.cpu() for x in self._losses]).tolist()
        self._ids, self._losses = [], []
        drawn: dict[str, list[float]] = {}
        for i, value in zip(ids, losses):
            drawn.setdefault(self.captions[i], []).append(value)
        return {c: sum(v) / len(v) for c, v in drawn.items()}


def too_few_draws(cfg) -> str | None:
    """Why some concepts cannot be drawn at all (fewer item draws than concepts), or None.

    One process's draws: ``steps * batch_size * gradient_accumulation_steps``."""
    if cfg.objective_slot().CLOSED_FORM or not cfg.concepts:
        return None
    draws = cfg.steps * cfg.batch_size * cfg.gradient_accumulation_steps
    if draws >= len(cfg.concepts):
        return None
    return (
        f"--steps {cfg.steps} draws {draws} forget items for {len(cfg.concepts)} concepts, so "
        "some are never erased; give --steps-per-concept"
    )


def read_concept_losses(log: Path) -> dict[str, list[float]]:
    """{concept: its losses in step order} from a train log's ``concepts`` records."""
    series: dict[str, list[float]] = {}
    if not Path(log).exists():
        return series
    for line in Path(log).read_text().splitlines():
        for concept, value in json.loads(line).get("concepts", {}).items():
            series.setdefault(concept, []).append(value)
    return series


def first_last(values: list[float]) -> tuple[float, float]:
    """Mean loss over the first and the last quarter of a concept's draws (one draw at least)."""
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def summary_lines(log: Path, concepts: list[str]) -> list[str]:
    """Lines for the end of ``loreun erase``: each concept's loss at the start and the end of
    its draws and how often it was drawn, or the spread when there are more than
    ``MOST_LINES``."""
    series = read_concept_losses(log)
    if not series:
        return []
    if len(series) > MOST_LINES:
        ends = {c: first_last(v)[1] for c, v in series.items()}
        top = max(ends, key=ends.get)
        draws = sorted(len(v) for v in series.values())
        return [
            f"forget loss by concept, last quarter of draws: median "
            f"{statistics.median(ends.values()):.4g}, highest {ends[top]:.4g} ({top!r}); "
            f"draws per concept {draws[0]}-{draws[-1]} (each step's in {Path(log).name})"
        ]
    lines = ["forget loss by concept (mean of its first -> last quarter of draws):"]
    for concept in [c for c in concepts if c in series] + sorted(set(series) - set(concepts)):
        start, end = first_last(series[concept])
        draws = len(series[concept])
        plural = "s" if draws > 1 else ""
        lines.append(f"  {concept!r}: {start:.4g} -> {end:.4g} ({draws} draw{plural})")
    return lines


def never_drawn(log: Path, concepts: list[str]) -> str | None:
    """A warning naming the concepts the run never drew (so never erased), or None."""
    series = read_concept_losses(log)
    never = [c for c in concepts if c not in series]
    if not series or not never:
        return None
    names = ", ".join(repr(c) for c in never[:5]) + (" ..." if len(never) > 5 else "")
    return (
        f"{len(never)} of {len(concepts)} concepts were never drawn: {names} (so not erased); "
        "give more steps (--steps-per-concept)"
    )
