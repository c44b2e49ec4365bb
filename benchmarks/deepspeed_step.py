"""Training step time and peak memory: CF-ViT (both stages, CE+KL) vs the backbone alone, under DeepSpeed.

One process, world size 1 (what a single GPU of the training job runs), ZeRO stage 0/1/2, bf16 on CUDA.
Prints a table; `--json` writes the figures. Run on a GPU:

    python benchmarks/deepspeed_step.py --model cfvit_deit_small_patch16_224 --batch-size 256 --zero 0 1 2
"""
import argparse
import json
import os
import time

import deepspeed
import torch

import cfvit
from jobs.train.deepspeed import deepspeed_config


def ds_config(zero: int, batch: int, bf16: bool) -> dict:
    conf = deepspeed_config(None, True, micro_batch_size=batch, zero_stage=zero, precision="bf16" if bf16 else "fp32")
    return {**conf, "gradient_clipping": 5.0}


def run(kind: str, model_name: str, zero: int, batch: int, steps: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    model = cfvit.create_model(model_name, drop_path_rate=0.1)
    net = model if kind != "backbone" else model.vit
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    bf16 = device == "cuda"
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config(zero, batch, bf16))
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device=engine.device, dtype=dtype)
    y = torch.randint(0, model.num_classes, (batch,), device=engine.device)
    split_all = kind == "cfvit-split-all"

    def step():
        if kind == "backbone":
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        else:
            out = engine(x, split_all=split_all)
            loss, _ = cfvit.losses.cfvit_loss(out.coarse_logits.float(), out.fine_logits.float(), y)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del engine, opt, net, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"kind": kind, "zero": zero, "step_s": dt, "images_per_s": batch / dt, "peak_gib": peak}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cfvit_deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    rows = []
    for zero in a.zero:
        for kind in ("backbone", "cfvit", "cfvit-split-all"):
            rows.append(run(kind, a.model, zero, a.batch_size, a.steps, a.warmup, device))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{a.model} · batch {a.batch_size} · {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}"
          f" · {'bf16' if device == 'cuda' else 'fp32'}")
    print(f"{'ZeRO':>4} {'model':>16} {'step s':>8} {'img/s':>9} {'vs backbone':>12} {'peak GiB':>9}")
    for r in rows:
        base = next(b for b in rows if b["zero"] == r["zero"] and b["kind"] == "backbone")
        print(f"{r['zero']:>4} {r['kind']:>16} {r['step_s']:>8.3f} {r['images_per_s']:>9.1f} "
              f"{r['step_s'] / base['step_s']:>11.2f}x {r['peak_gib']:>9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
