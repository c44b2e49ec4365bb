"""A model registry in timm's style: `@register_model` entrypoints, `create_model(name, **overrides)`."""
import warnings
from typing import Callable

_model_entrypoints: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    name = fn.__name__
    if name in _model_entrypoints:
        # as timm: the later registration wins, but say so (two modules defining one name is usually a mistake)
        warnings.warn(f"Overwriting {name} in the cfvit registry with {fn.__module__}.{name}: the name is "
                      f"already registered by {_model_entrypoints[name].__module__}.", stacklevel=2)
    _model_entrypoints[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_model_entrypoints)


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def create_model(name: str, **overrides):
    """Build a registered CF-ViT. Overrides go to the entrypoint (CF-ViT and backbone arguments alike)."""
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _model_entrypoints[name](**overrides)
    model.model_name = name
    model.model_kwargs = dict(overrides)
    model.model_kwargs.pop("checkpoint_path", None)  # weights are loaded once, not on every rebuild
    return model
