"""cfvit: the CF-ViT coarse-to-fine vision transformer (pure PyTorch + timm; no Ray)."""
import timm

from . import budget, calibration, losses, official
from . import models as _models  # noqa: F401  (registers the models)
from .checkpoint import CheckpointError, load, load_backbone_weights, save
from .model import CFViT, CFViTOutput, CoarseState, InferenceOutput
from .official import from_official
from .patch import apply_patch
from .registry import create_model, is_model, list_models, register_model

__version__ = "0.1.0"


def from_timm(model_or_name, coarse_grid=None, alpha: float = 0.5, beta: float = 0.99, gca_start_block=None,
              selection: str = "gca", reuse: str = "mlp", **timm_kwargs) -> CFViT:
    """Wrap a timm VisionTransformer (an instance, or a timm model name built without weights) as CF-ViT."""
    if isinstance(model_or_name, str):
        timm_kwargs.setdefault("pretrained", False)
        model_or_name = timm.create_model(model_or_name, **timm_kwargs)
    return CFViT(model_or_name, coarse_grid=coarse_grid, alpha=alpha, beta=beta, gca_start_block=gca_start_block,
                 selection=selection, reuse=reuse)


__all__ = ["CFViT", "CFViTOutput", "CoarseState", "InferenceOutput", "CheckpointError", "apply_patch", "budget",
           "calibration", "create_model", "from_official", "from_timm", "is_model", "list_models", "load",
           "load_backbone_weights", "losses", "official", "register_model", "save"]
