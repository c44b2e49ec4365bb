"""CF-ViT training loss (Eq. 14): CE(fine, y) + KL(coarse ‖ fine.detach()), and the one training step's
forward + loss that every trainer shares."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """CE against integer labels (with optional label smoothing) or soft targets (mixup/cutmix)."""
    if target.dim() == logits.dim():
        return SoftTargetCrossEntropy()(logits, target)
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)(logits, target)
    return F.cross_entropy(logits, target)


def coarse_distillation(coarse_logits: torch.Tensor, fine_logits: torch.Tensor) -> torch.Tensor:
    """KLDiv(batchmean)(log_softmax(coarse), softmax(fine).detach()): the coarse stage mimics the fine one."""
    return F.kl_div(
        F.log_softmax(coarse_logits.float(), dim=-1),
        F.softmax(fine_logits.detach().float(), dim=-1),
        reduction="batchmean",
    )


# The coarse loss's name among a step's loss parts (and `train_<name>` among the epoch metrics): the paper's
# CE+CE ablation must not overwrite the fine stage's "ce" with the coarse one.
COARSE_PART = {"kl": "kl", "ce": "coarse_ce"}


def cfvit_loss(
    coarse_logits: torch.Tensor,
    fine_logits: torch.Tensor,
    target: torch.Tensor,
    coarse_loss: str = "kl",
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts ({"ce": the fine stage's, COARSE_PART[coarse_loss]: the coarse stage's}).
    `coarse_loss="ce"` is the paper's CE+CE ablation (Eq. 15)."""
    ce = classification_loss(fine_logits, target, smoothing)
    if coarse_loss == "kl":
        aux = coarse_distillation(coarse_logits, fine_logits)
    elif coarse_loss == "ce":
        aux = classification_loss(coarse_logits, target, smoothing)
    else:
        raise ValueError(f"coarse_loss must be 'kl' or 'ce', got {coarse_loss!r}")
    loss = ce + aux
    return loss, {"ce": float(ce.detach()), COARSE_PART[coarse_loss]: float(aux.detach())}


@dataclass
class StepLoss:
    """The loss of one training step, its parts, and the logits it came from."""

    loss: torch.Tensor
    parts: dict[str, float]
    logits: torch.Tensor  # the fine logits (CF-ViT) or the backbone's
    coarse_logits: Optional[torch.Tensor] = None


def step_loss(model, images: torch.Tensor, target: torch.Tensor, *, split_all: Optional[bool] = None,
              coarse_loss: str = "kl", smoothing: float = 0.0, backbone_only: bool = False) -> StepLoss:
    """Forward and loss of one training step — the one every trainer here uses (the Ray Train worker, the
    paper reproduction, the step benchmark). `model` is a CFViT or anything that calls one (a DeepSpeed
    engine); `backbone_only` trains its plain ViT (`model.vit`) with the classification loss alone.

    Logits are cast to float32 before the loss: under bf16 (autocast, or a bf16 DeepSpeed engine) the
    softmax, cross-entropy and KL are still computed in fp32."""
    if backbone_only:
        logits = model.vit(images).float()
        ce = classification_loss(logits, target, smoothing)
        return StepLoss(ce, {"ce": float(ce.detach())}, logits)
    out = model(images, split_all=split_all)
    coarse, fine = out.coarse_logits.float(), out.fine_logits.float()
    loss, parts = cfvit_loss(coarse, fine, target, coarse_loss=coarse_loss, smoothing=smoothing)
    return StepLoss(loss, parts, fine, coarse)
