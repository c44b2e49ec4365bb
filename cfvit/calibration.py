"""Post-hoc calibration maths (no Ray, no I/O): for one trained CF-ViT and one validation pass, the exact
accuracy–GFLOPs curve of each (α, β) inference setting, and for each FLOPs budget the best (setting, η).

One pass with η > 1 (every image through both stages) records the coarse and fine class probabilities;
`cfvit.budget` gives every distinct η's exact accuracy and expected GFLOPs. α (share of patches re-split)
and β (EMA of the class attention) act only at inference, so other values are evaluated from the same
weights without retraining. `jobs.calibrate` wires this to checkpoints, data and MLflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .budget import Budget, BudgetError, BudgetSpecError, eta_curve, eta_for_budget, eta_table

ETA_ALL_FINE = 2.0  # > 1: no sample exits, both stages run on every image


def parse_floats(text: Optional[str], name: str, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> list[float]:
    """`"0.3,0.5"` → [0.3, 0.5], each in [lo, hi] (open at either end with lo_open / hi_open)."""
    if text is None or not str(text).strip():
        return []
    out = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            v = float(item)
        except ValueError:
            raise BudgetSpecError(f"{name}: {item!r} is not a number") from None
        if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise BudgetSpecError(f"{name}: {v} is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        out.append(v)
    return out


@dataclass
class Variant:
    """One (α, β) setting of one model and its exact accuracy–GFLOPs curve over η."""

    alpha: float
    beta: float
    curve: object  # cfvit.budget.EtaCurve
    stage_gflops: dict
    coarse_top1: float
    fine_top1: float
    n: int
    source: str = ""  # which model (trial id, checkpoint path)
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        base = f"α={self.alpha:g} β={self.beta:g}"
        return f"{self.source} {base}" if self.source else base

    @property
    def reachable(self) -> tuple[float, float]:
        return float(self.curve.gflops.min()), float(self.curve.gflops.max())


@dataclass
class BudgetResult:
    budget: Budget
    variant: Optional[Variant]  # None: infeasible
    eta: Optional[float] = None
    accuracy: Optional[float] = None
    gflops: Optional[float] = None
    exit_fraction: Optional[float] = None
    reachable: tuple[float, float] = (math.nan, math.nan)
    note: str = ""  # "" | "infeasible: reachable a–b GFLOPs" | "above every operating point …"
    message: str = ""  # the full sentence for logs

    @property
    def feasible(self) -> bool:
        return self.variant is not None

    def row(self) -> dict:
        """A row of the checkpoint's η table (the keys serving reads) plus where it came from."""
        return {"budget_gflops": self.budget.gflops, "eta": self.eta, "accuracy": self.accuracy,
                "gflops": self.gflops, "exit_fraction": self.exit_fraction}

    def summary(self) -> dict:
        d = {"budget": self.budget.spec, "budget_gflops": self.budget.gflops, "feasible": self.feasible,
             "reachable_gflops": list(self.reachable), "note": self.note, "message": self.message}
        if self.feasible:
            v = self.variant
            d.update(self.row(), alpha=v.alpha, beta=v.beta, source=v.source, **{f"meta_{k}": x for k, x in v.meta.items()})
        return d


def best_per_budget(variants: Sequence[Variant], budgets: Sequence[Budget]) -> list[BudgetResult]:
    """For each budget, the most accurate (variant, η) whose expected GFLOPs fit (ties: cheaper, then the
    earlier variant). A budget below every variant's cheapest point is infeasible, with the reachable range;
    one above every costliest point is feasible but says so."""
    if not variants:
        raise ValueError("no calibrated variants to choose from")
    lo = min(v.reachable[0] for v in variants)
    hi = max(v.reachable[1] for v in variants)
    out = []
    for b in budgets:
        best = None
        for v in variants:
            try:
                p = eta_for_budget(v.curve, b.gflops)
            except BudgetError:
                continue
            if best is None or (p.accuracy, -p.gflops) > (best[1].accuracy, -best[1].gflops):
                best = (v, p)
        what = f"budget {b.spec}" + (f" = {b.gflops:.3f} GFLOPs" if b.percent is not None else " GFLOPs")
        if best is None:
            out.append(BudgetResult(
                b, None, reachable=(lo, hi), note=f"infeasible: reachable {lo:.3f}–{hi:.3f} GFLOPs",
                message=f"{what} is below the cheapest operating point ({lo:.3f} GFLOPs, every image exiting after "
                        f"the coarse stage); reachable budgets are {lo:.3f}–{hi:.3f} GFLOPs"))
            continue
        v, p = best
        note = message = ""
        if b.gflops > hi + 1e-9:
            note = f"above every operating point (max {hi:.3f} GFLOPs)"
            message = (f"{what} is above every operating point (the costliest, every image through the fine stage, "
                       f"is {hi:.3f} GFLOPs): it does not constrain the choice; reachable {lo:.3f}–{hi:.3f} GFLOPs")
        out.append(BudgetResult(b, v, p.eta, p.accuracy, p.gflops, p.exit_fraction, (lo, hi), note, message))
    return out


def eta_table_for(variant: Variant, budgets: Sequence[Budget]) -> list[dict]:
    """The rows `cfvit.budget.eta_table` writes (feasible budgets of this variant only)."""
    return eta_table(variant.curve, [b.gflops for b in budgets])


@dataclass
class Probs:
    coarse: np.ndarray  # N×C float32
    fine: np.ndarray
    labels: np.ndarray


def record_probs(model, batches: Iterable[tuple[np.ndarray, np.ndarray]], settings: Sequence[tuple[float, float]],
                 device: str = "cpu") -> list[Probs]:
    """One pass over the data; for each (α, β) the coarse and fine softmax probabilities of every image.

    Softmax is taken in float32 of the float logits, exactly as `model.infer` compares against η."""
    saved = (model.alpha, model.beta)
    acc = [([], [], []) for _ in settings]
    try:
        with torch.no_grad():
            for x, y in batches:
                xt = torch.as_tensor(x).to(device)
                for (a, b), (cp, fp, ys) in zip(settings, acc):
                    model.alpha, model.beta = float(a), float(b)
                    out = model.infer(xt, ETA_ALL_FINE)
                    cp.append(out.coarse_logits.float().softmax(-1).cpu().numpy())
                    fp.append(out.logits.float().softmax(-1).cpu().numpy())
                    ys.append(np.asarray(y, dtype=np.int64))
    finally:
        model.alpha, model.beta = saved
    if not acc or not acc[0][0]:
        raise ValueError("the validation data yielded no images")
    return [Probs(np.concatenate(cp), np.concatenate(fp), np.concatenate(ys)) for cp, fp, ys in acc]


def stage_gflops_at(model, alpha: float) -> dict:
    saved = model.alpha
    try:
        model.alpha = float(alpha)
        return {k: float(v) for k, v in model.stage_gflops().items()}
    finally:
        model.alpha = saved


def variants_from_probs(model, probs: Sequence[Probs], settings: Sequence[tuple[float, float]], source: str = "",
                        meta: Optional[dict] = None) -> list[Variant]:
    out = []
    for (a, b), p in zip(settings, probs):
        g = stage_gflops_at(model, a)
        curve = eta_curve(p.coarse, p.fine, p.labels, coarse_gflops=g["coarse"], fine_gflops=g["fine"])
        out.append(Variant(float(a), float(b), curve, g, float((p.coarse.argmax(1) == p.labels).mean()),
                           float((p.fine.argmax(1) == p.labels).mean()), len(p.labels), source, dict(meta or {})))
    return out


def inference_settings(model, alphas: Sequence[float] = (), betas: Sequence[float] = ()) -> list[tuple[float, float]]:
    """The model's own (α, β) first, then every other combination asked for (no duplicates)."""
    own = (float(model.alpha), float(model.beta))
    grid = [(float(a), float(b)) for a in (alphas or [own[0]]) for b in (betas or [own[1]])]
    out = [own]
    for s in grid:
        if s not in out:
            out.append(s)
    return out


def pick_adopted(variants: Sequence[Variant], results: Sequence[BudgetResult]) -> Variant:
    """The variant that wins the most budgets (ties: higher mean accuracy over all budgets it can meet,
    then the earlier one, i.e. the model's own setting)."""
    wins = {id(v): 0 for v in variants}
    for r in results:
        if r.variant is not None:
            wins[id(r.variant)] += 1

    def mean_acc(v):
        accs = []
        for r in results:
            try:
                accs.append(eta_for_budget(v.curve, r.budget.gflops).accuracy)
            except BudgetError:
                accs.append(0.0)
        return float(np.mean(accs)) if accs else 0.0

    scored = [(wins[id(v)], mean_acc(v), -i) for i, v in enumerate(variants)]
    return variants[max(range(len(variants)), key=lambda i: scored[i])]
