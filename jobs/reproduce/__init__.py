"""`cfvit reproduce`: the paper's claims in miniature on Fashion-MNIST.

- `recipe.py`    the shared recipe of every arm (config, data, `train_arm`)
- `evaluate.py`  predictions per stage, exact η points, the backbone match, throughput, selection ablation
- `report.py`    figures and RESULTS.md
- `run.py`       `reproduce(cfg, out_dir)`: all arms, results.json, MLflow
"""
from cfvit_common.lazy import lazy_exports

# Loaded on first use, so that this package's `cli.py` imports without torch or Ray.
__getattr__ = lazy_exports(__name__, {
    "ETAS": ".recipe",
    "EXIT_ETAS": ".recipe",
    "MODEL": ".recipe",
    "PAPER": ".recipe",
    "QUICK": ".recipe",
    "ReproConfig": ".recipe",
    "SELECTIONS": ".recipe",
    "eta_points": ".evaluate",
    "make_config": ".recipe",
    "match_backbone": ".evaluate",
    "measure_throughput": ".evaluate",
    "render_from_json": ".report",
    "render_markdown": ".report",
    "reproduce": ".run",
    "train_arm": ".recipe",
})
__all__ = ["ETAS", "EXIT_ETAS", "MODEL", "PAPER", "QUICK", "ReproConfig", "SELECTIONS", "eta_points", "make_config",
           "match_backbone", "measure_throughput", "render_from_json", "render_markdown", "reproduce", "train_arm"]
