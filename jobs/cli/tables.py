"""Result tables that fit an 80-column terminal: no box verticals, one space of padding between columns,
cells never wrapped (a row label or a number cut in two reads as something else)."""
from __future__ import annotations

from typing import Optional


def compact_table(*headers: str, title: Optional[str] = None):
    from rich import box
    from rich.table import Column, Table

    cols = [Column(h, no_wrap=True, justify="left" if i == 0 else "right") for i, h in enumerate(headers)]
    return Table(*cols, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True,
                 title=title, title_justify="left")


def throughput_table(res: dict, model: str, batch_size: int, batches: int, bf16: bool, compile: bool):
    """`cfvit bench throughput`: one row for the backbone, one per exit fraction of CF-ViT."""
    s = res["settings"]
    table = compact_table("", "exit", "η", "img/s", "GFLOPs", "speed-up", "FLOPs×", "ideal", "of ideal",
                          title=f"{model} · batch {batch_size} × {batches} · {'bf16' if bf16 else 'fp32'} · "
                                f"{'compiled' if compile else 'eager'}\n{s['device_name']}")
    for r in res["rows"]:
        table.add_row("CF-ViT" if r.exit_fraction is not None else r.name,
                      "" if r.exit_fraction is None else f"{r.exit_fraction:.2f}",
                      "" if r.eta is None else f"{r.eta:.4g}", f"{r.images_per_s:,.1f}", f"{r.gflops:.2f}",
                      f"{r.speedup:.2f}x", f"{r.flops_ratio:.2f}x",
                      "" if r.ideal_speedup is None else f"{r.ideal_speedup:.2f}x",
                      "" if r.of_ideal is None else f"{r.of_ideal:.2f}")
    return table
