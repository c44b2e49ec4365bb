"""Level 2 of tuning, after the search: every trial's checkpoint calibrated post hoc (η per budget for each
(α, β) setting), the best per budget, the Pareto plot, and the winners saved with their η tables."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
import pyarrow.fs as pafs
from matplotlib.figure import Figure

import cfvit
from cfvit.calibration import Variant, eta_table_for, inference_settings, record_probs, variants_from_probs
from cfvit_common.storage import s3_filesystem
from jobs.calibrate.run import save_calibrated, validation_batches
from jobs.train.worker import EXPORT_DIR

from .plan import Plan, TrialOutcome
from .report import register_winner
from .settings import TuneSettings


def local_export(checkpoint_path: str, storage_path: str, dst: Path) -> Optional[Path]:
    """The cfvit export inside a Ray Train checkpoint, as a local directory."""
    if storage_path.startswith("s3://"):
        dst.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{checkpoint_path.rstrip('/')}/{EXPORT_DIR}", str(dst), source_filesystem=s3_filesystem())
        path = dst
    else:
        path = Path(checkpoint_path) / EXPORT_DIR
    return path if (path / "config.json").is_file() else None


def calibrate_trial(trial: TrialOutcome, budgets, settings: TuneSettings, data_uri: str,
                    limit: Optional[int]) -> list[Variant]:
    model = cfvit.load(trial.checkpoint)
    grid = inference_settings(model, settings.posthoc_alphas, settings.posthoc_betas)
    probs = record_probs(model, validation_batches(data_uri, model.data_config, model.num_classes,
                                                   class_names=model.cfvit_config.get("class_names"), limit=limit), grid)
    return variants_from_probs(model, probs, grid, source=f"trial {trial.trial_id}",
                               meta={"trial_id": trial.trial_id, "checkpoint": trial.checkpoint,
                                     "trained_alpha": float(model.alpha), "trained_beta": float(model.beta),
                                     **({"lr": trial.config["lr"]} if "lr" in trial.config else {})})


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (GFLOPs, accuracy) points: lowest cost for each accuracy, ascending."""
    front, best = [], -1.0
    for g, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((g, a))
            best = a
    return front


def pareto_plot(trials: list[TrialOutcome], results, backbone_gflops: float, path: Path, title: str) -> str:
    fig = Figure(figsize=(7, 4.8), dpi=110)  # the object API: no pyplot state, no display backend
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    pts = []
    i = 0
    for t in trials:
        for v in t.variants:
            c = v.curve
            style = "-" if v.alpha == v.meta.get("trained_alpha") and v.beta == v.meta.get("trained_beta") else ":"
            ax.plot(c.gflops, 100 * c.accuracy, style, color=cmap(i % 10), lw=1, alpha=0.75,
                    label=f"{v.source} α={v.alpha:.2f} β={v.beta:.3f}")
            pts.extend(zip(c.gflops.tolist(), c.accuracy.tolist()))
            i += 1
    if pts:
        front = np.array(pareto_front(pts))
        ax.step(front[:, 0], 100 * front[:, 1], where="post", color="black", lw=2, label="Pareto front")
    for r in results:
        ax.axvline(r.budget.gflops, color="grey", ls="--", lw=0.8)
        if r.feasible:
            ax.plot([r.gflops], [100 * r.accuracy], "*", color="crimson", ms=12)
            ax.annotate(f"{r.budget.spec}: η={r.eta:.3g}", (r.gflops, 100 * r.accuracy), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    ax.axvline(backbone_gflops, color="grey", ls="-.", lw=1, label="backbone")
    ax.set_xlabel("expected GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return str(path)


def alias_for(budget) -> str:
    return "budget-" + re.sub(r"[^\w\-]", "_", budget.spec.replace("%", "pct"))


def save_winners(results, champion: Variant, settings: TuneSettings, p: Plan, data_uri: str,
                 parent: Optional[str], client, reg_name: str) -> dict:
    """Each budget's winning (trial, α, β) saved with its η table (and registered when `client` is given):
    alias `champion` for the overall winner, `budget-…` for each budget it wins."""
    winners: dict[int, dict] = {}
    for r in results:
        if r.feasible:
            w = winners.setdefault(id(r.variant), {"variant": r.variant, "aliases": [], "budgets": []})
            w["aliases"].append(alias_for(r.budget))
            w["budgets"].append(r.budget.spec)
    winners.setdefault(id(champion), {"variant": champion, "aliases": [], "budgets": []})
    winners[id(champion)]["aliases"].insert(0, settings.alias)
    registered: dict[str, dict] = {}
    for w in winners.values():
        v = w["variant"]
        label = re.sub(r"[^\w\-.]", "_", f"{v.meta['trial_id']}_a{v.alpha:.3f}_b{v.beta:.4f}")
        info = {"tune": f"tune-{p.short.name}", "trial_id": v.meta["trial_id"], "alpha": v.alpha, "beta": v.beta,
                "data": data_uri, "images": v.n, "budgets": [b.spec for b in p.budgets],
                "wins": w["budgets"], "parent_run_id": parent}
        path = save_calibrated(cfvit.load(v.meta["checkpoint"]), p.out / "winners" / label, v,
                               eta_table_for(v, p.budgets), info)
        entry = {"path": str(path), "aliases": w["aliases"], "budgets": w["budgets"], "version": None}
        if client is not None:
            entry["version"] = register_winner(client, parent, reg_name, str(path), label, w["aliases"])
        registered[label] = entry
    return registered

