"""`cfvit reproduce`: train both arms (and the ablations), evaluate, write RESULTS.md + results.json +
figures, log everything to MLflow."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .evaluate import (_top1, eta_points, fine_top1_with, match_backbone, measure_throughput, predict_backbone,
                       predict_stages)
from .recipe import EXIT_ETAS, MODEL, PAPER, SELECTIONS, ReproConfig, _log, load_data, train_arm
from .report import fig_curve, fig_exits, fig_regions, render_markdown

def _tracking(uri: Optional[str]):
    from jobs.common import tracking

    return tracking, tracking.tracking_uri(uri)


def _flat_params(cfg: ReproConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def reproduce(cfg: ReproConfig, out_dir="docs", *, tracking_uri: Optional[str] = None, experiment: str = "cfvit-reproduce",
              command: Optional[str] = None, note: Optional[str] = None) -> dict:
    """Run everything; write RESULTS.md, results.json and figures/ under `out_dir`; return the results dict."""
    import torch

    import cfvit
    from cfvit.budget import eta_curve

    t_start = time.perf_counter()
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    load_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
    tracking, uri = _tracking(tracking_uri)
    parent = tracking.start_run(uri, experiment, "reproduce-quick" if cfg.quick else "reproduce", _flat_params(cfg),
                                tags={"command": command or ""})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    status = "FAILED"
    open_runs: list = []  # child runs not yet ended: closed as FAILED if anything below raises

    def close(rid):
        tracking.end_run(uri, rid)
        open_runs.remove(rid)

    try:
        probe = cfvit.create_model(MODEL, **cfg.model_kwargs())
        train_set, test_x, test_y = load_data(cfg, probe.data_config)
        _log(f"data: {len(train_set)} train, {len(test_y)} test; config {asdict(cfg)}")

        def arm(name, **kw):
            rid = tracking.start_run(uri, experiment, name, {**_flat_params(cfg), "arm": name, **kw},
                                     parent_run_id=parent)
            open_runs.append(rid)
            model, res = train_arm(name, cfg, train_set, log_epoch=lambda m, e: tracking.log_metrics(uri, rid, m, e), **kw)
            return model, res, rid

        bb_model, bb_res, bb_rid = arm("backbone", backbone_only=True)
        bb_logits = predict_backbone(bb_model, test_x)
        bb_top1 = _top1(bb_logits, test_y)
        bb_g = bb_model.backbone_gflops()
        tracking.log_metrics(uri, bb_rid, {"test_top1": bb_top1, "gflops": bb_g}, cfg.epochs)
        close(bb_rid)
        _log(f"backbone test top-1 {bb_top1:.4f}")

        cf_model, cf_res, cf_rid = arm("cfvit")
        coarse, fine = predict_stages(cf_model, test_x)
        g = cf_model.stage_gflops()
        curve = eta_curve(coarse.softmax(-1), fine.softmax(-1), test_y, coarse_gflops=g["coarse"], fine_gflops=g["fine"])
        table2 = eta_points(coarse, fine, test_y, g)
        exit_counts = eta_points(coarse, fine, test_y, g, etas=EXIT_ETAS)
        match = match_backbone(curve, bb_top1, bb_g)
        _log(f"CF-ViT: coarse {_top1(coarse, test_y):.4f}, fine {_top1(fine, test_y):.4f}; match {match}")

        # gca is the trained model's own selection: its fine logits are already at hand
        sel = {s_: _top1(fine, test_y) if s_ == "gca" else fine_top1_with(cf_model, test_x, test_y, s_, cfg.seed)
               for s_ in SELECTIONS}
        _log(f"selection ablation {sel}")

        nb = min(cfg.bench_images, len(test_x))
        thr = measure_throughput(cf_model, test_x[:nb], bs=cfg.bench_batch)
        _log(f"throughput {thr}")

        fig_curve(curve, bb_top1, bb_g, table2, out / "figures" / "accuracy_gflops.png")
        fig_exits(exit_counts, len(test_y), out / "figures" / "exit_counts.png")
        fig_regions(cf_model, test_x, test_y, cfg.n_regions, out / "figures" / "regions.png")

        ablations: dict = {"selection": sel}
        if cfg.full:
            ablations["reuse"], ablations["loss"] = {}, {}
            for key, kw in [("reuse", {"reuse": "linear"}), ("reuse", {"reuse": "none"}), ("loss", {"coarse_loss": "ce"})]:
                name = f"cfvit-{key}-{next(iter(kw.values()))}"
                m_, res_, rid_ = arm(name, **kw)
                c_, f_ = predict_stages(m_, test_x)
                entry = {"coarse_top1": _top1(c_, test_y), "fine_top1": _top1(f_, test_y), "train_seconds": res_.train_seconds}
                tracking.log_metrics(uri, rid_, {"test_coarse_top1": entry["coarse_top1"], "test_fine_top1": entry["fine_top1"]},
                                     cfg.epochs)
                close(rid_)
                ablations[key][next(iter(kw.values()))] = entry
                _log(f"{name}: {entry}")
            main_entry = {"coarse_top1": _top1(coarse, test_y), "fine_top1": _top1(fine, test_y),
                          "train_seconds": cf_res.train_seconds}
            ablations["reuse"] = {"mlp": main_entry, **ablations["reuse"]}
            ablations["loss"] = {"CE+KL": main_entry, "CE+CE": ablations["loss"].pop("ce")}

        tracking.log_metrics(uri, cf_rid, {"test_coarse_top1": _top1(coarse, test_y), "test_fine_top1": _top1(fine, test_y)},
                             cfg.epochs)
        tracking.log_curve(uri, cf_rid, curve, bb_g, "CF-ViT on Fashion-MNIST")
        close(cf_rid)

        results = {
            "command": command or "python -m jobs.reproduce",
            "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_seconds": time.perf_counter() - t_start,
            "note": note,
            "config": _flat_params(cfg),
            "settings": {"train_images": len(train_set), "test_images": len(test_y), "split_epochs": cfg.split_epochs,
                         "k_selected": cf_model.k_selected, "n_fine": cf_model.n_fine, "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                         "load_start": load_start, "load_end": " ".join(f"{v:.1f}" for v in os.getloadavg())},
            "backbone": {"top1": bb_top1, "gflops": bb_g},
            "cfvit": {"stage_gflops": g, "coarse_top1": _top1(coarse, test_y), "fine_top1": _top1(fine, test_y),
                      "best_top1": float(curve.accuracy.max())},
            "table2": table2,
            "match": match,
            "flops_fraction_at_backbone_accuracy": match["flops_fraction"] if match else None,
            "throughput": thr,
            "exit_counts": exit_counts,
            "ablations": ablations,
            "paper_targets": PAPER,
            "arms": {"backbone": asdict(bb_res), "cfvit": asdict(cf_res)},
            "mlflow": {"tracking_uri": uri, "experiment": experiment, "run_id": parent},
        }
        from benchmarks.throughput import cpu_name

        results["settings"]["cpu"] = cpu_name()
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "RESULTS.md").write_text(render_markdown(results))
        flat = {"backbone_top1": bb_top1, "backbone_gflops": bb_g, "wall_seconds": results["wall_seconds"],
                "cfvit_coarse_top1": results["cfvit"]["coarse_top1"], "cfvit_fine_top1": results["cfvit"]["fine_top1"],
                **{f"top1_eta_{p['eta']:g}": p["top1"] for p in table2},
                **{f"gflops_eta_{p['eta']:g}": p["gflops"] for p in table2},
                **{f"speedup_eta_{p['eta']:g}": p["speedup"] for p in thr["rows"]},
                **{f"selection_{k}_top1": v for k, v in sel.items()}}
        if match:
            flat.update(flops_fraction_at_backbone_accuracy=match["flops_fraction"], eta_at_backbone_accuracy=match["eta"])
        tracking.log_metrics(uri, parent, flat, cfg.epochs)
        client.log_artifact(parent, str(out / "results.json"))
        client.log_artifact(parent, str(out / "RESULTS.md"))
        client.log_artifacts(parent, str(out / "figures"), "figures")
        status = "FINISHED"
        _log(f"done in {results['wall_seconds'] / 60:.1f} min → {out / 'RESULTS.md'}")
        return results
    finally:
        for rid in open_runs:
            tracking.end_run(uri, rid, "FAILED")
        tracking.end_run(uri, parent, status)
