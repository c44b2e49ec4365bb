"""The CF-ViT authors' released checkpoints (github.com/ChenMnZ/CF-ViT) as cfvit models.

Their `.pth` files hold `{"model": state_dict, "flop": [...], "anytime_classification": [...],
"budgeted_batch_classification": [[GFLOPs, ...], [top-1, ...]]}`. `from_official` maps every key of
their state dict onto this library's layout and refuses anything that does not fit (unknown, missing or
mis-shaped keys, another backbone family, another coarse grid). `import_official` writes the result as
a `cfvit.save` checkpoint with its provenance. docs/OFFICIAL.md records how the imported models were
checked against the authors' code.
"""
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import load_file
from timm.data import ImageNetInfo

from .checkpoint import CheckpointError, read_pth, save, state_mismatch
from .model import CFViT
from .registry import create_model

OFFICIAL_REPOSITORY = "https://github.com/ChenMnZ/CF-ViT"


@dataclass(frozen=True)
class Family:
    """One backbone the authors released CF-ViT checkpoints for, with its standard (full-size) shape."""

    label: str  # how people call it
    official_name: str  # the authors' `create_model` name
    stem_key: str  # a key only this family's state dict has
    depth: int
    embed_dim: int
    mlp_ratio: float
    model_kwargs: tuple = ()  # what an imported model needs beyond the registry defaults


FAMILIES = {
    "cfvit_deit_small_patch16_224": Family("DeiT-S", "cf_deit_small", "patch_embed.proj.weight", 12, 384, 4.0),
    # their LV-ViT code divides the coarse logits by 1.25 and not the fine ones: imported models do the same
    "cfvit_lvvit_small": Family("LV-ViT-S", "cf_lvvit_small", "patch_embed.conv1.weight", 16, 384, 3.0,
                                (("logit_scaling", "official"),)),
}
ALIASES = {f.official_name: name for name, f in FAMILIES.items()}

# What the paper (Table 2; Tables 1 and 4 for the coarse stage alone) and the authors' README publish per
# variant: (η, GFLOPs or None, top-1 %).
PUBLISHED = {
    ("cfvit_deit_small_patch16_224", 7): (("paper, Tables 1 and 4", 0.0, 1.1, 75.5), ("paper, Table 2", 0.5, 1.8, 79.8),
                                          ("paper, Table 2", 0.75, 2.6, 80.7), ("paper, Table 2", 1.0, 4.0, 80.8)),
    ("cfvit_deit_small_patch16_224", 9): (("authors' README", 1.0, None, 81.9),),
    ("cfvit_lvvit_small", 7): (("paper, Table 2", 0.63, 3.1, 83.3), ("paper, Table 2", 0.75, 4.0, 83.5),
                               ("paper, Table 2", 1.0, 6.1, 83.6)),
    ("cfvit_lvvit_small", 9): (("authors' README", 1.0, None, 84.4),),
}

_BLOCK_PARTS = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
_STEM_CONV = {"1": 0, "2": 3, "3": 6}  # their conv1/bn1 … conv3/bn3 → ConvStemEmbed.stem indices
_KEY_RULES: tuple[tuple[str, Union[str, Callable]], ...] = (
    (r"cls_token", "vit.cls_token"),
    (r"pos_embed_list\.0", "coarse_pos_embed"),
    (r"pos_embed_list\.1", "vit.pos_embed"),
    (r"patch_embed\.proj\.(weight|bias)", r"vit.patch_embed.proj.\1"),
    (r"patch_embed\.conv([123])\.weight", lambda m: f"vit.patch_embed.stem.{_STEM_CONV[m[1]]}.weight"),
    (r"patch_embed\.bn([123])\.(weight|bias|running_mean|running_var|num_batches_tracked)",
     lambda m: f"vit.patch_embed.stem.{_STEM_CONV[m[1]] + 1}.{m[2]}"),
    (rf"blocks\.(\d+)\.{_BLOCK_PARTS}\.(weight|bias)", r"vit.blocks.\1.\2.\3"),
    (r"norm\.(weight|bias)", r"vit.norm.\1"),
    (r"head\.(weight|bias)", r"vit.head.\1"),
    (r"aux_head\.(weight|bias)", r"aux_head.\1"),
    (r"reuse_block\.0\.(weight|bias)", r"reuse.0.\1"),
    (r"reuse_block\.1\.(fc1|fc2)\.(weight|bias)", r"reuse.1.\1.\2"),
)


def map_official_keys(state: dict) -> tuple[dict, list[str]]:
    """The authors' state dict in this library's key layout, and the keys no rule knows."""
    mapped, unknown = {}, []
    for key, value in state.items():
        for pattern, target in _KEY_RULES:
            m = re.fullmatch(pattern, key)
            if m:
                mapped[target(m) if callable(target) else m.expand(target)] = value
                break
        else:
            unknown.append(key)
    return mapped, sorted(unknown)


def resolve_model_name(model_name: str) -> str:
    """A registry name or the authors' name (`cf_deit_small`, `cf_lvvit_small`) → the registry name."""
    name = ALIASES.get(model_name, model_name)
    if name not in FAMILIES:
        known = ", ".join([*FAMILIES, *ALIASES])
        raise ValueError(f"the authors released CF-ViT checkpoints for DeiT-S and LV-ViT-S only: model "
                         f"{model_name!r} is not one of {known}")
    return name


def split_official(src) -> tuple[dict, dict]:
    """(state dict, the checkpoint's other entries) from a path (.pth/.pt or .safetensors), a checkpoint
    dict with a "model" entry, or a bare state dict."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        src = load_file(str(path)) if path.suffix == ".safetensors" else read_pth(path)
    if not isinstance(src, dict):
        raise CheckpointError(f"expected a checkpoint dict or a state dict, got {type(src).__name__}")
    state, extras = src, {}
    if isinstance(src.get("model"), dict):
        state, extras = src["model"], {k: v for k, v in src.items() if k != "model"}
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"not a state dict: entries {not_tensors[:5]} are not tensors")
    return state, extras


def _family_of(state: dict) -> Optional[str]:
    # LV-ViT has a patch_embed.proj too (after its conv stem): look for the stem first
    for name in ("cfvit_lvvit_small", "cfvit_deit_small_patch16_224"):
        if FAMILIES[name].stem_key in state:
            return name
    return None


def official_architecture(state: dict) -> dict:
    """What the authors' state dict says about its model: embed_dim, depth, num_classes, mlp_ratio, coarse_grid.

    The number of heads is not in a state dict: imported models have the registry's (6 for both families).
    """
    needed = ("cls_token", "pos_embed_list.0", "pos_embed_list.1", "head.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"not a state dict of the authors' CF-ViT: {absent} missing")
    dim = state["cls_token"].shape[-1]
    n_coarse, n_fine = state["pos_embed_list.0"].shape[1] - 1, state["pos_embed_list.1"].shape[1] - 1
    grid = math.isqrt(n_coarse)
    if grid * grid != n_coarse or n_fine != (2 * grid) ** 2:
        raise CheckpointError(f"position tables of {n_coarse} coarse and {n_fine} fine patches do not form a "
                              f"g×g coarse and 2g×2g fine grid")
    return {
        "embed_dim": dim,
        "depth": 1 + max(int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
        "num_classes": state["head.weight"].shape[0],
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "coarse_grid": grid,
    }


def _model_kwargs(name: str, arch: dict) -> dict:
    family = FAMILIES[name]
    kwargs = {"coarse_grid": arch["coarse_grid"], **dict(family.model_kwargs)}
    standard = {"embed_dim": family.embed_dim, "depth": family.depth, "mlp_ratio": family.mlp_ratio,
                "num_classes": 1000}
    kwargs.update({k: arch[k] for k, v in standard.items() if arch[k] != v})  # reduced models (tests)
    return kwargs


def from_official(path_or_state_dict, model_name: str, coarse_grid: Optional[int] = None) -> CFViT:
    """A CF-ViT holding the authors' weights, answering as their code does (in eval mode).

    `path_or_state_dict`: their `.pth` (read with weights_only=True), a `.safetensors` file of their state
    dict, a checkpoint dict with a "model" entry, or a bare state dict. `model_name`:
    `cfvit_deit_small_patch16_224` / `cfvit_lvvit_small` or their names `cf_deit_small` / `cf_lvvit_small`.
    `coarse_grid` (7 or 9) is read from the checkpoint; when given it must agree. Raises CheckpointError
    listing every key that does not fit.
    """
    name = resolve_model_name(model_name)
    state, _ = split_official(path_or_state_dict)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    found = _family_of(state)
    if found is None:
        raise CheckpointError("not a state dict of the authors' CF-ViT: neither a DeiT patch embedding "
                              f"({FAMILIES['cfvit_deit_small_patch16_224'].stem_key}) nor an LV-ViT conv stem "
                              f"({FAMILIES['cfvit_lvvit_small'].stem_key})")
    if found != name:
        raise CheckpointError(f"this is a CF-ViT {FAMILIES[found].label} checkpoint ({FAMILIES[found].stem_key}), "
                              f"not {FAMILIES[name].label}: import it as {found} ({FAMILIES[found].official_name})")
    arch = official_architecture(state)
    if coarse_grid is not None and int(coarse_grid) != arch["coarse_grid"]:
        g = arch["coarse_grid"]
        raise CheckpointError(f"the checkpoint has a {g}x{g} coarse grid (coarse position table of {g * g} "
                              f"patches + class token), not {coarse_grid}x{coarse_grid}")
    model = create_model(name, **_model_kwargs(name, arch))
    mapped, unknown = map_official_keys(state)
    problems = state_mismatch(model.state_dict(), mapped)
    if unknown:
        problems.insert(0, f"unknown keys {unknown}")
    if problems:
        raise CheckpointError(f"the checkpoint does not fit {name} ({FAMILIES[name].official_name}): "
                              + "; ".join(problems))
    model.load_state_dict(mapped)
    return model.eval()


def _figures(extras: dict, key: str):
    """One of the checkpoint's own result lists as plain floats (nested one level for the curve)."""
    value = extras.get(key)
    if value is None:
        return None
    try:
        if key == "budgeted_batch_classification":
            gflops, top1 = value
            return {"gflops": [float(x) for x in gflops], "top1": [float(x) for x in top1]}
        return [float(x) for x in value]
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's {key!r} is not a list of numbers: {e}") from None


def published_results(model_name: str, coarse_grid: int) -> list[dict]:
    """The accuracy the paper and the authors' README publish for this variant."""
    rows = PUBLISHED.get((resolve_model_name(model_name), coarse_grid), ())
    return [{"source": s, "eta": eta, "gflops": g, "top1": top1} for s, eta, g, top1 in rows]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions timm ships (offline), in the usual class-index order."""
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def imagenet_class_ids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids (`n01440764`, …): the folder names of an ImageNet-style validation set."""
    return list(ImageNetInfo().label_names())


def _full_size(model: CFViT) -> bool:
    family = FAMILIES[model.model_name]
    return model.num_classes == 1000 and len(model.vit.blocks) == family.depth and model.vit.embed_dim == family.embed_dim


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_official(path, model_name: str, out_dir, coarse_grid: Optional[int] = None) -> dict:
    """Write the authors' checkpoint at `path` as a `cfvit.save` checkpoint in `out_dir`.

    The config carries `provenance` (source file name and sha256, their repository, the checkpoint's own
    `flop`, `anytime_classification` and `budgeted_batch_classification` figures, the published results)
    and, for 1000-class models, ImageNet `class_names`. `cfvit.load(out_dir)` answers exactly as
    `from_official(path, ...)`. Returns a summary (path, model, grid, sha256, stage GFLOPs, provenance).
    """
    path = Path(path)
    state, extras = split_official(path)
    model = from_official(state, model_name, coarse_grid)
    sha256 = file_sha256(path)
    provenance = {
        "source": "official",
        "repository": OFFICIAL_REPOSITORY,
        "official_model": FAMILIES[model.model_name].official_name,
        "file": path.name,
        "sha256": sha256,
        # their figures: GFLOPs per exit stage, top-1 per stage, and the curve over η = 0.00 … 0.99
        "flop": _figures(extras, "flop"),
        "anytime_classification": _figures(extras, "anytime_classification"),
        "budgeted_batch_classification": _figures(extras, "budgeted_batch_classification"),
        # the paper's figures belong to the released full-size models only (not to a reduced test model)
        "published": published_results(model.model_name, model.coarse_grid) if _full_size(model) else [],
    }
    metadata = {"provenance": provenance}
    if model.num_classes == 1000:
        metadata["class_names"] = imagenet_class_names()
        metadata["class_ids"] = imagenet_class_ids()  # what ImageNet-style folders are named
    out = save(model, out_dir, **metadata)
    return {"path": str(out), "model_name": model.model_name, "coarse_grid": model.coarse_grid, "sha256": sha256,
            "stage_gflops": model.stage_gflops(), "provenance": provenance}
