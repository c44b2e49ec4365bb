"""`cfvit reproduce` (also `python -m jobs.reproduce`): the paper's claims in miniature on Fashion-MNIST.

Only typer is imported at module level: the run loads when the command runs, so `cfvit --help` answers
at once.
"""
from __future__ import annotations

import shlex
import sys
from typing import Optional

import typer

app = typer.Typer()


@app.command("reproduce")
def reproduce_cmd(
    quick: bool = typer.Option(False, "--quick", help="Minutes: small subset, tiny model, 1 epoch (mechanics only)."),
    gpu_recipe: bool = typer.Option(False, "--gpu-recipe", help="One CUDA GPU: 60k images, 100 epochs, batch 1024, "
                                    "both arms + --full, batched transforms (other options still override)."),
    model: Optional[str] = typer.Option(None, "--model", help="cfvit_tiny32_fmnist (default: 32 px, 8x8 fine / 4x4 "
                                        "coarse) or cfvit_tiny_fmnist (56 px, 14x14 / 7x7: DeiT-S's 196 / 49 tokens)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default) or cuda (bf16 autocast)."),
    loader_workers: Optional[int] = typer.Option(None, "--loader-workers",
                                                 help="DataLoader processes for the transforms (default 0)."),
    batched_transforms: Optional[bool] = typer.Option(None, "--batched-transforms/--per-image-transforms",
                                                      help="timm's train transform on whole batches in numpy "
                                                           "(for a GPU run) or per image with PIL (default)."),
    full: bool = typer.Option(False, "--full", help="Also retrain the reuse (mlp/linear/none) and loss (CE+CE) ablations."),
    out: str = typer.Option("docs", "--out", help="Folder for RESULTS.md, results.json and figures/."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs of every arm."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Training images (default or 0: all 60k)."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="Test images (default or 0: all 10k)."),
    embed_dim: Optional[int] = typer.Option(None, "--embed-dim"),
    depth: Optional[int] = typer.Option(None, "--depth"),
    num_heads: Optional[int] = typer.Option(None, "--num-heads"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate of every arm."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db."),
    note: Optional[str] = typer.Option(None, "--note", help="A sentence for RESULTS.md (e.g. why the run was downsized)."),
):
    """Train the backbone and CF-ViT with one recipe, evaluate, write docs/RESULTS.md + results.json + figures."""
    from .recipe import make_config
    from .run import reproduce

    try:
        cfg = make_config(quick, full, gpu_recipe, epochs=epochs, seed=seed, train_limit=train_limit, test_limit=test_limit,
                          embed_dim=embed_dim, depth=depth, num_heads=num_heads, batch_size=batch_size, lr=lr,
                          model=model, device=device, loader_workers=loader_workers,
                          batched_transforms=batched_transforms)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            typer.echo("error: --device cuda (or --gpu-recipe) but torch sees no CUDA device here", err=True)
            raise typer.Exit(2)
    command = "cfvit " + " ".join(map(shlex.quote, sys.argv[1:]))
    res = reproduce(cfg, out, tracking_uri=tracking_uri, command=command, note=note)
    ff = res["flops_fraction_at_backbone_accuracy"]
    typer.echo(f"backbone top-1 {res['backbone']['top1']:.4f}; CF-ViT fine top-1 {res['cfvit']['fine_top1']:.4f}; "
               f"FLOPs fraction at the backbone's accuracy: {'none reached' if ff is None else f'{ff:.3f}'}; "
               f"selection {res['ablations']['selection']}; wrote {out}/RESULTS.md")
