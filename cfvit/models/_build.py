"""Shared construction: split CF-ViT arguments from backbone arguments, build, load weights."""
from typing import Callable, Optional

from ..checkpoint import load_backbone_weights
from ..model import CFViT

CF_ARGS = ("alpha", "beta", "gca_start_block", "selection", "reuse", "split_all", "aux_head", "aux_weight",
           "logit_scaling")


def build_cfvit(
    make_backbone: Callable[..., object],
    model_args: dict,
    overrides: dict,
    coarse_grid: int = 7,
) -> CFViT:
    """Build CF-ViT on `make_backbone(**model_args, **backbone overrides)` (timm style: `model_args` names the
    architecture, `overrides` are the caller's keyword arguments, CF-ViT's own and the backbone's alike).

    `coarse_grid` is the default coarse patch grid; the fine input size follows from it (2 · grid · patch).
    """
    overrides = dict(overrides)
    overrides.pop("pretrained", None)  # the hub is not reachable: use checkpoint_path for weights
    checkpoint_path: Optional[str] = overrides.pop("checkpoint_path", None)
    coarse_grid = int(overrides.pop("coarse_grid", coarse_grid))
    cf_kwargs = {k: overrides.pop(k) for k in CF_ARGS if k in overrides}
    kwargs = {**model_args, **overrides}
    patch_size = kwargs["patch_size"]
    # The fine resolution follows the coarse grid: 7x7 → 14x14 fine patches (224 px for patch 16).
    expected = 2 * coarse_grid * patch_size
    if kwargs.setdefault("img_size", expected) != expected:
        raise ValueError(
            f"img_size={kwargs['img_size']} does not match coarse_grid={coarse_grid} with patch {patch_size} "
            f"(expected {expected})"
        )
    model = CFViT(make_backbone(**kwargs), coarse_grid=coarse_grid, **cf_kwargs)
    if checkpoint_path:
        load_backbone_weights(model, checkpoint_path)
    return model
