"""`cfvit reproduce`: the paper's claims in miniature on Fashion-MNIST.

- `recipe.py`    the shared recipe of every arm (config, data, `train_arm`)
- `evaluate.py`  predictions per stage, exact η points, the backbone match, throughput, selection ablation
- `report.py`    figures and RESULTS.md
- `run.py`       `reproduce(cfg, out_dir)`: all arms, results.json, MLflow
"""
from .evaluate import eta_points, match_backbone, measure_throughput
from .recipe import ETAS, EXIT_ETAS, MODEL, PAPER, QUICK, SELECTIONS, ReproConfig, make_config, train_arm
from .report import render_from_json, render_markdown
from .run import reproduce

__all__ = ["ETAS", "EXIT_ETAS", "MODEL", "PAPER", "QUICK", "ReproConfig", "SELECTIONS", "eta_points", "make_config",
           "match_backbone", "measure_throughput", "render_from_json", "render_markdown", "reproduce", "train_arm"]
