"""Decode + training augmentation throughput: today's CPU path against `data.decode: device`.

    python -m benchmarks.device_decode --device cuda|cpu --n 512 --batch 256 [--json OUT]

(a) cpu path, per core: PIL decode + timm transform, one image at a time, one process, one torch thread;
(b) device path: `device_augment.decode_batch` (nvjpeg on CUDA) + `train_params` + `augment_batch`, whole
    batches, `torch.cuda.synchronize()` around the timing.

Both on generated ImageNet-sized JPEGs (benchmarks/data.py) with the same augmentation: RandomResizedCrop 224
(bicubic, as the DeiT config's model), hflip, colour jitter 0.4, random erasing 0.25; no RandAugment (the
device path has none). With a CUDA device it also reports how far the GPU's output is from the CPU
fallback's for the same seed (grey levels before Normalize: nvjpeg vs libjpeg, float rounding).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.data import DEIT_DATA_CONFIG, make_images
from cfvit.transforms import build_transform, decode_image
from jobs.train import device_augment as da

AUG = dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, re_prob=0.25)


def cpu_path(blobs: list[bytes]) -> dict:
    """(a): the Ray Data task's work per image, one thread."""
    torch.set_num_threads(1)
    tf = build_transform(DEIT_DATA_CONFIG, is_training=True, auto_augment=None, **AUG)
    tf(decode_image(blobs[0]))  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for b in blobs:
        tf(decode_image(b))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"img_s": len(blobs) / wall, "img_s_per_cpu_s": len(blobs) / cpu}


def device_path(blobs: list[bytes], device: str, batch: int) -> dict:
    """(b): whole batches on `device`; decode and augment timed apart as well."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(chunk, seed):
        imgs, _ = da.decode_batch(chunk, device, 3)
        sync()
        t = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        p = da.train_params(len(imgs), [im.shape[1:] for im in imgs], AUG, g, DEIT_DATA_CONFIG["input_size"][1:])
        da.augment_batch(imgs, p, DEIT_DATA_CONFIG, device)
        sync()
        return time.perf_counter() - t

    run(blobs[:batch], 0)  # warm-up: CUDA context, nvjpeg handles, kernels
    decode_s = augment_s = 0.0
    sync()
    t0 = time.perf_counter()
    for k in range(0, len(blobs), batch):
        t = time.perf_counter()
        augment_s += run(blobs[k:k + batch], k)
        decode_s += time.perf_counter() - t
    total = time.perf_counter() - t0
    decode_s -= augment_s
    n = len(blobs)
    return {"img_s": n / total, "decode_img_s": n / decode_s, "augment_img_s": n / augment_s}


def gpu_vs_cpu(blobs: list[bytes], device: str) -> dict:
    """Grey levels (0-255, before Normalize) between `device` and the CPU fallback, the same seed."""
    out = {}
    for name, train in (("eval", False), ("train", True)):
        x = {}
        for dev in ("cpu", device):
            imgs, _ = da.decode_batch(blobs, dev, 3)
            g = torch.Generator().manual_seed(0)
            p = da.train_params(len(imgs), [im.shape[1:] for im in imgs], AUG, g,
                                DEIT_DATA_CONFIG["input_size"][1:]) if train else None
            x[dev] = da.augment_batch(imgs, p, DEIT_DATA_CONFIG, dev).cpu()
        std = torch.tensor(DEIT_DATA_CONFIG["std"]).view(1, 3, 1, 1)
        d = ((x[device] - x["cpu"]) * std * 255).abs()
        out[name] = {"max_levels": float(d.max()), "mean_levels": float(d.mean()),
                     "p999_levels": float(d.flatten().kthvalue(int(0.999 * d.numel())).values)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--n", type=int, default=512, help="images")
    p.add_argument("--batch", type=int, default=256, help="images per device batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the device path on a CPU")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()

    blobs = list(make_images(args.n).values())
    r = {"device": args.device, "n": args.n, "batch": args.batch,
         "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None}
    r["cpu_path"] = cpu_path(blobs)
    torch.set_num_threads(args.threads)
    r["device_path"] = device_path(blobs, args.device, args.batch)
    if args.device.startswith("cuda"):
        r["gpu_vs_cpu"] = gpu_vs_cpu(blobs[:32], args.device)
    print(f"(a) cpu path, 1 core: {r['cpu_path']['img_s']:,.0f} img/s")
    d = r["device_path"]
    print(f"(b) device path on {args.device}: {d['img_s']:,.0f} img/s "
          f"(decode {d['decode_img_s']:,.0f}, augment {d['augment_img_s']:,.0f}) = "
          f"{d['img_s'] / r['cpu_path']['img_s']:.1f} cores of (a)")
    for k, v in r.get("gpu_vs_cpu", {}).items():
        print(f"    {k}: GPU vs CPU fallback, grey levels: max {v['max_levels']:.1f}, "
              f"99.9% {v['p999_levels']:.1f}, mean {v['mean_levels']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
