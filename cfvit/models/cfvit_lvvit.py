"""CF-ViT on LV-ViT-S (Jiang et al., 2021) as the CF-ViT authors run it, written on timm's VisionTransformer.

LV-ViT-S: a 4-conv stem (7x7/2 + two 3x3 convs with BatchNorm, then an 8x8/8 projection: stride 16
overall; their `p_emb='4_2'`), 384 dim, 16 blocks, 6 heads, MLP ratio 3, no qkv bias, LayerNorm eps 1e-5
(PyTorch's default, which LV-ViT keeps), and every residual branch divided by a constant `skip_lam` = 2
(not a learned scale). The token-labelling head (`aux_head`, a Linear over the patch tokens) belongs to the
model: its logits are the class logits + 0.25 × the per-class maximum of the head over the tokens
(`CFViT(aux_head=True)`). `cfvit.from_official` maps the authors' checkpoints onto this layout.
"""
from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from ..registry import register_model
from ._build import build_cfvit

# LV-ViT's evaluation data config (the CF-ViT authors evaluate cf_lvvit_small with crop 0.9, bicubic).
LVVIT_DATA_CFG = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bicubic",
                  "crop_pct": 0.9, "crop_mode": "center"}


class ConvStemEmbed(PatchEmbed):
    """PatchEmbed with LV-ViT's conv stem in front of a stride patch_size/2 projection."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, stem_dim=64, **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        del self.proj  # re-registered after the stem so modules() lists the convs in order
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(stem_dim), nn.ReLU(True),
            nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem_dim), nn.ReLU(True),
            nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem_dim), nn.ReLU(True),
        )
        self.proj = nn.Conv2d(stem_dim, embed_dim, patch_size // 2, stride=patch_size // 2)
        self.in_chans = in_chans

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        x = self.proj(self.stem(x)).flatten(2).transpose(1, 2)
        return self.norm(x)


class ResidualScale(nn.Module):
    """LV-ViT's residual scaling: the branch divided by a constant `skip_lam` (no parameter).

    Sits where timm's Block has its LayerScale (`ls1`, `ls2`), so timm's forward and CF-ViT's patched one use it.
    """

    def __init__(self, skip_lam: float):
        super().__init__()
        if skip_lam <= 0:
            raise ValueError(f"skip_lam must be > 0, got {skip_lam}")
        self.skip_lam = float(skip_lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam  # a division, as LV-ViT writes it (x * 0.5 would round differently for other λ)

    def extra_repr(self) -> str:
        return f"skip_lam={self.skip_lam}"


def _lvvit(skip_lam: float = 2.0, **kwargs):
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-5))
    vit = VisionTransformer(embed_layer=ConvStemEmbed, **kwargs)
    for blk in vit.blocks:
        blk.ls1, blk.ls2 = ResidualScale(skip_lam), ResidualScale(skip_lam)
    vit.pretrained_cfg = {**LVVIT_DATA_CFG, "input_size": (vit.patch_embed.in_chans, *vit.patch_embed.img_size)}
    return vit


@register_model
def cfvit_lvvit_small(**kwargs):
    """CF-ViT on LV-ViT-S with its token-labelling head (224 px, 7x7 coarse grid; `coarse_grid=9` for CF-ViT*)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, qkv_bias=False,
                      skip_lam=2.0)
    kwargs.setdefault("aux_head", True)
    return build_cfvit(_lvvit, model_args, kwargs, coarse_grid=7)
