"""CF-ViT on LV-ViT-S (Jiang et al., 2021), written on timm's VisionTransformer since timm lacks it.

LV-ViT-S: a 4-conv stem (7x7/2 + two 3x3 convs, then an 8x8/8 projection: stride 16 overall),
384 dim, 16 blocks, 6 heads, MLP ratio 3. LV-ViT scales each residual branch by 1/skip_lam (2.0);
here that is timm's LayerScale initialised at 0.5, which holds the same function at init. The
token-labelling auxiliary head is not included. Weights load in this module's (timm-style) key layout;
the authors' TokenLabeling checkpoints name the stem and residual scales differently and would need a
key map, which is not provided (`load_backbone_weights` refuses a file that does not fit).
"""
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from ..registry import register_model
from ._build import build_cfvit


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


def _lvvit(**kwargs):
    return VisionTransformer(embed_layer=ConvStemEmbed, **kwargs)


@register_model
def cfvit_lvvit_small(**kwargs):
    """CF-ViT on LV-ViT-S (224 px, 7x7 coarse grid; `coarse_grid=9` for CF-ViT*)."""
    defaults = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, qkv_bias=False,
                    init_values=0.5)
    return build_cfvit(_lvvit, defaults, 16, 7, kwargs)
