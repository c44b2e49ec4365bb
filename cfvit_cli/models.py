"""`cfvit models`: the registered models and their stage costs (the library's own command).

Only typer and rich are imported at module level: torch and timm load when the command runs.
"""
from __future__ import annotations

from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table

app = typer.Typer()


@app.command("models")
def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show one model's stage costs."),
    set_: list[str] = typer.Option([], "--set", help="Override a constructor argument, e.g. coarse_grid=9."),
):
    """List the registered models with their per-image GFLOPs (coarse, fine, backbone)."""
    from cfvit import create_model, list_models
    from jobs.train.config import ConfigError, parse_set

    try:
        overrides = parse_set(set_)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    names = [name] if name else list_models()
    # Names and figures are never cut: no vertical rules, and the name column as wide as the longest name.
    num = dict(justify="right", no_wrap=True)
    table = Table(Column("model", no_wrap=True, min_width=max(len(n) for n in names)),
                  *[Column(h, min_width=len(h), **num) for h in ("grid", "N_f", "coarse", "fine", "both", "backbone")],
                  box=box.SIMPLE_HEAD, pad_edge=False,
                  title="GFLOPs per image (coarse stage, fine stage, both, plain backbone)",
                  caption="grid: coarse patch grid; N_f: tokens of the fine stage")
    for n in names:
        try:
            m = create_model(n, **overrides)
        except (ValueError, TypeError) as e:
            raise typer.BadParameter(str(e)) from None
        g = m.stage_gflops()
        table.add_row(n, f"{m.coarse_grid}x{m.coarse_grid}", str(m.n_fine), f"{g['coarse']:.3f}", f"{g['fine']:.3f}",
                      f"{g['coarse'] + g['fine']:.3f}", f"{m.backbone_gflops():.3f}")
    Console().print(table)
