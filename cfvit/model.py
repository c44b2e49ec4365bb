"""CF-ViT: one timm VisionTransformer run twice, coarse then fine (Chen et al., AAAI'23).

The wrapped timm model keeps its own modules and state-dict keys (under `vit.`); CF-ViT adds only a
coarse position-embedding table and the feature-reuse module.
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from . import coarse_to_fine as c2f
from .flops import expected_gflops, stage_macs
from .patch import apply_patch

REUSES = ("mlp", "linear", "none")
# How the logits of a model with a token-labelling head are scaled per stage: "paper" uses one classifier
# for both stages (Eqs. 7, 13); "official" divides the coarse logits by (1 + aux_weight), as the authors'
# LV-ViT code does (imported checkpoints need it to answer as theirs do).
LOGIT_SCALINGS = ("paper", "official")


@dataclass
class CFViTOutput:
    """Training forward: logits of both stages."""

    coarse_logits: torch.Tensor
    fine_logits: torch.Tensor


@dataclass
class InferenceOutput:
    """Early-exit inference. `exit_stage`: 0 answered by the coarse stage, 1 by the fine stage."""

    logits: torch.Tensor
    exit_stage: torch.Tensor
    coarse_logits: torch.Tensor
    selected: Optional[torch.Tensor] = None  # (B, k) coarse indices re-split; -1 rows for exits


@dataclass
class CoarseState:
    """What the fine stage needs from the coarse one, per sample (so it can cross process boundaries)."""

    logits: torch.Tensor  # (B, classes)
    tokens: torch.Tensor  # (B, Nc, D) final-normed coarse patch tokens (feature-reuse input)
    embed: torch.Tensor  # (B, Nc, D) coarse input tokens (patch embedding + coarse pos-embed)
    scores: Optional[torch.Tensor]  # (B, Nc) global class attention (None where not needed)

    def __getitem__(self, idx) -> "CoarseState":
        return CoarseState(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                              for f in fields(self)})

    def __len__(self) -> int:
        return self.logits.shape[0]

    def to(self, *args, **kwargs) -> "CoarseState":
        return CoarseState(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(*args, **kwargs)
                              for f in fields(self)})

    @staticmethod
    def cat(states: list["CoarseState"]) -> "CoarseState":
        return CoarseState(**{f.name: None if getattr(states[0], f.name) is None
                              else torch.cat([getattr(s, f.name) for s in states]) for f in fields(CoarseState)})


def make_reuse(kind: str, dim: int, hidden: Optional[int] = None, eps: float = 1e-6) -> Optional[nn.Module]:
    """Feature reuse: LN + MLP(D→hidden→D) (paper; hidden 4D by default), LN + Linear (ablation), or none.

    As the authors' code, the hidden width and the LayerNorm eps follow the backbone's (3D and 1e-5 for
    LV-ViT-S, 4D and 1e-6 for DeiT-S).
    """
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(dim, eps=eps), Mlp(dim, hidden or 4 * dim, dim, act_layer=nn.GELU))
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim))
    if kind == "none":
        return None
    raise ValueError(f"unknown reuse {kind!r}; choose one of {REUSES}")


class CFViT(nn.Module):
    """Coarse-to-fine wrapper around a timm VisionTransformer with a class token.

    Args:
        vit: the backbone at the fine resolution (its patch grid must be 2 * coarse_grid).
        coarse_grid: side of the coarse patch grid (7 → CF-ViT, 9 → CF-ViT*).
        alpha: share of coarse patches re-split (k = ceil(alpha * Nc)).
        beta: EMA factor of the global class attention.
        gca_start_block: first block (0-based) whose class attention enters the EMA (default: the 4th, as the paper).
        selection: `gca | last | random | negative` (Table 4 ablation).
        reuse: `mlp | linear | none` (Table 5 ablation).
        split_all: training switch, re-split every patch (the early-epoch schedule).
        aux_head: add a token-labelling head (LV-ViT): logits = head(class token) + aux_weight × the per-class
            maximum of aux_head over the patch tokens.
        aux_weight: weight of the token-labelling term (LV-ViT's 0.25).
        logit_scaling: `paper` (both stages as above) or `official` (coarse logits also divided by
            1 + aux_weight, as the authors' LV-ViT code; only models with an aux head are affected).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        coarse_grid: Optional[int] = None,
        alpha: float = 0.5,
        beta: float = 0.99,
        gca_start_block: Optional[int] = None,
        selection: str = "gca",
        reuse: str = "mlp",
        split_all: bool = False,
        aux_head: bool = False,
        aux_weight: float = 0.25,
        logit_scaling: str = "paper",
    ):
        super().__init__()
        self._check_backbone(vit)
        fine_grid = vit.patch_embed.grid_size
        if fine_grid[0] != fine_grid[1] or fine_grid[0] % 2:
            raise ValueError(f"fine patch grid must be square and even, got {tuple(fine_grid)}")
        coarse_grid = coarse_grid or fine_grid[0] // 2
        if 2 * coarse_grid != fine_grid[0]:
            raise ValueError(
                f"coarse_grid={coarse_grid} needs a {2 * coarse_grid}x{2 * coarse_grid} fine grid, the backbone "
                f"has {fine_grid[0]}x{fine_grid[1]} (img_size {vit.patch_embed.img_size}): build it at "
                f"img_size={2 * coarse_grid * vit.patch_embed.patch_size[0]}"
            )
        if gca_start_block is None:
            gca_start_block = min(3, len(vit.blocks) - 1)  # the paper's 4th block
        if not 0 <= gca_start_block < len(vit.blocks):
            raise ValueError(f"gca_start_block must be in [0, {len(vit.blocks)}), got {gca_start_block}")
        if not 0.0 <= beta < 1.0:  # at β = 1 the EMA never leaves 0: every patch ties
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if selection not in c2f.SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; choose one of {c2f.SELECTIONS}")
        if logit_scaling not in LOGIT_SCALINGS:
            raise ValueError(f"unknown logit_scaling {logit_scaling!r}; choose one of {LOGIT_SCALINGS}")

        self.vit = apply_patch(vit)
        # The same patch embedding serves both resolutions.
        self.vit.patch_embed.strict_img_size = False
        self.coarse_grid = coarse_grid
        self.fine_grid = fine_grid[0]
        self.n_coarse = coarse_grid * coarse_grid
        self.img_size = int(vit.patch_embed.img_size[0])
        self.coarse_img_size = self.img_size // 2
        self.in_chans = int(getattr(vit.patch_embed, "in_chans", None) or vit.patch_embed.proj.in_channels)
        self.num_classes = vit.num_classes
        self.embed_dim = vit.embed_dim
        self.alpha = float(alpha)
        c2f.num_selected(self.n_coarse, alpha)  # validates alpha
        self.beta = float(beta)
        self.gca_start_block = gca_start_block
        self.selection = selection
        self.reuse_kind = reuse
        self.split_all = split_all
        self.generator: Optional[torch.Generator] = None  # for `random` selection
        # Independent coarse table, initialised from the fine one (so pretrained weights carry over).
        self.coarse_pos_embed = nn.Parameter(
            resample_abs_pos_embed(vit.pos_embed.detach().clone(), [coarse_grid, coarse_grid], num_prefix_tokens=1)
        )
        norm_eps = getattr(vit.norm, "eps", 1e-6)
        self.reuse = make_reuse(reuse, vit.embed_dim, hidden=vit.blocks[0].mlp.fc1.out_features, eps=norm_eps)
        self.aux_head: Optional[nn.Linear] = None
        if aux_head:
            self.aux_head = nn.Linear(vit.embed_dim, vit.num_classes)
            trunc_normal_(self.aux_head.weight, std=0.02)
            nn.init.zeros_(self.aux_head.bias)
        self.aux_weight = float(aux_weight)
        self.logit_scaling = logit_scaling
        self.model_name: Optional[str] = None  # set by the registry
        self.model_kwargs: dict = {}
        self.cfvit_config: dict = {}  # metadata from a checkpoint (class names, eta table, ...)

    @staticmethod
    def _check_backbone(vit) -> None:
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
        if vit.cls_token is None or vit.global_pool != "token":
            raise ValueError("CF-ViT needs a backbone with a class token and global_pool='token'")
        if vit.num_prefix_tokens != 1 or vit.no_embed_class or vit.pos_embed is None:
            raise ValueError(
                "CF-ViT supports backbones with one class token, no register tokens and a learned position "
                "embedding that covers the class token (no_embed_class=False)"
            )
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError("backbones built with dynamic_img_size=True are not supported")

    # ------------------------------------------------------------------ properties
    @property
    def k_selected(self) -> int:
        return c2f.num_selected(self.n_coarse, self.alpha)

    @property
    def n_fine(self) -> int:
        return c2f.num_fine_tokens(self.n_coarse, self.alpha)

    @property
    def data_config(self) -> dict:
        cfg = getattr(self.vit, "pretrained_cfg", None) or {}
        mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        if len(mean) != self.in_chans:
            mean, std = (sum(mean) / len(mean),) * self.in_chans, (sum(std) / len(std),) * self.in_chans
        return {
            "input_size": (self.in_chans, self.img_size, self.img_size),
            "mean": mean,
            "std": std,
            "interpolation": cfg.get("interpolation", "bicubic"),
            "crop_pct": cfg.get("crop_pct", 0.875),
            "crop_mode": cfg.get("crop_mode", "center"),
        }

    def no_weight_decay(self) -> set[str]:
        # Both position tables and the class token (the authors' code decayed pos-embeds by accident).
        return {"coarse_pos_embed", "vit.pos_embed", "vit.cls_token"}

    def set_inference(self, alpha: Optional[float] = None, beta: Optional[float] = None,
                      selection: Optional[str] = None) -> "CFViT":
        """Change α, β or the selection rule without retraining: they only steer which patches the fine stage
        re-splits (the weights do not depend on them). `cfvit.save` records the current values."""
        if alpha is not None:
            c2f.num_selected(self.n_coarse, alpha)  # validates
            self.alpha = float(alpha)
        if beta is not None:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"beta must be in [0, 1), got {beta}")
            self.beta = float(beta)
        if selection is not None:
            if selection not in c2f.SELECTIONS:
                raise ValueError(f"unknown selection {selection!r}; choose one of {c2f.SELECTIONS}")
            self.selection = selection
        return self

    # ------------------------------------------------------------------ inputs
    def check_input(self, images: torch.Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}) at the fine "
                             f"resolution, got {got}")

    def coarse_view(self, images: torch.Tensor) -> torch.Tensor:
        # As the authors' inference: bilinear, align_corners=True (2x2 pooling moves logits noticeably).
        return F.interpolate(images, size=(self.coarse_img_size,) * 2, mode="bilinear", align_corners=True)

    # ------------------------------------------------------------------ stages
    def _run_blocks(self, x: torch.Tensor, scores_from: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the shared blocks; from block `scores_from` on also fold the class attention into the EMA."""
        g = None
        for i, blk in enumerate(self.vit.blocks):
            if scores_from is not None and i >= scores_from:
                x, row = blk.forward_with_cls_attn(x)
                g = c2f.update_global_attention(g, row, self.beta)
            else:
                x = blk(x)
        return self.vit.norm(x), g

    def _with_cls(self, patches: torch.Tensor, pos_cls: torch.Tensor) -> torch.Tensor:
        cls = (self.vit.cls_token + pos_cls).expand(patches.shape[0], -1, -1)
        return self.vit.norm_pre(self.vit.pos_drop(torch.cat([cls, patches], dim=1)))

    def stage_logits(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        """Logits from the final-normed tokens of a stage (`coarse` or `fine`)."""
        logits = self.vit.forward_head(x)
        if self.aux_head is None:
            return logits
        divide = stage == "coarse" and self.logit_scaling == "official"
        return c2f.token_label_logits(logits, self.aux_head(x[:, 1:]), self.aux_weight, normalise=divide)

    def _scores_from(self) -> Optional[int]:
        if self.selection in ("gca", "negative"):
            return self.gca_start_block
        if self.selection == "last":
            return len(self.vit.blocks) - 1
        return None  # random needs no attention

    def coarse_stage(self, images: torch.Tensor, need_scores: bool = True) -> CoarseState:
        """Coarse pass on the image resized to the coarse grid."""
        embed = self.vit.patch_embed(self.coarse_view(images)) + self.coarse_pos_embed[:, 1:]
        x = self._with_cls(embed, self.coarse_pos_embed[:, :1])
        x, scores = self._run_blocks(x, self._scores_from() if need_scores else None)
        logits = self.stage_logits(x, "coarse")
        return CoarseState(logits=logits, tokens=x[:, 1:], embed=embed, scores=scores)

    def select(self, state: CoarseState) -> torch.Tensor:
        """Coarse indices (B, k) to re-split."""
        scores = state.scores
        if scores is None:
            scores = state.embed.new_zeros(state.embed.shape[:2], dtype=torch.float32)
            if self.selection != "random":
                raise ValueError(f"selection {self.selection!r} needs class-attention scores from the coarse stage")
        return c2f.select_patches(scores, self.k_selected, self.selection, self.generator)

    def fine_stage(
        self, images: torch.Tensor, state: CoarseState, split_all: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Fine pass: re-split the selected patches, add feature reuse, run the same blocks and head."""
        fine = self.vit.patch_embed(images) + self.vit.pos_embed[:, 1:]
        reuse = self.reuse(state.tokens) if self.reuse is not None else None
        if split_all:
            patches = fine if reuse is None else fine + c2f.upsample_reuse(reuse, self.coarse_grid)
            selected = None
        else:
            selected = self.select(state)
            patches = c2f.build_fine_tokens(fine, state.embed, reuse, selected, self.coarse_grid)
        x, _ = self._run_blocks(self._with_cls(patches, self.vit.pos_embed[:, :1]), None)
        return self.stage_logits(x, "fine"), selected

    # ------------------------------------------------------------------ entry points
    def forward(self, images: torch.Tensor, split_all: Optional[bool] = None) -> CFViTOutput:
        """Training forward: both stages on every sample."""
        self.check_input(images)
        split_all = self.split_all if split_all is None else split_all
        state = self.coarse_stage(images, need_scores=not split_all)
        fine_logits, _ = self.fine_stage(images, state, split_all=split_all)
        return CFViTOutput(coarse_logits=state.logits, fine_logits=fine_logits)

    @torch.no_grad()
    def infer(self, images: torch.Tensor, eta, return_indices: bool = False) -> InferenceOutput:
        """Early exit: a sample leaves after the coarse stage when its top softmax probability is >= eta.

        `eta` is a float or a (B,) tensor (one threshold per sample). The fine stage runs only on the
        samples that did not exit.
        """
        self.check_input(images)
        state = self.coarse_stage(images)
        coarse_logits = state.logits.float()
        exits = exit_mask(coarse_logits, eta)
        logits = coarse_logits.clone()
        hard = (~exits).nonzero().squeeze(1)
        selected = None
        if return_indices:
            selected = torch.full((images.shape[0], self.k_selected), -1, dtype=torch.long, device=images.device)
        if hard.numel():
            fine_logits, sel = self.fine_stage(images[hard], state[hard])
            logits[hard] = fine_logits.float()
            if return_indices:
                selected[hard] = sel
        return InferenceOutput(logits=logits, exit_stage=(~exits).long(), coarse_logits=coarse_logits,
                               selected=selected)

    # ------------------------------------------------------------------ cost
    def stage_gflops(self) -> dict[str, float]:
        """Per-image multiply-accumulates (G, fvcore convention) of the coarse and the fine stage."""
        macs = stage_macs(self)
        return {"coarse": macs["coarse"] / 1e9, "fine": macs["fine"] / 1e9}

    def expected_gflops(self, exit_fraction: float) -> float:
        """Average GFLOPs per image when `exit_fraction` of the images exit at the coarse stage."""
        return expected_gflops(self.stage_gflops(), exit_fraction)

    def backbone_gflops(self) -> float:
        """The plain backbone on every fine patch (the baseline CF-ViT is compared against)."""
        return stage_macs(self)["backbone"] / 1e9


def exit_mask(coarse_logits: torch.Tensor, eta) -> torch.Tensor:
    """True where the top coarse softmax probability is >= eta (float or per-sample tensor)."""
    conf = coarse_logits.float().softmax(dim=-1).amax(dim=-1)
    if isinstance(eta, torch.Tensor):
        eta = eta.to(device=conf.device, dtype=conf.dtype)
    return conf >= eta
