"""CLI plugin: `cfvit submit …` (Ray job submission) and `cfvit shards …` (ImageFolder → WebDataset).

`cfvit/cli.py` imports this module and calls :func:`register`. Only typer is imported at module level;
Ray is imported inside the command bodies so `cfvit --help` stays fast.
"""
from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add the cluster commands to the root app (``bench`` is unused: these are not benchmarks)."""
    from jobs import shards, submit

    app.add_typer(submit.app, name="submit", help="Submit, follow, stop and list jobs on a Ray cluster.")
    app.command("shards", help="Convert an ImageFolder tree (local or s3://) into WebDataset .tar shards.")(
        shards.shards_cmd
    )
