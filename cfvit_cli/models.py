"""`cfvit models` (the registered models, or one checkpoint's facts) and `cfvit import-official` (the
authors' released checkpoints): the library's own commands.

Only typer and rich are imported at module level: torch and timm load when a command runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Column, Table

from cfvit_common.tables import compact_table

app = typer.Typer()


@app.command("models")
def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show one model's stage costs."),
    set_: list[str] = typer.Option([], "--set", help="Override a constructor argument, e.g. coarse_grid=9."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Instead: one checkpoint's facts (folder, "
                                             "s3://… or models:/…): stage costs, its calibration and, for an "
                                             "imported model, where it came from and the published results."),
):
    """List the registered models with their per-image GFLOPs (coarse, fine, backbone)."""
    from cfvit import create_model, list_models
    from jobs.train.config import ConfigError, parse_set

    if checkpoint:
        _describe_checkpoint(checkpoint)
        return
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


@app.command("import-official")
def import_official_cmd(
    path: Path = typer.Argument(..., help="The authors' checkpoint (.pth, read weights-only; or .safetensors)."),
    model: str = typer.Option(..., "--model", help="cfvit_deit_small_patch16_224 or cfvit_lvvit_small (or their "
                                                   "names cf_deit_small, cf_lvvit_small)."),
    coarse_grid: Optional[int] = typer.Option(None, "--coarse-grid", help="7 or 9 (CF-ViT*); default: read from "
                                                                           "the checkpoint, a mismatch is refused."),
    out: Path = typer.Option(..., "--out", help="Folder for the cfvit checkpoint (model.safetensors + config.json)."),
):
    """Import one of the CF-ViT authors' released checkpoints as a cfvit checkpoint, with its provenance."""
    from cfvit.checkpoint import CheckpointError
    from cfvit.official import import_official

    try:
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        info = import_official(path, model, out, coarse_grid)
    except (CheckpointError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    g = info["stage_gflops"]
    console = Console()
    console.print(f"imported {path.name} (sha256 {info['sha256'][:16]}…) as {info['model_name']}, "
                  f"{info['coarse_grid']}x{info['coarse_grid']} coarse grid → {info['path']}", soft_wrap=True)
    console.print(f"GFLOPs per image: coarse {g['coarse']:.2f}, fine {g['fine']:.2f}, both "
                  f"{g['coarse'] + g['fine']:.2f}", highlight=False)
    _print_provenance(info["provenance"], console)
    console.print(f"next: cfvit calibrate --checkpoint {info['path']} --data VALIDATION_FOLDER --budgets 40%,60%\n"
                  f"      cfvit serve --checkpoint {info['path']}", soft_wrap=True, highlight=False)


def _describe_checkpoint(uri: str) -> None:
    import cfvit
    from cfvit_common.checkpoints import resolve_checkpoint

    try:
        model = cfvit.load(str(resolve_checkpoint(uri)))
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    cfg, g, console = model.cfvit_config, model.stage_gflops(), Console()
    console.print(f"{uri}: {cfg.get('model_name')}, {model.coarse_grid}x{model.coarse_grid} coarse grid, "
                  f"{model.num_classes} classes, input {model.img_size} px", soft_wrap=True, highlight=False)
    console.print(f"GFLOPs per image: coarse {g['coarse']:.3f}, fine {g['fine']:.3f}, both "
                  f"{g['coarse'] + g['fine']:.3f}, backbone {model.backbone_gflops():.3f}", highlight=False)
    table = cfg.get("eta_table") or []
    if table:
        t = compact_table("budget GFLOPs", "η", "top-1", "GFLOPs", "exits", title="this project's calibration")
        for p in table:
            t.add_row(f"{p['budget_gflops']:.3f}", f"{p['eta']:.4g}", f"{100 * p['accuracy']:.1f}%",
                      f"{p['gflops']:.3f}", f"{100 * p['exit_fraction']:.0f}%")
        console.print(t)
    else:
        console.print("not calibrated here yet (cfvit calibrate --checkpoint … --data … --budgets …)")
    if cfg.get("provenance"):
        _print_provenance(cfg["provenance"], console)


def _print_provenance(prov: dict, console: Console) -> None:
    """Where an imported model came from, its own figures, and the results the authors publish."""
    console.print(f"source: {prov.get('repository')} ({prov.get('official_model')}, {prov.get('file')}, "
                  f"sha256 {str(prov.get('sha256'))[:16]}…)", soft_wrap=True, highlight=False)
    if prov.get("flop") or prov.get("anytime_classification"):
        console.print(f"their checkpoint's figures: GFLOPs per exit stage {prov.get('flop')}, top-1 per stage "
                      f"{prov.get('anytime_classification')}", soft_wrap=True, highlight=False)
    rows = prov.get("published") or []
    if rows:
        t = compact_table("η", "GFLOPs", "top-1", "source", title="published (ImageNet-1k val)")
        for r in rows:
            t.add_row(f"{r['eta']:g}", "—" if r["gflops"] is None else f"{r['gflops']:.1f}", f"{r['top1']:.1f}%",
                      r["source"])
        console.print(t)
