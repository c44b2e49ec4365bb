"""Checkpoints: a directory with `model.safetensors` (weights) and `config.json` (how to rebuild + metadata).

No pickles anywhere: weights are safetensors; backbone initialisation from timm/DeiT `.pth` files goes
through `torch.load(weights_only=True)`.
"""
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from .registry import create_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match its model."""


def model_config(model) -> dict:
    """What `load` needs to rebuild the model, plus facts users look for (dims, grids, GFLOPs)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_name": model.model_name,
        # α, β and the selection rule can change after training (`set_inference`): rebuild with the current ones
        "model_kwargs": {**model.model_kwargs, "alpha": model.alpha, "beta": model.beta,
                         "selection": model.selection},
        "embed_dim": model.embed_dim,
        "depth": len(model.vit.blocks),
        "num_heads": model.vit.blocks[0].attn.num_heads,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "img_size": model.img_size,
        "coarse_grid": model.coarse_grid,
        "fine_grid": model.fine_grid,
        "alpha": model.alpha,
        "beta": model.beta,
        "gca_start_block": model.gca_start_block,
        "selection": model.selection,
        "reuse": model.reuse_kind,
        "aux_head": model.aux_head is not None,
        "logit_scaling": model.logit_scaling,
        "n_fine_tokens": model.n_fine,
        "stage_gflops": model.stage_gflops(),
        "backbone_gflops": model.backbone_gflops(),
        "data_config": model.data_config,
    }


def save(model, path, **metadata) -> Path:
    """Write `path/model.safetensors` and `path/config.json`. Metadata (class_names, eta_table, ...) is
    stored in the config and comes back as `model.cfvit_config`."""
    if not model.model_name:
        raise ValueError("only models built with cfvit.create_model can be saved (model_name is unset)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    carried = dict(model.cfvit_config)
    now = model_config(model)
    if any(carried.get(k) is not None and carried.get(k) != now[k] for k in ("alpha", "beta", "selection")):
        # An η table (and its calibration record) was chosen for other inference settings: its accuracies
        # and GFLOPs no longer hold. Dropped unless the caller passes a fresh one.
        for k in ("eta_table", "calibration", "agreement_profile"):
            carried.pop(k, None)
    config = {**carried, **metadata, **now}
    text = json.dumps(config, indent=2, default=_jsonable)  # fails before anything is written
    # Each file is written beside its target and renamed into place: re-saving over a checkpoint (as
    # `cfvit calibrate` does) never leaves a half-written file behind if interrupted.
    tmp_weights, tmp_config = path / f".{WEIGHTS}.tmp", path / f".{CONFIG}.tmp"
    try:
        save_file(state, str(tmp_weights), metadata={"format": "pt", "model_name": model.model_name})
        tmp_config.write_text(text)
        os.replace(tmp_weights, path / WEIGHTS)
        os.replace(tmp_config, path / CONFIG)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
    return path


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot store {type(x).__name__} in config.json")


def read_config(path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a cfvit checkpoint: {CONFIG} is missing")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_name" not in config:
        raise CheckpointError(f"{cfg_file} has no model_name: not a cfvit checkpoint config")
    return config


def state_mismatch(expected: dict, state: dict, limit: Optional[int] = None) -> list[str]:
    """What keeps `state` from loading strictly into a model whose state dict is `expected`: missing keys,
    unexpected keys and shape mismatches (at most `limit` names of each), as readable parts; [] if it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {missing[:limit]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:limit]}")
    if wrong:
        parts.append("shape mismatch " + ", ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:limit]))
    return parts


def read_pth(path) -> object:
    """A `.pth`/`.pt` file through torch.load(weights_only=True): tensors and plain containers only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code objects are refused here, by design
        raise CheckpointError(f"cannot read {path} with weights_only=True: {e}") from None


def load(path, map_location="cpu"):
    """Rebuild a model saved by `save` and load its weights (strict: every tensor must match)."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {e}") from None
    model = create_model(config["model_name"], **config.get("model_kwargs", {}))
    problems = state_mismatch(model.state_dict(), state, limit=5)
    if problems:
        raise CheckpointError(f"{weights} does not match model {config['model_name']}: " + "; ".join(problems))
    model.load_state_dict(state)
    model.cfvit_config = config
    return model.to(map_location).eval()


def load_backbone_weights(model, path) -> dict:
    """Initialise the backbone from a local timm or DeiT checkpoint (`.safetensors`, `.pth`, `.pt`).

    The coarse position table is re-derived from the loaded fine one. A classifier with another number of
    classes is left at its fresh initialisation. Returns {"missing": [...], "unexpected": [...]}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} not found")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = read_pth(path)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("vit.") for k in state):  # a CF-ViT state dict
        state = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    state = checkpoint_filter_fn(state, model.vit)  # resamples pos-embed / patch-embed to this model
    head = model.vit.head
    for k in ("head.weight", "head.bias"):
        if k in state and hasattr(head, k.split(".")[1]) and state[k].shape != getattr(head, k.split(".")[1]).shape:
            del state[k]
    result = model.vit.load_state_dict(state, strict=False)
    # Only the classifier may stay fresh: any other missing weight means the file does not fit this backbone
    # (e.g. another stem's key names), and loading it "successfully" would leave random layers behind.
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing:
        raise CheckpointError(f"{path} does not fit {model.model_name or 'this backbone'}: {len(missing)} weights "
                              f"missing, e.g. {', '.join(missing[:5])}")
    with torch.no_grad():
        model.coarse_pos_embed.copy_(
            resample_abs_pos_embed(model.vit.pos_embed, [model.coarse_grid] * 2, num_prefix_tokens=1)
        )
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
