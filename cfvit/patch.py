"""Subclasses of timm's Attention/Block that can also return the class token's attention row.

`apply_patch(vit)` swaps them into a timm VisionTransformer in place (ToMe style): weights, state-dict
keys and timm's own forward stay untouched; only the extra `forward_with_cls_attn` path is added.
"""
import contextlib

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block


def cls_attention_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Post-softmax attention of the class token (query 0) over the patch tokens, mean over heads.

    q, k: (B, H, N, d). Costs N*d per head instead of the N*N*d of the full matrix. Returns (B, N-1)
    in float32 (the class token's own column dropped), detached: only the ranking is used.
    """
    # Autocast off: it would round the float32 scores back to bf16 before the softmax, and the ranking
    # of near-tied patches is exactly what the selection uses.
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, N)
        return logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)


class CFAttention(Attention):
    """timm Attention + `forward_with_cls_attn`.

    With `full_attn_matrix=True` it materialises the whole attention matrix instead of using SDPA
    (the naive way, kept for the benchmark and as a cross-check).
    """

    full_attn_matrix: bool = False

    def forward_with_cls_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0
        if self.full_attn_matrix:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            cls_row = attn[:, :, 0, 1:].detach().float().mean(dim=1)
            x = self.attn_drop(attn) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
            cls_row = cls_attention_row(q, k, self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # explicit: B may be 0
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, cls_row


class CFBlock(Block):
    """timm Block + `forward_with_cls_attn` (same residual structure as Block.forward)."""

    def forward_with_cls_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, cls_row = self.attn.forward_with_cls_attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, cls_row


def apply_patch(vit: torch.nn.Module) -> torch.nn.Module:
    """Swap CFBlock/CFAttention into every timm Block of `vit` (in place); returns `vit`."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TypeError(f"{type(vit).__name__} has no `blocks`: not a timm VisionTransformer")
    for blk in blocks:
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise TypeError(
                f"CF-ViT needs timm Block/Attention blocks, got {type(blk).__name__}/"
                f"{type(getattr(blk, 'attn', None)).__name__}"
            )
        blk.__class__ = CFBlock
        blk.attn.__class__ = CFAttention
    return vit


@contextlib.contextmanager
def full_attention_matrix(enabled: bool):
    """Materialise every attention matrix for the class-attention rows (the naive way)."""
    old = CFAttention.full_attn_matrix
    CFAttention.full_attn_matrix = enabled
    try:
        yield
    finally:
        CFAttention.full_attn_matrix = old
