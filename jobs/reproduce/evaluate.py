"""Evaluation of the reproduction's arms: predictions per stage, exact η points, the backbone match,
measured throughput and the selection ablation."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from cfvit.model import exit_mask
from cfvit.streaming import infer_stream

from .recipe import ETAS, autocast


def _device(model):
    return next(model.parameters()).device


def _batches(x, bs, device="cpu"):
    return [x[i:i + bs].to(device, non_blocking=True) for i in range(0, len(x), bs)]


def predict_backbone(model, x, bs: int = 256):
    """Backbone logits (float32, on the CPU) for every sample, batches on the model's device."""
    dev = _device(model)
    with torch.inference_mode(), autocast(dev.type):
        return torch.cat([model.vit(b).float().cpu() for b in _batches(x, bs, dev)])


def predict_stages(model, x, bs: int = 256):
    """Coarse and fine logits for every sample (fine with informative selection: η = 1, nobody exits)."""
    dev = _device(model)
    cs, fs = [], []
    with torch.inference_mode(), autocast(dev.type):
        for b in _batches(x, bs, dev):
            out = model(b, split_all=False)
            cs.append(out.coarse_logits.float().cpu())
            fs.append(out.fine_logits.float().cpu())
    return torch.cat(cs), torch.cat(fs)


def correct(logits, y):
    """Per-image correctness (bool numpy array): what the confidence intervals resample."""
    return (logits.argmax(-1) == y).numpy()


def _top1(logits, y) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def eta_points(coarse, fine, y, stage_g: dict, etas=ETAS) -> list[dict]:
    """Accuracy, GFLOPs and exit counts at each η with the inference rule (exit iff max coarse prob >= η)."""
    rows = []
    for eta in etas:
        logits, ex = answers_at(coarse, fine, eta)
        frac = float(ex.float().mean())
        rows.append({"eta": float(eta), "top1": _top1(logits, y), "exit_fraction": frac,
                     "coarse_exits": int(ex.sum()), "fine_exits": int((~ex).sum()),
                     "gflops": stage_g["coarse"] + (1 - frac) * stage_g["fine"]})
    return rows


def answers_at(coarse, fine, eta: float):
    """The logits CF-ViT answers with at η (coarse where it exits, fine elsewhere) and the exit mask."""
    ex = exit_mask(coarse, eta)
    logits = fine.clone()
    logits[ex] = coarse[ex]
    return logits, ex


def match_backbone(curve, backbone_top1: float, backbone_gflops: float) -> Optional[dict]:
    """The cheapest operating point (lowest η on the exact curve) whose top-1 >= the backbone's, or None."""
    ok = np.flatnonzero(curve.accuracy >= backbone_top1 - 1e-12)
    if ok.size == 0:
        return None
    i = int(ok[np.argmin(curve.gflops[ok])])
    g = float(curve.gflops[i])
    return {"eta": float(curve.eta[i]), "top1": float(curve.accuracy[i]), "gflops": g,
            "exit_fraction": float(curve.exit_fraction[i]), "flops_fraction": g / backbone_gflops,
            "flops_saved": 1 - g / backbone_gflops}


def measure_throughput(model, x, etas=ETAS, bs: int = 256, reps: int = 2) -> dict:
    """Images/s of the backbone and of CF-ViT's streaming early exit at each η on the same test batches
    (best of `reps` passes, each after a warm-up batch; on a shared machine the minimum time is the least noisy)."""


    dev = _device(model)
    batches = _batches(x, bs, dev)
    n = len(x)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def best(fn):
        fn(batches[:1])
        ts = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn(batches)
            sync()
            ts.append(time.perf_counter() - t)
        return min(ts)

    def backbone(bs_):
        for b in bs_:
            model.vit(b)

    def cf(eta):
        def run(bs_):
            for _ in infer_stream(model, bs_, eta):
                pass
        return run

    with torch.inference_mode(), autocast(dev.type):
        t_base = best(backbone)
        rows = [{"eta": float(e), "images_per_s": n / (t := best(cf(e))), "speedup": t_base / t} for e in etas]
    return {"backbone_images_per_s": n / t_base, "batch_size": bs, "images": n, "reps": reps, "rows": rows,
            "threads": torch.get_num_threads(), "device": str(dev)}


def fine_logits_with(model, x, selection: str, seed: int):
    """Fine logits of every sample with another patch selection (Table 4), the trained weights unchanged."""
    old, model.selection = model.selection, selection
    # random selection draws its noise on the CPU (cfvit.coarse_to_fine), so a CPU generator on any device
    model.generator = torch.Generator().manual_seed(seed) if selection == "random" else None
    try:
        return predict_stages(model, x)[1]
    finally:
        model.selection, model.generator = old, None


# ---------------------------------------------------------------------------------------------- figures
