"""`cfvit bench calibrate`: seconds to calibrate N samples (random probabilities) — the exact curve over
every η plus one η per budget. The validation pass that produces the probabilities is not included."""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from cfvit.budget import BudgetError, eta_curve, eta_for_budget


def bench(n: int = 50_000, classes: int = 1000, budgets: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
          repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to calibrate `n` samples (random probabilities): the exact curve over every η + one η per
    budget. The validation pass that produces the probabilities is not included."""


    rng = np.random.default_rng(seed)
    logits_c = rng.standard_normal((n, classes), dtype=np.float32) * 3
    logits_f = rng.standard_normal((n, classes), dtype=np.float32) * 3
    cp = np.exp(logits_c - logits_c.max(1, keepdims=True))
    cp /= cp.sum(1, keepdims=True)
    fp = np.exp(logits_f - logits_f.max(1, keepdims=True))
    fp /= fp.sum(1, keepdims=True)
    labels = rng.integers(0, classes, n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        curve = eta_curve(cp, fp, labels, coarse_gflops=1.9, fine_gflops=2.6)
        for b in budgets:
            try:
                eta_for_budget(curve, b)
            except BudgetError:
                pass
        times.append(time.perf_counter() - t0)
    return {"samples": n, "classes": classes, "budgets": len(budgets), "operating_points": len(curve),
            "seconds_best": min(times), "seconds_median": float(np.median(times)), "repeats": repeats}
