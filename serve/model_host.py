"""Loading a checkpoint inside a replica (shared by the stage deployments and the ingress)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

import cfvit
from cfvit_common.checkpoints import resolve_checkpoint
from cfvit_common.tracking import file_sha256, parse_models_uri


def load_model(checkpoint: str, num_threads: int = 0):
    """`cfvit.load` the checkpoint in eval mode; returns (model, local_dir)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    local = resolve_checkpoint(checkpoint)
    model = cfvit.load(str(local))
    model.eval()
    return model, local


def model_identity(checkpoint: str, local_dir: Path, config: Dict[str, Any]) -> Dict[str, Optional[str]]:
    """What GET /v1/model says the served model is, never where it is stored: the registered model and
    version for `models:/NAME/VERSION` (build_app pins aliases to one), else the checkpoint's `version`
    metadata or a short content hash; and the sha256 of the weights."""
    weights = Path(local_dir) / "model.safetensors"
    digest = "sha256:" + file_sha256(weights) if weights.is_file() else None
    if checkpoint.startswith("models:/") and "@" not in checkpoint:
        name, version = parse_models_uri(checkpoint)
        return {"registered_model": name, "version": version, "digest": digest}
    if config.get("version") is not None:
        version = str(config["version"])
    else:
        version = digest[:len("sha256:") + 12] if digest else "unknown"
    return {"registered_model": None, "version": version, "digest": digest}


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
