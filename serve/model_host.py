"""Loading a checkpoint inside a replica (shared by the stage deployments and the ingress)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict

import torch

import cfvit
from cfvit_common.checkpoints import resolve_checkpoint


def load_model(checkpoint: str, num_threads: int = 0):
    """`cfvit.load` the checkpoint in eval mode; returns (model, local_dir)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    local = resolve_checkpoint(checkpoint)
    model = cfvit.load(str(local))
    model.eval()
    return model, local


def checkpoint_version(local_dir: Path, config: Dict[str, Any]) -> str:
    """`version` from the checkpoint's metadata, else a content hash of its weights."""
    if config.get("version") is not None:
        return str(config["version"])
    weights = Path(local_dir) / "model.safetensors"
    if not weights.exists():
        return "unknown"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:12]


def placement(num_gpus: float, precision: str = "auto"):
    """(device, autocast dtype or None) of a replica: its GPU when it reserves one, else the CPU.

    A replica that asks for a GPU but sees none fails loudly instead of silently serving from the CPU.
    """

    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"this replica reserves num_gpus={num_gpus} but torch sees no CUDA device")
        device = torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU
    else:
        device = torch.device("cpu")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return device, torch.bfloat16
    return device, None


def threads_for(num_cpus: float, torch_threads: int) -> int:
    return torch_threads if torch_threads > 0 else max(1, int(round(num_cpus)))
