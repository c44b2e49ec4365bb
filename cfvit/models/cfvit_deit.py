"""CF-ViT on DeiT backbones (timm's VisionTransformer), and small models for Fashion-MNIST."""
import timm
from timm.models.vision_transformer import VisionTransformer

from ..registry import register_model
from ._build import build_cfvit

# DeiT's evaluation crop (resize to 256 for a 224 crop), also the CF-ViT authors' for DeiT-S; timm's DeiT
# configs say 0.9.
DEIT_CROP_PCT = 0.875


def _deit(timm_name: str):
    def make(**kwargs):
        return timm.create_model(timm_name, pretrained=False, pretrained_cfg_overlay=dict(crop_pct=DEIT_CROP_PCT),
                                 **kwargs)

    return make


@register_model
def cfvit_deit_tiny_patch16_224(**kwargs):
    """CF-ViT on DeiT-Ti (192 dim, 3 heads). `coarse_grid=9` gives CF-ViT* (288 px input)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return build_cfvit(_deit("deit_tiny_patch16_224"), model_args, kwargs, coarse_grid=7)


@register_model
def cfvit_deit_small_patch16_224(**kwargs):
    """CF-ViT on DeiT-S (384 dim, 6 heads): 1.10 GFLOPs coarse, 2.92 fine, backbone 4.61."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return build_cfvit(_deit("deit_small_patch16_224"), model_args, kwargs, coarse_grid=7)


@register_model
def cfvit_deit_base_patch16_224(**kwargs):
    """CF-ViT on DeiT-B (768 dim, 12 heads)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return build_cfvit(_deit("deit_base_patch16_224"), model_args, kwargs, coarse_grid=7)


# Fashion-MNIST statistics (28 px images upsampled to 56 px, one channel).
FMNIST_CFG = {"mean": (0.2860,), "std": (0.3530,), "interpolation": "bilinear", "crop_pct": 1.0,
              "crop_mode": "center"}


def _fmnist_vit(**kwargs):
    vit = VisionTransformer(**kwargs)
    vit.pretrained_cfg = {**FMNIST_CFG, "input_size": (kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])}
    return vit


@register_model
def cfvit_tiny_fmnist(**kwargs):
    """Small CF-ViT for 28 px data upsampled to 56 px: patch 4, 14x14 fine grid, 7x7 coarse grid.

    The same token counts as DeiT-S at 224 px (196 fine, 49 coarse), sized for 2 CPU cores.
    """
    model_args = dict(patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                      mlp_ratio=4.0, qkv_bias=True)
    # The EMA skips the first blocks: the paper skips 3 of 12 (a quarter); this shallow model skips a
    # third (2 of 6 blocks by default).
    kwargs.setdefault("gca_start_block", kwargs.get("depth", model_args["depth"]) // 3)
    return build_cfvit(_fmnist_vit, model_args, kwargs, coarse_grid=7)


@register_model
def cfvit_tiny32_fmnist(**kwargs):
    """CF-ViT for the main job on 2 CPU cores: 28 px data resized to 32 px, patch 4, 8x8 fine / 4x4 coarse grid,
    64-dim, 4 blocks, 4 heads (64 fine tokens, 16 coarse). About 0.0036 GFLOPs coarse, 0.0096 fine."""
    model_args = dict(patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                      mlp_ratio=4.0, qkv_bias=True)
    kwargs.setdefault("gca_start_block", kwargs.get("depth", model_args["depth"]) // 3)
    return build_cfvit(_fmnist_vit, model_args, kwargs, coarse_grid=4)
