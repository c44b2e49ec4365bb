"""Images/s per core of the built-in set's training and eval transforms: timm's per-image PIL path against
the batched numpy one (`jobs/train/batch_transforms.py`), process CPU time, one thread.

    python -m benchmarks.builtin_transforms [--model cfvit_tiny32_fmnist]
"""
from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform
from jobs.train import batch_transforms


def measure(model: str = "cfvit_tiny32_fmnist", n_pil: int = 1000, n_numpy: int = 2000, batch: int = 250) -> dict:
    torch.set_num_threads(1)
    x = load_fashion_mnist("train")[0][:max(n_pil, n_numpy)]
    dc = dict(cfvit.create_model(model).data_config)
    aug = dict(auto_augment=None, scale=(0.8, 1.0), hflip=0.5, re_prob=0.0, color_jitter=None)  # fmnist_main's
    out = {}
    for train in (True, False):
        tf = build_transform(dc, is_training=train, **(aug if train else {}))
        t = time.process_time()
        for a in x[:n_pil]:
            tf(Image.fromarray(a))
        pil = n_pil / (time.process_time() - t)
        t = time.process_time()
        for i in range(0, n_numpy, batch):
            batch_transforms.transform(x[i:i + batch], dc, train, aug)
        out["train" if train else "eval"] = {"pil": pil, "numpy": n_numpy / (time.process_time() - t)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cfvit_tiny32_fmnist")
    args = p.parse_args()
    print(f"{'transform':<10}{'timm/PIL img/s/core':>22}{'numpy img/s/core':>20}{'ratio':>8}")
    for name, r in measure(args.model).items():
        print(f"{name:<10}{r['pil']:>22,.0f}{r['numpy']:>20,.0f}{r['numpy'] / r['pil']:>7.1f}x")


if __name__ == "__main__":
    main()
