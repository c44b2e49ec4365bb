"""Result tables that fit an 80-column terminal: no box verticals, one space of padding between columns,
cells never wrapped (a row label or a number cut in two reads as something else)."""
from __future__ import annotations

from typing import Optional

from rich import box
from rich.table import Column, Table


def compact_table(*headers: str, title: Optional[str] = None) -> Table:
    cols = [Column(h, no_wrap=True, justify="left" if i == 0 else "right") for i, h in enumerate(headers)]
    return Table(*cols, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True,
                 title=title, title_justify="left")
