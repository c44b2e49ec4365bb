"""The `cfvit` command: a root that adds each package's own commands.

Each package owns its verbs in its `cli.py` (`jobs/train/cli.py`, `serve/cli.py`, `benchmarks/cli.py`, …),
which imports only typer and rich at module level and loads its job when a command runs: `cfvit --help`
answers at once, without torch or Ray.
"""
from __future__ import annotations

from typing import Optional, Sequence

import typer

from benchmarks.cli import app as bench_app
from jobs.calibrate.cli import app as calibrate_app
from jobs.ops.cli import app as ops_app
from jobs.pipeline.cli import app as pipeline_app
from jobs.reproduce.cli import app as reproduce_app
from jobs.train.cli import app as train_app
from jobs.tune.cli import app as tune_app
from serve.cli import app as serve_app

from .models import app as models_app

app = typer.Typer(help="CF-ViT: coarse-to-fine vision transformer — train, tune, calibrate and serve on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# in the order `cfvit --help` lists them
for group in (models_app, train_app, tune_app, calibrate_app, ops_app, pipeline_app, reproduce_app, serve_app):
    app.add_typer(group)
app.add_typer(bench_app, name="bench")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `cfvit` console script (and of `python -m cfvit_cli`)."""
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
