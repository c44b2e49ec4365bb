"""95 % confidence intervals for the reproduction's accuracies (scipy.stats).

- one accuracy on n test images: the Wilson score interval of a binomial proportion;
- the difference of two arms evaluated on the *same* test images (CF-ViT at η vs the backbone, gca vs last,
  …): a paired percentile bootstrap over test images, so the images both get right or both get wrong do not
  widen it. An ordering claim "a > b" holds at 95 % when the interval of a − b lies above 0.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, bootstrap

LEVEL = 0.95


def wilson_interval(correct) -> tuple[float, float]:
    """95 % interval of the accuracy behind a vector of per-image correctness (bools)."""
    c = np.asarray(correct, dtype=bool)
    ci = binomtest(int(c.sum()), len(c)).proportion_ci(LEVEL, method="wilson")
    return float(ci.low), float(ci.high)


def paired_difference(a, b, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy of a minus accuracy of b on the same images, with its paired bootstrap 95 % interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired_difference needs two equal 1-D vectors of >= 2 images, got {a.shape} and {b.shape}")
    diff = float(a.mean() - b.mean())
    if np.array_equal(a, b):  # no image differs: every resample gives 0 (scipy refuses a degenerate sample)
        return {"diff": diff, "low": 0.0, "high": 0.0, "differing_images": 0}
    res = bootstrap((a - b,), np.mean, n_resamples=n_resamples, confidence_level=LEVEL, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True, axis=-1, batch=200)
    ci = res.confidence_interval
    return {"diff": diff, "low": float(ci.low), "high": float(ci.high), "differing_images": int((a != b).sum())}


def verdict(d: dict) -> str:
    """'>' when the interval of a − b lies above 0, '<' below it, '≈' when it contains 0."""
    return ">" if d["low"] > 0 else "<" if d["high"] < 0 else "≈"
