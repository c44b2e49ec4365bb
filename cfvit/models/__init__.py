"""Registered CF-ViT models (importing this module registers them)."""
from . import cfvit_deit, cfvit_lvvit  # noqa: F401
