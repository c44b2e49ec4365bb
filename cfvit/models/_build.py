"""Shared construction: split CF-ViT arguments from backbone arguments, build, load weights."""
from typing import Callable, Optional

from ..model import CFViT

CF_ARGS = ("alpha", "beta", "gca_start_block", "selection", "reuse", "split_all")


def build_cfvit(
    make_backbone: Callable[..., object],
    backbone_defaults: dict,
    patch_size: int,
    default_coarse_grid: int,
    overrides: dict,
    checkpoint_path: Optional[str] = None,
) -> CFViT:
    overrides = dict(overrides)
    overrides.pop("pretrained", None)  # the hub is not reachable: use checkpoint_path for weights
    checkpoint_path = overrides.pop("checkpoint_path", checkpoint_path)
    coarse_grid = int(overrides.pop("coarse_grid", default_coarse_grid))
    cf_kwargs = {k: overrides.pop(k) for k in CF_ARGS if k in overrides}
    kwargs = {**backbone_defaults, **overrides}
    # The fine resolution follows the coarse grid: 7x7 → 14x14 fine patches (224 px for patch 16).
    expected = 2 * coarse_grid * patch_size
    if kwargs.setdefault("img_size", expected) != expected:
        raise ValueError(
            f"img_size={kwargs['img_size']} does not match coarse_grid={coarse_grid} with patch {patch_size} "
            f"(expected {expected})"
        )
    model = CFViT(make_backbone(**kwargs), coarse_grid=coarse_grid, **cf_kwargs)
    if checkpoint_path:
        from ..checkpoint import load_backbone_weights

        load_backbone_weights(model, checkpoint_path)
    return model
