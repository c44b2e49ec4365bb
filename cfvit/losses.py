"""CF-ViT training loss (Eq. 14): CE(fine, y) + KL(coarse ‖ fine.detach())."""
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


def cfvit_loss(
    coarse_logits: torch.Tensor,
    fine_logits: torch.Tensor,
    target: torch.Tensor,
    coarse_loss: str = "kl",
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. `coarse_loss="ce"` is the paper's CE+CE ablation (Eq. 15)."""
    ce = classification_loss(fine_logits, target, smoothing)
    if coarse_loss == "kl":
        aux = coarse_distillation(coarse_logits, fine_logits)
    elif coarse_loss == "ce":
        aux = classification_loss(coarse_logits, target, smoothing)
    else:
        raise ValueError(f"coarse_loss must be 'kl' or 'ce', got {coarse_loss!r}")
    loss = ce + aux
    return loss, {"ce": float(ce.detach()), coarse_loss: float(aux.detach())}
