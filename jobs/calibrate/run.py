"""Post-hoc calibration of a trained CF-ViT: the exact early-exit threshold η for each FLOPs budget, written
into the checkpoint's `config.json` (where serving reads it). The maths is `cfvit.calibration`; this module
fetches the checkpoint, streams the validation data, and writes the result: in place for a local folder, to
a new prefix beside an `s3://` checkpoint, to a new local folder for a registry one (`--register` adds a
new model version); a stored or registered checkpoint is never written over.

    cfvit calibrate --checkpoint PATH|s3://…|models:/NAME@ALIAS --budgets 1.5,2.0 | 40%,50%
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

import cfvit
from cfvit.budget import agreement_profile, parse_budgets
from cfvit.calibration import (
    BudgetResult,
    Variant,
    best_per_budget,
    eta_table_for,
    inference_settings,
    pick_adopted,
    record_probs,
    variants_from_probs,
)
from cfvit_common.checkpoints import checkpoint_kind, resolve_checkpoint, upload_checkpoint
from cfvit_common.manifests import new_version
from cfvit_common.ray_env import init_ray
from jobs.train.data import Source, builtin_arrays, describe, preprocess, read

DEFAULT_DATA = "fashion-mnist:test"


def eval_batch(batch: dict, data_config_json: str, num_classes: int) -> dict:
    """Rows (`image` uint8 arrays, or encoded `bytes`) + `label` → the eval transform serving uses too
    (`image` float32 C×H×W, `label`, `valid`): the training job's validation preprocessing."""

    return preprocess(batch, data_config_json, False, "{}", num_classes)


def validation_batches(uri: str | Source, data_config: dict, num_classes: int, *, class_names: Optional[Sequence[str]] = None,
                       limit: Optional[int] = None, batch_size: int = 256, fmt: str = "auto",
                       on_batch: Optional[Callable[[int], None]] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Eval-transformed validation batches from the URIs training takes: the built-in
    `fashion-mnist[:split]` in this process; `s3://…` or local ImageFolder / WebDataset through Ray Data
    (the training job's readers). Labels are the model's class indices, matched by name to `class_names`
    (`Source.matched_to`: a mismatch raises ClassMismatch, a ValueError, before anything is read). Unreadable
    images are skipped, as in training. `on_batch(n)`: called with each batch's number of rows read.
    A `Source` already matched (`data_source`) is read as it is."""
    dc = json.dumps(data_config, default=list)
    src = uri if isinstance(uri, Source) else data_source(uri, class_names, num_classes, fmt)
    if src.kind == "builtin":
        images, labels = builtin_arrays(src, "val", limit)
        batches = ({"image": list(images[i:i + batch_size]), "label": labels[i:i + batch_size]}
                   for i in range(0, len(labels), batch_size))
        rows = (eval_batch(b, dc, num_classes) for b in batches)
    else:
        init_ray(log_to_driver=False)
        ds = read(src, role="val", limit=limit).map_batches(
            eval_batch, fn_kwargs={"data_config_json": dc, "num_classes": num_classes}, batch_size=64,
            batch_format="numpy")
        rows = ds.iter_batches(batch_size=batch_size, batch_format="numpy")
    for batch in rows:
        if on_batch:
            on_batch(len(batch["valid"]))
        v = batch["valid"].astype(bool)
        if v.any():
            yield batch["image"][v], batch["label"][v]


def data_source(uri: str, class_names: Optional[Sequence[str]], num_classes: int, fmt: str = "auto",
                class_ids: Optional[Sequence[str]] = None) -> Source:
    """The validation data's layout, its classes matched to the model's by id (`class_ids`, e.g. ImageNet's
    WordNet IDs) or by name (jobs/train/classes.py)."""
    return describe(uri, fmt).matched_to(class_names, num_classes, class_ids=class_ids)


@dataclass
class LocalCheckpoint:
    path: Path  # directory with config.json + model.safetensors
    origin: str  # what the user passed
    kind: str  # local | s3 | mlflow


def fetch_checkpoint(ref: str, tracking_uri: Optional[str] = None) -> LocalCheckpoint:
    """A local directory for a local path, an `s3://bucket/prefix` or an MLflow model URI (cached)."""
    return LocalCheckpoint(resolve_checkpoint(ref, tracking_uri), ref, checkpoint_kind(ref))


def calibrated_prefix(uri: str) -> str:
    """A new `s3://` prefix beside `uri` for its calibrated copy: `<uri>-calibrated-<UTC time>-<random>`."""
    return f"{uri.rstrip('/')}-calibrated-{new_version()}"


def save_calibrated(model, path, variant: Variant, table: list[dict], calibration: dict) -> Path:
    """Write the model with the variant's α/β (so `cfvit.load` rebuilds it that way) and the η table."""
    saved = (model.alpha, model.beta, dict(model.model_kwargs))
    try:
        model.alpha, model.beta = variant.alpha, variant.beta
        if (variant.alpha, variant.beta) != (saved[0], saved[1]):  # rebuilt from model_kwargs by cfvit.load
            model.model_kwargs = {**model.model_kwargs, "alpha": variant.alpha, "beta": variant.beta}
        return cfvit.save(model, path, eta_table=table, calibration=calibration,
                          agreement_profile=agreement_profile(variant.curve))
    finally:
        model.alpha, model.beta = saved[0], saved[1]
        model.model_kwargs = saved[2]


# ---------------------------------------------------------------------------------------------- the step
@dataclass
class Calibration:
    checkpoint: LocalCheckpoint
    variants: list[Variant]
    results: list[BudgetResult]
    chosen: Variant  # the variant written (the model's own unless adopt_best)
    table: list[dict]
    written_to: Optional[str]
    backbone_gflops: float
    seconds: dict
    data: Optional[Source] = None  # the validation data, its classes matched to the model's (`matched`)

    def summary(self) -> dict:
        return {"checkpoint": self.checkpoint.origin, "written_to": self.written_to,
                "chosen": {"alpha": self.chosen.alpha, "beta": self.chosen.beta},
                "backbone_gflops": self.backbone_gflops, "eta_table": self.table,
                "budgets": [r.summary() for r in self.results],
                "variants": [{"alpha": v.alpha, "beta": v.beta, "coarse_top1": v.coarse_top1, "fine_top1": v.fine_top1,
                              "reachable_gflops": list(v.reachable), "stage_gflops": v.stage_gflops, "n": v.n}
                             for v in self.variants],
                "seconds": self.seconds,
                "data": None if self.data is None else {"uri": self.data.uri, "classes": self.data.classes,
                                                        "labels": self.data.labels, "matched": self.data.matched}}


def calibrate(checkpoint: str, budgets: str | Sequence[str], *, data: Optional[str] = None, limit: Optional[int] = None,
              alphas: Sequence[float] = (), betas: Sequence[float] = (), adopt_best: bool = False,
              write: bool = True, output: Optional[str] = None, tracking_uri: Optional[str] = None,
              batch_size: int = 256, device: str = "cpu", on_batch: Optional[Callable[[int], None]] = None
              ) -> Calibration:
    """Load, record probabilities (per α/β setting), choose η per budget, write the η table. The validation
    data's classes are matched by name to the checkpoint's `class_names` first (a mismatch raises
    ClassMismatch, a ValueError, with both lists). `on_batch(n)`: each validation batch's rows, as read."""
    t0 = time.perf_counter()
    ck = fetch_checkpoint(checkpoint, tracking_uri)
    model = cfvit.load(ck.path, map_location=device)
    backbone = float(model.backbone_gflops())
    parsed = parse_budgets(budgets, backbone)
    cfg = dict(model.cfvit_config)
    uri = data
    if uri is None and isinstance(cfg.get("data"), dict):  # the validation URI the model was trained with
        uri = cfg["data"].get("val")
    uri = uri or DEFAULT_DATA
    src = data_source(uri, cfg.get("class_names"), model.num_classes, class_ids=cfg.get("class_ids"))
    settings = inference_settings(model, alphas, betas)
    t1 = time.perf_counter()
    probs = record_probs(model, validation_batches(src, model.data_config, model.num_classes, limit=limit,
                                                   batch_size=batch_size, on_batch=on_batch), settings, device)
    t2 = time.perf_counter()
    variants = variants_from_probs(model, probs, settings, meta={"checkpoint": checkpoint})
    results = best_per_budget(variants, parsed)
    chosen = pick_adopted(variants, results) if adopt_best else variants[0]
    table = eta_table_for(chosen, parsed)
    t3 = time.perf_counter()
    written = None
    if write or output:
        info = {"data": uri, "classes_matched": src.matched, "images": chosen.n, "alpha": chosen.alpha, "beta": chosen.beta,
                "budgets": [b.spec for b in parsed],
                "infeasible": [r.summary() for r in best_per_budget([chosen], parsed) if not r.feasible]}
        if output:
            dst = Path(output)
        elif ck.kind != "local":  # never write into the download cache: a fresh local copy
            dst = Path(tempfile.mkdtemp(prefix="cfvit-calibrated-"))
        else:
            dst = ck.path
        save_calibrated(model, dst, chosen, table, info)
        if ck.kind == "s3" and not output:
            written = calibrated_prefix(ck.origin)  # beside the original, which stays as it was
            upload_checkpoint(dst, written)
        else:
            written = str(dst)
    seconds = {"load": t1 - t0, "validation_pass": t2 - t1, "calibration": t3 - t2}
    return Calibration(ck, variants, results, chosen, table, written, backbone, seconds, src)
