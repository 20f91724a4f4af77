"""How the quality benchmarks give every peer its best shot: each grid point is fitted on
the validation side and scored there; the best is refitted on all training data and
tested once."""

import time
from collections.abc import Callable
from typing import Any

from training.evaluate import EvalTask, Scorer, evaluate

Fit = Callable[[dict[str, Any]], Scorer]  # grid point -> a fitted model


def best_on_validation(
    name: str,
    grid: list[dict[str, Any]],
    fit_valid: Fit,
    fit_full: Fit,
    valid: EvalTask,
    test: EvalTask,
    metric: str,
) -> dict[str, Any]:
    """{"model", "params", "seconds" (of the final fit and test), test metrics...}."""
    best: tuple[float, dict[str, Any]] = (-1.0, {})
    for params in grid:
        score = evaluate(fit_valid(params), valid)[metric]
        print(f"  {name} {params}: valid {metric} {score:.4f}", flush=True)
        if score > best[0]:
            best = (score, params)
    started = time.perf_counter()
    metrics = evaluate(fit_full(best[1]), test)
    return {"model": name, "params": best[1], "seconds": time.perf_counter() - started, **metrics}
