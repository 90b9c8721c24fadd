"""Adaptive search over the axes: Optuna's TPE or CMA-ES, asked for a batch at a time.

Bergstra et al., "Algorithms for Hyper-Parameter Optimization" (TPE, NeurIPS 2011),
https://papers.nips.cc/paper/4443; Hansen, "The CMA Evolution Strategy: A Tutorial",
https://arxiv.org/abs/1604.00772. Each round asks the sampler for ``batch_size`` points, merges
them as one batch (sources read once), evaluates them and tells the sampler their objective, so
a round costs about one merge of the batch. Range axes are floats; ``values`` axes are
categorical (by index, so gradients work as choices).
"""

from __future__ import annotations

import math
from typing import Any

from mergeserve.errors import ConfigError
from mergeserve.sweep.spec import SweepSpec


def objective_value(spec: SweepSpec, scores: dict[str, dict]) -> float:
    """The number adaptive search minimises: mean log token-perplexity, or one text's."""
    if not scores:
        raise ConfigError("search.objective: adaptive search needs eval.texts to score variants")
    if spec.search.objective == "mean":
        return sum(math.log(s["ppl_token"]) for s in scores.values()) / len(scores)
    return math.log(scores[spec.search.objective]["ppl_token"])


class AdaptiveSearch:
    """Ask/tell wrapper over an Optuna study (minimisation)."""

    def __init__(self, spec: SweepSpec):
        try:
            import optuna
        except ImportError:  # pragma: no cover - optuna is a dependency of the cpu and gpu extras
            raise ConfigError("search.kind: tpe/cmaes need the 'optuna' package (pip install optuna cmaes)") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s = spec.search
        if s.kind == "tpe":
            sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=min(8, max(2, (s.budget or 8) // 3)))
        else:
            sampler = optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False)
        self.spec = spec
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.asked = 0

    def ask(self, n: int) -> list[tuple[Any, list[Any]]]:
        """Up to ``n`` new points (trial, values in axis order) within the remaining budget."""
        n = min(n, (self.spec.search.budget or 0) - self.asked)
        out = []
        for _ in range(max(0, n)):
            trial = self.study.ask()
            vals = []
            for i, ax in enumerate(self.spec.axes):
                key = f"a{i}"
                if ax.values is not None:
                    vals.append(ax.values[trial.suggest_categorical(key, list(range(len(ax.values))))])
                else:
                    vals.append(trial.suggest_float(key, ax.low, ax.high))
            out.append((trial, vals))
        self.asked += len(out)
        return out

    def tell(self, trial: Any, value: float) -> None:
        self.study.tell(trial, value)

    @property
    def done(self) -> bool:
        return self.asked >= (self.spec.search.budget or 0)
