"""One config trained with several seeds: the spread a single run hides. The benchmarks' seed loops use it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import fileio
from ..config import TrainConfig
from ..data import Splits
from ..training import Reporter, fit
from .report import mean_sd


@dataclass
class SeedRuns:
    config: TrainConfig
    summaries: list[dict[str, Any]]  # one summary.json per seed, in order

    def stat(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample sd of ``key`` over the seeds (e.g. "test_accuracy", "train_seconds")."""
        return mean_sd([s[key] for s in self.summaries if s.get(key) is not None])

    @property
    def run_dirs(self) -> list[Path]:
        return [Path(s["run_dir"]) for s in self.summaries]


def run_seeds(cfg: TrainConfig, seeds: list[int], splits: Splits, device: torch.device, out_dir: str | Path,
              on_run: Callable[[dict[str, Any]], None] | None = None) -> SeedRuns:
    """Train ``cfg`` once per seed into ``out_dir/seed<N>`` (plain run folders); ``on_run`` sees each summary."""
    summaries = []
    for seed in seeds:
        run_dir = Path(out_dir) / f"seed{seed}"
        fileio.make_dir(run_dir, "run folder")
        summary = fit(dataclasses.replace(cfg, seed=seed, out=str(run_dir)), splits, device, run_dir, Reporter())
        summaries.append(summary)
        if on_run is not None:
            on_run(summary)
    return SeedRuns(cfg, summaries)
