"""Exact per-image cost of each stage, as multiply-accumulates (fvcore convention: 1 MAC = 1 "FLOP").

Computed from the model's own modules and token counts: every Linear, the patch-embedding convs,
the attention products (2·N²·D per block), the class-attention row (N·D per block that feeds the EMA),
a token-labelling head over every patch token (LV-ViT) and LayerNorms (5 per element with affine, as
fvcore). Softmax, GELU, adds and the bilinear resize of the coarse view are not counted (fvcore does not
count them either).
"""
import torch
import torch.nn as nn
import torch.utils.flop_counter as flop_counter


def _linear_macs_per_token(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _layernorm_macs_per_token(module: nn.Module) -> int:
    return sum(
        m.normalized_shape[0] * (5 if m.elementwise_affine else 4)
        for m in module.modules()
        if isinstance(m, nn.LayerNorm)
    )


def _conv_stack_macs(module: nn.Module, size: int) -> int:
    """Convolutions applied one after the other (a patch embedding or a conv stem) on a size×size input."""
    macs, h = 0, size
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k, s, p, d = m.kernel_size[0], m.stride[0], m.padding[0], m.dilation[0]
            h = (h + 2 * p - d * (k - 1) - 1) // s + 1
            macs += h * h * m.out_channels * (m.in_channels // m.groups) * k * m.kernel_size[1]
    return macs


def _patch_embed_macs(pe: nn.Module, size: int) -> int:
    n_tokens = (size // pe.patch_size[0]) ** 2
    # Linear/LayerNorm inside the embedding (e.g. an embed norm) act per token.
    return _conv_stack_macs(pe, size) + n_tokens * (_linear_macs_per_token(pe) + _layernorm_macs_per_token(pe))


def block_macs(block: nn.Module, n_tokens: int, cls_attn_row: bool = False) -> int:
    """One transformer block on n_tokens tokens (class token included)."""
    attn_dim = block.attn.num_heads * block.attn.head_dim
    macs = n_tokens * (_linear_macs_per_token(block) + _layernorm_macs_per_token(block))
    macs += 2 * n_tokens * n_tokens * attn_dim  # Q·Kᵀ and A·V
    if cls_attn_row:
        macs += n_tokens * attn_dim  # q_cls · Kᵀ recomputed for the class-attention EMA
    return macs


def _head_macs(vit: nn.Module, n_tokens: int) -> int:
    return (
        n_tokens * _layernorm_macs_per_token(vit.norm)
        + _layernorm_macs_per_token(vit.fc_norm)
        + _linear_macs_per_token(vit.head)
    )


def _trunk_macs(vit: nn.Module, n_tokens: int, score_from=None) -> int:
    return sum(
        block_macs(b, n_tokens, cls_attn_row=score_from is not None and i >= score_from)
        for i, b in enumerate(vit.blocks)
    ) + _head_macs(vit, n_tokens)


def stage_macs(model) -> dict[str, int]:
    """MACs per image: `coarse`, `fine` (selection on), `fine_split_all`, and the plain `backbone`."""
    vit = model.vit
    nc = model.n_coarse
    reuse = 0
    if model.reuse is not None:
        reuse = nc * (_linear_macs_per_token(model.reuse) + _layernorm_macs_per_token(model.reuse))
    # the token-labelling head reads every patch token (the max over tokens is not counted, as softmax)
    aux = _linear_macs_per_token(model.aux_head) if model.aux_head is not None else 0
    fine_embed = _patch_embed_macs(vit.patch_embed, model.img_size)
    return {
        "coarse": _patch_embed_macs(vit.patch_embed, model.coarse_img_size)
        + _trunk_macs(vit, nc + 1, model._scores_from()) + nc * aux,
        "fine": fine_embed + reuse + _trunk_macs(vit, model.n_fine + 1) + model.n_fine * aux,
        "fine_split_all": fine_embed + reuse + _trunk_macs(vit, 4 * nc + 1) + 4 * nc * aux,
        "backbone": fine_embed + _trunk_macs(vit, 4 * nc + 1) + 4 * nc * aux,
    }


def expected_gflops(stage_gflops: dict, exit_fraction) -> float:
    """Every image pays the coarse stage; the (1 - exit_fraction) that go on pay the fine one too."""
    return stage_gflops["coarse"] + (1.0 - exit_fraction) * stage_gflops["fine"]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter_mode(display: bool = False) -> flop_counter.FlopCounterMode:
    """torch's FlopCounterMode plus a formula for the fused CPU attention op it silently skips."""
    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        mapping[cpu_flash] = _sdpa_cpu_flops
    return flop_counter.FlopCounterMode(display=display, custom_mapping=mapping)


def measure_macs(fn, *args, **kwargs) -> tuple[int, object]:
    """Run fn(*args, **kwargs) under the counter; returns (MACs, result). FlopCounterMode counts 2 per MAC."""
    with flop_counter_mode() as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops() // 2, result
