"""The `cfvit` command line. Library commands live here; `jobs/` and `serve/` add theirs as plugins
(each plugin module has `register(app, bench)` and imports Ray only inside its commands)."""
import importlib
import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="CF-ViT: coarse-to-fine vision transformer — train, tune, calibrate and serve on Ray.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench = typer.Typer(help="Benchmarks that print a table.", no_args_is_help=True)
app.add_typer(bench, name="bench")
console = Console()

def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


PLUGINS = ("jobs.cli_train", "jobs.cli_tune", "jobs.cli_cluster", "jobs.cli_pipeline", "jobs.cli_reproduce", "serve.cli")


@app.command("models")
def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show one model's stage costs."),
    set_: list[str] = typer.Option([], "--set", help="Override a constructor argument, e.g. coarse_grid=9."),
):
    """List the registered models with their per-image GFLOPs (coarse, fine, backbone)."""
    from . import create_model, list_models

    table = Table("model", "coarse grid", "N_f", "coarse GFLOPs", "fine GFLOPs", "both", "backbone GFLOPs")
    overrides = _parse_sets(set_)
    for n in [name] if name else list_models():
        try:
            m = create_model(n, **overrides)
        except (ValueError, TypeError) as e:
            raise typer.BadParameter(str(e)) from None
        g = m.stage_gflops()
        table.add_row(n, f"{m.coarse_grid}x{m.coarse_grid}", str(m.n_fine), f"{g['coarse']:.3f}", f"{g['fine']:.3f}",
                      f"{g['coarse'] + g['fine']:.3f}", f"{m.backbone_gflops():.3f}")
    console.print(table)


@bench.command("throughput")
def bench_throughput(
    model: str = typer.Option("cfvit_deit_small_patch16_224", help="Registered model name."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    batches: int = typer.Option(10, help="Batches in the timed stream."),
    device: str = typer.Option("cuda" if _has_cuda() else "cpu", help="cpu or cuda."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone and both stages."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
):
    """Images/s of the backbone vs CF-ViT at exit fractions 0, .25, .5, .76, 1 (with the ideal ratio)."""
    from .bench import throughput

    res = throughput(model, batch_size=batch_size, n_batches=batches, device=device, bf16=bf16, compile=compile)
    s = res["settings"]
    table = Table("", "exit", "η", "img/s", "GFLOPs", "speed-up", "FLOPs ratio", "ideal", "of ideal",
                  title=f"{model} · batch {batch_size} × {batches} · {s['device_name']} · "
                        f"{'bf16' if bf16 else 'fp32'} · {'compiled' if compile else 'eager'}")
    for r in res["rows"]:
        table.add_row(r.name, "" if r.exit_fraction is None else f"{r.exit_fraction:.2f}",
                      "" if r.eta is None else f"{r.eta:.4g}", f"{r.images_per_s:,.1f}", f"{r.gflops:.2f}",
                      f"{r.speedup:.2f}x", f"{r.flops_ratio:.2f}x",
                      "" if r.ideal_speedup is None else f"{r.ideal_speedup:.2f}x",
                      "" if r.of_ideal is None else f"{r.of_ideal:.2f}")
    console.print(table)
    st = res["stages"]
    console.print(f"coarse stage alone: {st['coarse_images_per_s']:,.1f} img/s with the class-attention row "
                  f"(SDPA), {st['coarse_naive_images_per_s']:,.1f} img/s materialising every attention matrix "
                  f"({st['coarse_images_per_s'] / st['coarse_naive_images_per_s']:.2f}x); fine stage alone: "
                  f"{st['fine_images_per_s']:,.1f} img/s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({**res, "rows": [r.__dict__ | {"of_ideal": r.of_ideal} for r in res["rows"]]}, f, indent=2)


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _register_plugins() -> None:
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name.startswith(e.name) or e.name == name):
                continue  # that part of the project is not installed
            raise
        module.register(app, bench)


def main() -> None:
    _register_plugins()
    app()


if __name__ == "__main__":
    main()
