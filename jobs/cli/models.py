"""`cfvit models` and `cfvit bench throughput` (the library's own commands)."""
from __future__ import annotations

import json
from typing import Optional

import typer


def parse_sets(items: list[str]) -> dict:
    """`--set key=value` items (YAML-typed values) → a dict; the one parser for every verb."""
    from jobs.train.config import ConfigError, parse_set

    try:
        return parse_set(items)
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("models")(models_cmd)
    bench.command("throughput")(bench_throughput)


def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show one model's stage costs."),
    set_: list[str] = typer.Option([], "--set", help="Override a constructor argument, e.g. coarse_grid=9."),
):
    """List the registered models with their per-image GFLOPs (coarse, fine, backbone)."""
    from rich import box
    from rich.console import Console
    from rich.table import Column, Table

    from cfvit import create_model, list_models

    overrides = parse_sets(set_)
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


def bench_throughput(
    model: str = typer.Option("cfvit_deit_small_patch16_224", help="Registered model name."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    batches: int = typer.Option(10, help="Batches in the timed stream."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (cuda when available)."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone and both stages."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
):
    """Images/s of the backbone vs CF-ViT at exit fractions 0, .25, .5, .76, 1 (with the ideal ratio)."""
    import torch
    from rich.console import Console

    from benchmarks.throughput import throughput

    from .tables import throughput_table

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    res = throughput(model, batch_size=batch_size, n_batches=batches, device=device, bf16=bf16, compile=compile)
    table = throughput_table(res, model, batch_size, batches, bf16, compile)
    console = Console()
    console.print(table)
    st = res["stages"]
    console.print(f"coarse stage alone: {st['coarse_images_per_s']:,.1f} img/s with the class-attention row "
                  f"(SDPA), {st['coarse_naive_images_per_s']:,.1f} img/s materialising every attention matrix "
                  f"({st['coarse_images_per_s'] / st['coarse_naive_images_per_s']:.2f}x); fine stage alone: "
                  f"{st['fine_images_per_s']:,.1f} img/s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({**res, "rows": [r.__dict__ | {"of_ideal": r.of_ideal} for r in res["rows"]]}, f, indent=2)
