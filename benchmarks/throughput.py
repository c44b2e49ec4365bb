"""Inference throughput: the backbone vs CF-ViT at several exit fractions (what `cfvit bench throughput` prints).

Measured as the paper does: a stream of many batches, images/s over the whole stream. η for an exit
fraction f is the (1 - f) quantile of the coarse confidence over the stream, so exactly that share exits.
The *ideal* ratio times the coarse and fine stages alone on full batches and adds them (no selection,
gather or exit bookkeeping): what early exit could reach with zero overhead.
"""
import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from cfvit.model import exit_mask
from cfvit.patch import full_attention_matrix
from cfvit.registry import create_model
from cfvit.streaming import infer_stream
from cfvit_common.machine import cpu_name

EXIT_FRACTIONS = (0.0, 0.25, 0.5, 0.76, 1.0)


@dataclass
class Row:
    name: str
    exit_fraction: float | None
    eta: float | None
    images_per_s: float
    gflops: float
    speedup: float = 1.0
    flops_ratio: float = 1.0
    ideal_speedup: float | None = None

    @property
    def of_ideal(self) -> float | None:
        return None if not self.ideal_speedup else self.speedup / self.ideal_speedup


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_stream(fn, batches, device, warmup: int = 2) -> float:
    """Seconds for fn over every batch (after `warmup` untimed calls on the first batch)."""
    for _ in range(warmup):
        fn(batches[0])
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    _sync(device)
    return time.perf_counter() - t0


def throughput(model_name: str = "cfvit_deit_small_patch16_224", batch_size: int = 64, n_batches: int = 10,
               distinct_batches: int = 4, device: str = "cpu", bf16: bool = False, compile: bool = False,
               exit_fractions=EXIT_FRACTIONS, seed: int = 0, **overrides) -> dict:
    """Returns {"rows": [Row...], "coarse_only": {...}, "settings": {...}}."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = create_model(model_name, **overrides).eval().to(dev)
    c, h, w = model.in_chans, model.img_size, model.img_size
    # A few distinct random batches, cycled: a stream of n_batches without n_batches of memory.
    pool = [torch.randn(batch_size, c, h, w, device=dev) for _ in range(distinct_batches)]
    stream = [pool[i % distinct_batches] for i in range(n_batches)]
    n_images = batch_size * n_batches
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    backbone = model.vit
    coarse, fine = model.coarse_stage, model.fine_stage
    if compile:
        backbone = torch.compile(backbone)
        coarse, fine = torch.compile(coarse), torch.compile(fine, dynamic=True)

    g = model.stage_gflops()
    base_g = model.backbone_gflops()
    rows = []
    with torch.inference_mode(), amp:
        t_backbone = _time_stream(backbone, stream, dev)
        rows.append(Row("backbone", None, None, n_images / t_backbone, base_g))

        # Stage timings alone, on full batches (for the ideal ratio), and the coarse confidences.
        t_coarse = _time_stream(coarse, stream, dev)
        states = [coarse(b) for b in pool]
        t_fine = _time_stream(lambda b: fine(b, states[_index(pool, b)]), stream, dev)
        with full_attention_matrix(True):
            t_coarse_naive = _time_stream(coarse, stream, dev)
        conf = torch.cat([s.logits.float().softmax(-1).amax(-1) for s in states])

        for f in exit_fractions:
            eta = eta_for_exit_fraction(conf, f)
            exits = float(torch.cat([exit_mask(s.logits, eta) for s in states]).float().mean())
            # The streaming path runs compiled stages too, when asked, via the model's methods.
            with _patched_stages(model, coarse, fine):
                t = _time_stream_pooled(model, stream, eta, dev)
            ideal = t_backbone / (t_coarse + (1 - exits) * t_fine)
            gf = g["coarse"] + (1 - exits) * g["fine"]
            rows.append(Row(f"cf-vit exit {exits:.2f}", exits, eta, n_images / t, gf, speedup=t_backbone / t,
                            flops_ratio=base_g / gf, ideal_speedup=ideal))
    return {
        "rows": rows,
        "stages": {"coarse_images_per_s": n_images / t_coarse, "coarse_naive_images_per_s": n_images / t_coarse_naive,
                   "fine_images_per_s": n_images / t_fine, "coarse_gflops": g["coarse"], "fine_gflops": g["fine"]},
        "settings": {"model": model_name, "batch_size": batch_size, "n_batches": n_batches, "device": str(dev),
                     "bf16": bf16, "compile": compile, "torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
                     "threads": torch.get_num_threads()},
    }


def _index(pool, b) -> int:
    return next(i for i, p in enumerate(pool) if p is b)


def _drain(it):
    for _ in it:
        pass


def _time_stream_pooled(model, stream, eta, dev) -> float:
    _drain(infer_stream(model, stream[:2], eta))  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    _drain(infer_stream(model, stream, eta))
    _sync(dev)
    return time.perf_counter() - t0


@contextlib.contextmanager
def _patched_stages(model, coarse, fine):
    """Route the model's stage methods through (possibly compiled) callables for the duration."""
    if coarse is model.coarse_stage and fine is model.fine_stage:
        yield
        return
    model.coarse_stage, model.fine_stage = coarse, fine
    try:
        yield
    finally:
        del model.coarse_stage, model.fine_stage


def eta_for_exit_fraction(conf, f: float) -> float:
    """η such that a share f of the coarse confidences `conf` (a tensor on any device, an array or a list)
    is >= η. f = 0: just above the largest (float32, as the exit rule compares)."""

    c = conf.detach().cpu().numpy() if hasattr(conf, "detach") else np.asarray(conf)
    srt = np.sort(c.ravel())[::-1]
    if f <= 0:
        return float(np.nextafter(np.float32(srt[0]), np.float32(np.inf)))
    if f >= 1:
        return 0.0
    return float(srt[max(0, int(round(f * len(srt))) - 1)])
