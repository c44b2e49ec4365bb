"""The `cfvit` command: one typer app for every verb.

Each module here adds its verbs with `register(app, bench)` and imports only typer and rich at module
level — torch, Ray, MLflow and the job modules load inside the command that needs them, so
`cfvit --help` answers at once.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

import typer

app = typer.Typer(help="CF-ViT: coarse-to-fine vision transformer — train, tune, calibrate and serve on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench = typer.Typer(help="Benchmarks that print a table.", no_args_is_help=True)
app.add_typer(bench, name="bench")

# the modules of jobs/cli that add verbs, in the order `cfvit --help` lists them
COMMAND_MODULES = ("models", "train", "tune", "cluster", "pipeline", "reproduce", "serve")
_registered = False


def register_all() -> typer.Typer:
    """Add every verb to `app` (once) and return it."""
    global _registered
    if not _registered:
        for name in COMMAND_MODULES:
            importlib.import_module(f"{__name__}.{name}").register(app, bench)
        _registered = True
    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `cfvit` console script (and of `python -m jobs.cli`, `python -m jobs.train`)."""
    register_all()
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
