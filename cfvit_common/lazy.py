"""Package-level names that load their module on first use (PEP 562).

A package's `cli.py` must import without torch, Ray or MLflow (`cfvit --help` answers at once), yet its
`__init__` keeps the short public names (`from jobs.train import run_training`). With
`__getattr__ = lazy_exports(__name__, {"run_training": ".driver"})`, importing the package loads nothing
else; the first use of a name imports its module.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict


def lazy_exports(package: str, names: Dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `names[name]` (a module, relative to `package`) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name], package), name)

    return __getattr__
