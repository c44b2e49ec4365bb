"""Exact accuracy and expected GFLOPs for every distinct η, and the best η within a FLOPs budget.

A sample exits at the coarse stage when its top coarse probability is >= η. Only the distinct
confidences matter: sorting them once gives every operating point with two cumulative sums.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np


class BudgetError(ValueError):
    """No operating point fits the budget; `reachable` is the (min, max) GFLOPs the curve covers."""

    def __init__(self, message: str, reachable: tuple[float, float]):
        super().__init__(message)
        self.reachable = reachable


@dataclass
class EtaCurve:
    eta: np.ndarray  # ascending thresholds (float32 values, as compared at inference)
    accuracy: np.ndarray
    gflops: np.ndarray
    exit_fraction: np.ndarray
    coarse_gflops: float
    fine_gflops: float
    # Among the images that exit at each η, the share whose coarse answer equals the fine stage's (NaN where
    # none exit): what serving's drift monitor compares its shadowed images with.
    agreement: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.eta)

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


@dataclass
class EtaPoint:
    eta: float
    accuracy: float
    gflops: float
    exit_fraction: float


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def eta_curve(coarse_probs, fine_probs, labels, *, coarse_gflops: float, fine_gflops: float) -> EtaCurve:
    """All operating points of the early exit on a validation set (N × C probabilities, N labels)."""
    cp, fp, y = _np(coarse_probs), _np(fine_probs), _np(labels).astype(np.int64)
    if cp.ndim != 2 or fp.shape != cp.shape or y.shape != (cp.shape[0],) or cp.shape[0] == 0:
        raise ValueError(f"expected N x C coarse/fine probabilities and N labels, got {cp.shape}, {fp.shape}, {y.shape}")
    n = cp.shape[0]
    conf = cp.max(axis=1).astype(np.float32)
    coarse_ok = cp.argmax(axis=1) == y
    fine_ok = fp.argmax(axis=1) == y

    order = np.argsort(-conf, kind="stable")  # most confident first: they exit first as η falls
    conf_sorted = conf[order]
    coarse_cum = np.concatenate([[0], np.cumsum(coarse_ok[order])])
    fine_cum = np.concatenate([[0], np.cumsum(fine_ok[order])])
    agree_cum = np.concatenate([[0], np.cumsum((cp.argmax(axis=1) == fp.argmax(axis=1))[order])])
    # η = a distinct confidence c lets out every sample with conf >= c: the end of its tie group.
    last_of_group = np.flatnonzero(np.append(conf_sorted[1:] != conf_sorted[:-1], True))
    exits = np.concatenate([[0], last_of_group + 1])  # plus "nobody exits"
    top = np.nextafter(conf_sorted[0], np.float32(np.inf))
    etas = np.concatenate([[top], conf_sorted[last_of_group]]).astype(np.float32)
    correct = coarse_cum[exits] + (fine_cum[-1] - fine_cum[exits])
    frac = exits / n
    gflops = coarse_gflops + (1.0 - frac) * fine_gflops
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.where(exits > 0, agree_cum[exits] / np.maximum(exits, 1), np.nan)
    rev = slice(None, None, -1)  # ascending η
    return EtaCurve(eta=etas[rev], accuracy=(correct / n)[rev], gflops=gflops[rev], exit_fraction=frac[rev],
                    coarse_gflops=float(coarse_gflops), fine_gflops=float(fine_gflops), agreement=agreement[rev])


# η values at which a checkpoint records the calibrated exit rate and coarse–fine agreement (serving's drift
# monitor reads the nearest one at or below its current η).
PROFILE_ETAS = tuple(round(0.05 * i, 2) for i in range(20)) + (0.97, 0.99, 1.0)


def agreement_profile(curve: EtaCurve, etas: Sequence[float] = PROFILE_ETAS) -> list[dict]:
    """[{eta, exit_fraction, agreement}] at each η: the calibrated exit rate and, among the images exiting
    there, the share whose coarse answer equals the fine one (None where none exit)."""
    if curve.agreement is None:
        return []
    rows = []
    for eta in etas:
        i = int(np.searchsorted(curve.eta, np.float32(eta), side="left"))  # the point that lets out conf >= η
        if i >= len(curve.eta):  # above every confidence: nobody exits
            rows.append({"eta": float(eta), "exit_fraction": 0.0, "agreement": None})
            continue
        agree = float(curve.agreement[i])
        rows.append({"eta": float(eta), "exit_fraction": float(curve.exit_fraction[i]),
                     "agreement": agree if np.isfinite(agree) else None})
    return rows


def eta_for_budget(curve: EtaCurve, gflops: float) -> EtaPoint:
    """The most accurate point with expected GFLOPs <= budget (ties: the cheaper one)."""
    lo, hi = float(curve.gflops.min()), float(curve.gflops.max())
    fits = np.flatnonzero(curve.gflops <= gflops + 1e-9)
    if fits.size == 0:
        raise BudgetError(
            f"budget {gflops:.3f} GFLOPs is below the cheapest operating point: every image exiting at the coarse "
            f"stage costs {lo:.3f} GFLOPs; reachable budgets are {lo:.3f}–{hi:.3f} GFLOPs",
            (lo, hi),
        )
    acc = curve.accuracy[fits]
    best = fits[acc == acc.max()]
    i = best[np.argmin(curve.gflops[best])]
    return EtaPoint(eta=float(curve.eta[i]), accuracy=float(curve.accuracy[i]), gflops=float(curve.gflops[i]),
                    exit_fraction=float(curve.exit_fraction[i]))


def eta_table(curve: EtaCurve, budgets) -> list[dict]:
    """One row per feasible budget: {budget_gflops, eta, accuracy, gflops, exit_fraction} (for checkpoints)."""
    rows = []
    for b in budgets:
        try:
            rows.append({"budget_gflops": float(b), **asdict(eta_for_budget(curve, float(b)))})
        except BudgetError:
            continue
    return rows


# ---------------------------------------------------------------------------------------------- budgets
class BudgetSpecError(ValueError):
    """A budget string that cannot be read."""


@dataclass(frozen=True)
class Budget:
    spec: str  # as the user wrote it ("2.0", "40%")
    gflops: float
    percent: Optional[float] = None  # of the backbone, for "%" budgets

    @property
    def label(self) -> str:
        return f"{self.spec} ({self.gflops:.3f} GFLOPs)" if self.percent is not None else f"{self.gflops:g} GFLOPs"


def parse_budgets(text: str | Sequence[str], backbone_gflops: Optional[float] = None) -> list[Budget]:
    """`"1.5,2.0"` (GFLOPs per image) or `"40%,50%"` (of the backbone's GFLOPs); a list of items works too."""
    items = [s for part in ([text] if isinstance(text, str) else list(text)) for s in str(part).split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise BudgetSpecError("no budgets given: expected e.g. 1.5,2.0 (GFLOPs per image) or 40%,50% (of the backbone)")
    out = []
    for item in items:
        is_pct = item.endswith("%")
        raw = item[:-1].strip() if is_pct else item
        low = raw.lower()
        for suffix in ("gflops", "g"):  # "2.0GFLOPs" / "2g" are fine
            if not is_pct and low.endswith(suffix):
                raw = raw[: -len(suffix)].strip()
                break
        try:
            value = float(raw)
        except ValueError:
            raise BudgetSpecError(f"budget {item!r} is not a number of GFLOPs (e.g. 2.0) or a percentage of the "
                                  f"backbone (e.g. 50%)") from None
        if not math.isfinite(value) or value <= 0:
            raise BudgetSpecError(f"budget {item!r} must be a positive, finite number")
        if is_pct:
            if backbone_gflops is None:
                raise BudgetSpecError(f"budget {item!r} is relative to the backbone, whose GFLOPs are unknown here")
            out.append(Budget(item, value / 100.0 * float(backbone_gflops), value))
        else:
            out.append(Budget(item, value))
    return out


def point_at(coarse_probs, fine_probs, labels, eta: float, *, coarse_gflops: float, fine_gflops: float) -> EtaPoint:
    """Accuracy and expected GFLOPs at one η, by the inference rule itself: an image exits after the
    coarse stage when its top coarse probability (float32) is >= η."""
    cp, fp, y = _np(coarse_probs), _np(fine_probs), _np(labels).astype(np.int64)
    exits = cp.max(axis=1).astype(np.float32) >= np.float32(eta)
    pred = np.where(exits, cp.argmax(axis=1), fp.argmax(axis=1))
    frac = float(exits.mean()) if len(y) else 0.0
    return EtaPoint(eta=float(eta), accuracy=float((pred == y).mean()) if len(y) else float("nan"),
                    gflops=float(coarse_gflops + (1.0 - frac) * fine_gflops), exit_fraction=frac)


def gflops_at(curve: EtaCurve, eta: float) -> float:
    """Expected GFLOPs per image at threshold `eta`: the images with coarse confidence >= η exit, which is
    the operating point of the smallest calibrated η at or above it (all through the fine stage above them)."""
    at_or_above = np.flatnonzero(curve.eta >= np.float32(eta))
    return float(curve.gflops[at_or_above[0]]) if at_or_above.size else float(curve.coarse_gflops + curve.fine_gflops)


def ladder_budgets(curve: EtaCurve, below_eta: float, steps: int = 4) -> list[Budget]:
    """`steps` FLOPs budgets evenly spaced from the coarse stage's cost (every image exits) up to, not
    including, the cost at `below_eta`: table points below a server's default η, for SLO mode to step
    down through under load (serve/slo.py). None when the default already costs no more than the coarse
    stage (nothing to step down to)."""
    if steps < 1:
        raise ValueError(f"an SLO ladder needs at least one step, got {steps}")
    lo, top = float(curve.gflops.min()), gflops_at(curve, below_eta)
    if top <= lo + 1e-9:
        return []
    out = []
    for k in range(steps):
        g = lo + (top - lo) * k / steps
        out.append(Budget(f"{g:.6g}", g))
    return out
