"""`cfvit reproduce`: train both arms (and the ablations), evaluate, write RESULTS.md + results.json +
figures, log everything to MLflow."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from mlflow.tracking import MlflowClient

import cfvit
from cfvit.budget import eta_curve
from cfvit_common import tracking
from cfvit_common.machine import cpu_name

from .evaluate import (
    _top1,
    answers_at,
    correct,
    eta_points,
    fine_logits_with,
    match_backbone,
    measure_throughput,
    predict_backbone,
    predict_stages,
)
from .recipe import EXIT_ETAS, PAPER, SELECTIONS, ReproConfig, _log, load_data, train_arm
from .report import fig_curve, fig_exits, fig_regions, render_markdown
from .stats import paired_difference, verdict, wilson_interval

PLATEAU_GAIN = 0.005  # an arm has plateaued when its last epoch adds < 0.5 points of test top-1

def _tracking(uri: Optional[str]):
    return tracking, tracking.tracking_uri(uri)


def _flat_params(cfg: ReproConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


@dataclass
class _Run:
    """The MLflow side of one reproduction: the parent run and a child run per trained arm."""
    cfg: ReproConfig
    tracking: object
    uri: str
    experiment: str
    parent: str

    def child(self, name: str, **kw):
        return self.tracking.run(self.uri, self.experiment, name, {**_flat_params(self.cfg), "arm": name, **kw},
                                 parent_run_id=self.parent)

    def train(self, name: str, rid: str, train_set, test_x, test_y, **kw):
        def evaluate(model):  # test top-1 after every epoch (the fine stage with informative selection, η = 1)
            if kw.get("backbone_only"):
                return {"test_top1": _top1(predict_backbone(model, test_x), test_y)}
            c, f = predict_stages(model, test_x)
            return {"test_coarse_top1": _top1(c, test_y), "test_top1": _top1(f, test_y)}

        return train_arm(name, self.cfg, train_set, evaluate=evaluate,
                         log_epoch=lambda m, e: self.tracking.log_metrics(self.uri, rid, m, e), **kw)


def reproduce(cfg: ReproConfig, out_dir="docs", *, tracking_uri: Optional[str] = None, experiment: str = "cfvit-reproduce",
              command: Optional[str] = None, note: Optional[str] = None) -> dict:
    """Run everything; write RESULTS.md, results.json and figures/ under `out_dir`; return the results dict."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    load_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
    tracking, uri = _tracking(tracking_uri)
    name = "reproduce-quick" if cfg.quick else "reproduce"
    with tracking.run(uri, experiment, name, _flat_params(cfg), tags={"command": command or ""}) as parent:
        run = _Run(cfg, tracking, uri, experiment, parent)
        probe = cfvit.create_model(cfg.model, **cfg.model_kwargs())
        train_set, test_x, test_y = load_data(cfg, probe.data_config)
        _log(f"data: {len(train_set.labels)} train, {len(test_y)} test; config {asdict(cfg)}")
        bb = _backbone_arm(run, train_set, test_x, test_y)
        with run.child("cfvit") as cf_rid:
            cf_model, cf_res = run.train("cfvit", cf_rid, train_set, test_x, test_y)
            cf = _evaluate_cfvit(cfg, cf_model, test_x, test_y, bb, out)
            ablations: dict = {"selection": cf["selection"]}
            if cfg.full:
                main = {"coarse_top1": cf["coarse_top1"], "fine_top1": cf["fine_top1"],
                        "train_seconds": cf_res.train_seconds}
                ablations.update(_retrained_ablations(run, train_set, test_x, test_y, main))
            tracking.log_metrics(uri, cf_rid, {"test_coarse_top1": cf["coarse_top1"],
                                               "test_fine_top1": cf["fine_top1"]}, cfg.epochs)
            tracking.log_curve(uri, cf_rid, cf["curve"], bb["gflops"], "CF-ViT on Fashion-MNIST")
        results = _results(cfg, command, note, t_start, load_start, train_set, test_y, cf_model, bb, cf, ablations,
                           {"backbone": asdict(bb["res"]), "cfvit": asdict(cf_res)},
                           {"tracking_uri": uri, "experiment": experiment, "run_id": parent})
        _write_outputs(run, results, out)
    _log(f"done in {results['wall_seconds'] / 60:.1f} min → {out / 'RESULTS.md'}")
    return results


def _backbone_arm(run: _Run, train_set, test_x, test_y) -> dict:
    with run.child("backbone", backbone_only=True) as rid:
        model, res = run.train("backbone", rid, train_set, test_x, test_y, backbone_only=True)
        logits = predict_backbone(model, test_x)
        top1, g = _top1(logits, test_y), model.backbone_gflops()
        run.tracking.log_metrics(run.uri, rid, {"test_top1": top1, "gflops": g}, run.cfg.epochs)
    _log(f"backbone test top-1 {top1:.4f}")
    return {"top1": top1, "gflops": g, "res": res, "correct": correct(logits, test_y)}


def _evaluate_cfvit(cfg: ReproConfig, model, test_x, test_y, bb: dict, out: Path) -> dict:
    """Table 2, Fig. 8 exit counts, the backbone match, the selection ablation, throughput and figures."""
    coarse, fine = predict_stages(model, test_x)
    g = model.stage_gflops()
    curve = eta_curve(coarse.softmax(-1), fine.softmax(-1), test_y, coarse_gflops=g["coarse"], fine_gflops=g["fine"])
    table2 = eta_points(coarse, fine, test_y, g)
    exit_counts = eta_points(coarse, fine, test_y, g, etas=EXIT_ETAS)
    match = match_backbone(curve, bb["top1"], bb["gflops"])
    near = {f"{pts:g}": match_backbone(curve, bb["top1"] - pts / 100, bb["gflops"]) for pts in (0.5, 1.0)}
    c1, f1 = _top1(coarse, test_y), _top1(fine, test_y)
    _log(f"CF-ViT: coarse {c1:.4f}, fine {f1:.4f}; match {match}")
    # gca is the trained model's own selection: its fine logits are already at hand
    sel_logits = {s_: fine if s_ == "gca" else fine_logits_with(model, test_x, s_, cfg.seed) for s_ in SELECTIONS}
    sel = {k: _top1(v, test_y) for k, v in sel_logits.items()}
    _log(f"selection ablation {sel}")
    intervals = confidence_intervals(coarse, fine, sel_logits, test_y, bb["correct"], table2, cfg.seed)
    thr = measure_throughput(model, test_x[:min(cfg.bench_images, len(test_x))], bs=cfg.bench_batch)
    _log(f"throughput {thr}")
    fig_curve(curve, bb["top1"], bb["gflops"], table2, out / "figures" / "accuracy_gflops.png")
    fig_exits(exit_counts, len(test_y), out / "figures" / "exit_counts.png")
    fig_regions(model, test_x, test_y, cfg.n_regions, out / "figures" / "regions.png")
    return {"curve": curve, "stage_gflops": g, "table2": table2, "exit_counts": exit_counts, "match": match,
            "near_backbone": near, "coarse_top1": c1, "fine_top1": f1, "selection": sel, "throughput": thr,
            "intervals": intervals}


def confidence_intervals(coarse, fine, sel_logits: dict, y, backbone_correct, table2: list, seed: int) -> dict:
    """95 % intervals: Wilson for every accuracy; paired bootstrap for CF-ViT at each η minus the backbone and
    for each adjacent pair of the paper's selection order (gca > last > random > negative)."""
    acc = {"backbone": wilson_interval(backbone_correct)}
    vs_backbone = {}
    for p in table2:
        c = correct(answers_at(coarse, fine, p["eta"])[0], y)
        acc[f"eta_{p['eta']:g}"] = wilson_interval(c)
        vs_backbone[f"{p['eta']:g}"] = paired_difference(c, backbone_correct, seed=seed)
    sel_correct = {k: correct(v, y) for k, v in sel_logits.items()}
    acc.update({f"selection_{k}": wilson_interval(v) for k, v in sel_correct.items()})
    order = {}
    for a, b in zip(SELECTIONS, SELECTIONS[1:]):
        d = paired_difference(sel_correct[a], sel_correct[b], seed=seed)
        order[f"{a}-{b}"] = {**d, "verdict": verdict(d)}
    for d in vs_backbone.values():
        d["verdict"] = verdict(d)
    return {"level": 0.95, "accuracy": acc, "cfvit_minus_backbone": vs_backbone, "selection_order": order}


def plateau(history: list) -> dict:
    """Test top-1 gained by the last epoch (and the last 3): an arm has plateaued when the last epoch adds
    < PLATEAU_GAIN."""
    t = [h["test_top1"] for h in history if "test_top1" in h]
    if len(t) < 2:
        return {"last_gain": None, "last3_gain": None, "reached": False}
    gain = t[-1] - t[-2]
    return {"last_gain": gain, "last3_gain": t[-1] - t[max(0, len(t) - 4)], "best": max(t),
            "reached": bool(gain < PLATEAU_GAIN)}


def _retrained_ablations(run: _Run, train_set, test_x, test_y, main: dict) -> dict:
    """`--full`: Table 5 (feature reuse mlp / linear / none) and the loss (CE+KL vs CE+CE), each retrained."""
    reuse, loss = {"mlp": main}, {"CE+KL": main}
    for key, kw in [("reuse", {"reuse": "linear"}), ("reuse", {"reuse": "none"}), ("loss", {"coarse_loss": "ce"})]:
        value = next(iter(kw.values()))
        name = f"cfvit-{key}-{value}"
        with run.child(name, **kw) as rid:
            model, res = run.train(name, rid, train_set, test_x, test_y, **kw)
            c_, f_ = predict_stages(model, test_x)
            entry = {"coarse_top1": _top1(c_, test_y), "fine_top1": _top1(f_, test_y), "train_seconds": res.train_seconds}
            run.tracking.log_metrics(run.uri, rid, {"test_coarse_top1": entry["coarse_top1"],
                                                    "test_fine_top1": entry["fine_top1"]}, run.cfg.epochs)
        (reuse if key == "reuse" else loss)["CE+CE" if key == "loss" else value] = entry
        _log(f"{name}: {entry}")
    return {"reuse": reuse, "loss": loss}


def _results(cfg, command, note, t_start, load_start, train_set, test_y, model, bb, cf, ablations, arms, mlflow) -> dict:
    match = cf["match"]
    return {
        "command": command or "python -m jobs.reproduce",
        "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.perf_counter() - t_start,
        "note": note,
        "config": _flat_params(cfg),
        "settings": {"train_images": len(train_set.labels), "test_images": len(test_y), "split_epochs": cfg.split_epochs,
                     "k_selected": model.k_selected, "n_fine": model.n_fine, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "cpu": cpu_name(), "device": _device_name(cfg.device),
                     "load_start": load_start, "load_end": " ".join(f"{v:.1f}" for v in os.getloadavg())},
        "backbone": {"top1": bb["top1"], "gflops": bb["gflops"]},
        "cfvit": {"stage_gflops": cf["stage_gflops"], "coarse_top1": cf["coarse_top1"], "fine_top1": cf["fine_top1"],
                  "best_top1": float(cf["curve"].accuracy.max())},
        "table2": cf["table2"],
        "match": match,
        "flops_fraction_at_backbone_accuracy": match["flops_fraction"] if match else None,
        "near_backbone": cf["near_backbone"],
        "confidence_intervals": cf["intervals"],
        "plateau": {k: plateau(v["history"]) for k, v in arms.items()},
        "throughput": cf["throughput"],
        "exit_counts": cf["exit_counts"],
        "ablations": ablations,
        "paper_targets": PAPER,
        "arms": arms,
        "mlflow": mlflow,
    }


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _write_outputs(run: _Run, results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(render_markdown(results))
    table2, thr, match = results["table2"], results["throughput"], results["match"]
    flat = {"backbone_top1": results["backbone"]["top1"], "backbone_gflops": results["backbone"]["gflops"],
            "wall_seconds": results["wall_seconds"],
            "cfvit_coarse_top1": results["cfvit"]["coarse_top1"], "cfvit_fine_top1": results["cfvit"]["fine_top1"],
            **{f"top1_eta_{p['eta']:g}": p["top1"] for p in table2},
            **{f"gflops_eta_{p['eta']:g}": p["gflops"] for p in table2},
            **{f"speedup_eta_{p['eta']:g}": p["speedup"] for p in thr["rows"]},
            **{f"selection_{k}_top1": v for k, v in results["ablations"]["selection"].items()}}
    if match:
        flat.update(flops_fraction_at_backbone_accuracy=match["flops_fraction"], eta_at_backbone_accuracy=match["eta"])
    run.tracking.log_metrics(run.uri, run.parent, flat, run.cfg.epochs)
    client = MlflowClient(tracking_uri=run.uri)
    client.log_artifact(run.parent, str(out / "results.json"))
    client.log_artifact(run.parent, str(out / "RESULTS.md"))
    client.log_artifacts(run.parent, str(out / "figures"), "figures")
