"""The CF-ViT method as pure tensor functions (ToMe style): no modules, no state.

Shapes: B batch, Nc = Gc*Gc coarse patches, Nf = (2*Gc)**2 fine patches, D channels, k selected.
"""
import math

import torch
import torch.nn.functional as F

SELECTIONS = ("gca", "last", "random", "negative")


def num_selected(n_coarse: int, alpha: float) -> int:
    """k = ceil(alpha * Nc): coarse patches re-split into 2x2 fine patches."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # round() first so 0.5 * 49 = 24.5 is not pushed up by float noise in e.g. 0.3 * 10
    return int(math.ceil(round(alpha * n_coarse, 9)))


def num_fine_tokens(n_coarse: int, alpha: float) -> int:
    """Eq. (10): N_f = 4*ceil(alpha*Nc) + floor((1-alpha)*Nc) (patch tokens, class token excluded).

    floor((1-alpha)*Nc) equals Nc - ceil(alpha*Nc): every coarse patch is either split or kept.
    """
    k = num_selected(n_coarse, alpha)
    return 4 * k + (n_coarse - k)


def coarse_to_fine_index(coarse_idx: torch.Tensor, coarse_grid: int) -> torch.Tensor:
    """Map coarse indices (..., k) on a Gc x Gc grid to their 2x2 fine children (..., k, 4).

    (r, c) -> (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) on the 2Gc x 2Gc grid, row-major.
    """
    fine_grid = 2 * coarse_grid
    r = torch.div(coarse_idx, coarse_grid, rounding_mode="floor")
    c = coarse_idx % coarse_grid
    top_left = 2 * r * fine_grid + 2 * c
    offsets = torch.tensor([0, 1, fine_grid, fine_grid + 1], device=coarse_idx.device, dtype=coarse_idx.dtype)
    return top_left.unsqueeze(-1) + offsets


def update_global_attention(g: torch.Tensor | None, cls_attn: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (9): g <- beta * g + (1 - beta) * a_k, starting from g = 0."""
    if g is None:
        return (1.0 - beta) * cls_attn
    return beta * g + (1.0 - beta) * cls_attn


def select_patches(
    scores: torch.Tensor,
    k: int,
    mode: str = "gca",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (B, k) of the coarse patches to re-split, ranked by `scores` (B, Nc).

    gca / last: highest scores; negative: lowest; random: uniform, ignoring scores.
    Indices are returned sorted ascending so the fine sequence order is deterministic.
    """
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}; choose one of {SELECTIONS}")
    if k == 0:
        return scores.new_zeros((scores.shape[0], 0), dtype=torch.long)
    if mode == "random":
        noise = torch.rand(scores.shape, generator=generator, device="cpu").to(scores.device)
        idx = noise.topk(k, dim=-1).indices
    else:
        ranked = scores.float() if mode != "negative" else -scores.float()
        idx = ranked.topk(k, dim=-1).indices
    return idx.sort(dim=-1).values


def unselected_patches(selected: torch.Tensor, n_coarse: int) -> torch.Tensor:
    """Complement of `selected` (B, k) in range(Nc) → (B, Nc - k), ascending."""
    b, k = selected.shape
    keep = torch.ones(b, n_coarse, dtype=torch.bool, device=selected.device)
    keep.scatter_(1, selected, False)
    # nonzero on a mask with a fixed count per row keeps rows aligned
    return keep.nonzero()[:, 1].reshape(b, n_coarse - k)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), idx (B, M) -> (B, M, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def upsample_reuse(reuse: torch.Tensor, coarse_grid: int) -> torch.Tensor:
    """Copy each coarse token 4x onto its 2x2 fine cell: (B, Gc*Gc, D) -> (B, 4*Gc*Gc, D)."""
    b, n, d = reuse.shape
    grid = reuse.transpose(1, 2).reshape(b, d, coarse_grid, coarse_grid)
    fine = F.interpolate(grid, scale_factor=2, mode="nearest")
    return fine.flatten(2).transpose(1, 2)


def build_fine_tokens(
    fine_embed: torch.Tensor,
    coarse_embed: torch.Tensor,
    reuse: torch.Tensor | None,
    selected: torch.Tensor,
    coarse_grid: int,
) -> torch.Tensor:
    """The fine stage's patch tokens: [4 children of each selected patch, unselected coarse tokens].

    fine_embed (B, 4Nc, D): fine patch embedding + fine position embedding.
    coarse_embed (B, Nc, D): the coarse stage's input tokens (its patch embedding + coarse pos-embed).
    reuse (B, Nc, D) or None: feature-reuse output per coarse patch, added to the split children only.
    """
    n_coarse = coarse_embed.shape[1]
    child_idx = coarse_to_fine_index(selected, coarse_grid).flatten(1)  # (B, 4k)
    fine = gather_tokens(fine_embed, child_idx)
    if reuse is not None:
        fine = fine + gather_tokens(reuse, selected).repeat_interleave(4, dim=1)
    kept = gather_tokens(coarse_embed, unselected_patches(selected, n_coarse))
    return torch.cat([fine, kept], dim=1)


def token_label_logits(
    cls_logits: torch.Tensor, aux_logits: torch.Tensor, weight: float, normalise: bool = False
) -> torch.Tensor:
    """LV-ViT's inference logits: cls (B, C) + weight × max over tokens of aux (B, N, C); `normalise` divides
    the sum by (1 + weight), as the CF-ViT authors' code does for the coarse stage only."""
    logits = cls_logits + weight * aux_logits.amax(dim=1)
    return logits / (1.0 + weight) if normalise else logits
