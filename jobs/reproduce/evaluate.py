"""Evaluation of the reproduction's arms: predictions per stage, exact η points, the backbone match,
measured throughput and the selection ablation."""
from __future__ import annotations

import time
from typing import Optional

from .recipe import ETAS

def _batches(x, bs):
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def predict_backbone(model, x, bs: int = 256):
    import torch

    with torch.inference_mode():
        return torch.cat([model.vit(b) for b in _batches(x, bs)]).float()


def predict_stages(model, x, bs: int = 256):
    """Coarse and fine logits for every sample (fine with informative selection: η = 1, nobody exits)."""
    import torch

    cs, fs = [], []
    with torch.inference_mode():
        for b in _batches(x, bs):
            out = model(b, split_all=False)
            cs.append(out.coarse_logits.float())
            fs.append(out.fine_logits.float())
    return torch.cat(cs), torch.cat(fs)


def _top1(logits, y) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def eta_points(coarse, fine, y, stage_g: dict, etas=ETAS) -> list[dict]:
    """Accuracy, GFLOPs and exit counts at each η with the inference rule (exit iff max coarse prob >= η)."""
    from cfvit.model import exit_mask

    rows = []
    for eta in etas:
        ex = exit_mask(coarse, eta)
        logits = fine.clone()
        logits[ex] = coarse[ex]
        frac = float(ex.float().mean())
        rows.append({"eta": float(eta), "top1": _top1(logits, y), "exit_fraction": frac,
                     "coarse_exits": int(ex.sum()), "fine_exits": int((~ex).sum()),
                     "gflops": stage_g["coarse"] + (1 - frac) * stage_g["fine"]})
    return rows


def match_backbone(curve, backbone_top1: float, backbone_gflops: float) -> Optional[dict]:
    """The cheapest operating point (lowest η on the exact curve) whose top-1 >= the backbone's, or None."""
    import numpy as np

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
    import torch

    from cfvit.streaming import infer_stream

    batches = _batches(x, bs)
    n = len(x)

    def best(fn):
        fn(batches[:1])
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(batches)
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

    with torch.inference_mode():
        t_base = best(backbone)
        rows = [{"eta": float(e), "images_per_s": n / (t := best(cf(e))), "speedup": t_base / t} for e in etas]
    return {"backbone_images_per_s": n / t_base, "batch_size": bs, "images": n, "reps": reps, "rows": rows,
            "threads": torch.get_num_threads()}


def fine_top1_with(model, x, y, selection: str, seed: int) -> float:
    import torch

    old, model.selection = model.selection, selection
    model.generator = torch.Generator().manual_seed(seed) if selection == "random" else None
    try:
        return _top1(predict_stages(model, x)[1], y)
    finally:
        model.selection, model.generator = old, None


# ---------------------------------------------------------------------------------------------- figures
