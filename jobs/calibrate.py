"""Post-hoc calibration of a trained CF-ViT: the exact early-exit threshold η for each FLOPs budget.

One validation pass with η > 1 (every image goes through both stages) records the coarse and the fine
class probabilities; `cfvit.budget` then gives the exact accuracy and expected GFLOPs of every distinct η,
and for each budget the most accurate η that fits. α (share of patches re-split) and β (EMA of the class
attention) only act at inference, so other values are evaluated from the same weights, without retraining
(`alphas=` / `betas=`). The η table is written into the checkpoint's `config.json` (where serving reads it).

    cfvit calibrate --checkpoint PATH|s3://…|models:/NAME@ALIAS --budgets 1.5,2.0 | 40%,50%
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

ETA_ALL_FINE = 2.0  # > 1: no sample exits, both stages run on every image
DEFAULT_DATA = "fashion-mnist:test"


class BudgetSpecError(ValueError):
    """A budget string that cannot be read."""


# ---------------------------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    spec: str  # as the user wrote it ("2.0", "40%")
    gflops: float
    percent: Optional[float] = None  # of the backbone, for "%" budgets

    @property
    def label(self) -> str:
        return f"{self.spec} ({self.gflops:.3f} GFLOPs)" if self.percent is not None else f"{self.gflops:g} GFLOPs"


def parse_budgets(text: str | Sequence[str], backbone_gflops: Optional[float] = None) -> list[Budget]:
    """`"1.5,2.0"` (GFLOPs per image) or `"40%,50%"` (of the backbone's GFLOPs); a list of items works too."""
    items = [s for part in ([text] if isinstance(text, str) else list(text)) for s in str(part).split(",")]
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise BudgetSpecError("no budgets given: expected e.g. 1.5,2.0 (GFLOPs per image) or 40%,50% (of the backbone)")
    out = []
    for item in items:
        is_pct = item.endswith("%")
        raw = item[:-1].strip() if is_pct else item
        low = raw.lower()
        for suffix in ("gflops", "g"):  # "2.0GFLOPs" / "2g" are fine
            if not is_pct and low.endswith(suffix):
                raw = raw[: -len(suffix)].strip()
                break
        try:
            value = float(raw)
        except ValueError:
            raise BudgetSpecError(f"budget {item!r} is not a number of GFLOPs (e.g. 2.0) or a percentage of the "
                                  f"backbone (e.g. 50%)") from None
        if not math.isfinite(value) or value <= 0:
            raise BudgetSpecError(f"budget {item!r} must be a positive, finite number")
        if is_pct:
            if backbone_gflops is None:
                raise BudgetSpecError(f"budget {item!r} is relative to the backbone, whose GFLOPs are unknown here")
            out.append(Budget(item, value / 100.0 * float(backbone_gflops), value))
        else:
            out.append(Budget(item, value))
    return out


def parse_floats(text: Optional[str], name: str, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> list[float]:
    """`"0.3,0.5"` → [0.3, 0.5], each in [lo, hi] (open at either end with lo_open / hi_open)."""
    if text is None or not str(text).strip():
        return []
    out = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            v = float(item)
        except ValueError:
            raise BudgetSpecError(f"{name}: {item!r} is not a number") from None
        if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise BudgetSpecError(f"{name}: {v} is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
        out.append(v)
    return out


# ---------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One (α, β) setting of one model and its exact accuracy–GFLOPs curve over η."""

    alpha: float
    beta: float
    curve: object  # cfvit.budget.EtaCurve
    stage_gflops: dict
    coarse_top1: float
    fine_top1: float
    n: int
    source: str = ""  # which model (trial id, checkpoint path)
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        base = f"α={self.alpha:g} β={self.beta:g}"
        return f"{self.source} {base}" if self.source else base

    @property
    def reachable(self) -> tuple[float, float]:
        return float(self.curve.gflops.min()), float(self.curve.gflops.max())


@dataclass
class BudgetResult:
    budget: Budget
    variant: Optional[Variant]  # None: infeasible
    eta: Optional[float] = None
    accuracy: Optional[float] = None
    gflops: Optional[float] = None
    exit_fraction: Optional[float] = None
    reachable: tuple[float, float] = (math.nan, math.nan)
    note: str = ""  # "" | "infeasible: reachable a–b GFLOPs" | "above every operating point …"
    message: str = ""  # the full sentence for logs

    @property
    def feasible(self) -> bool:
        return self.variant is not None

    def row(self) -> dict:
        """A row of the checkpoint's η table (the keys serving reads) plus where it came from."""
        return {"budget_gflops": self.budget.gflops, "eta": self.eta, "accuracy": self.accuracy,
                "gflops": self.gflops, "exit_fraction": self.exit_fraction}

    def summary(self) -> dict:
        d = {"budget": self.budget.spec, "budget_gflops": self.budget.gflops, "feasible": self.feasible,
             "reachable_gflops": list(self.reachable), "note": self.note, "message": self.message}
        if self.feasible:
            v = self.variant
            d.update(self.row(), alpha=v.alpha, beta=v.beta, source=v.source, **{f"meta_{k}": x for k, x in v.meta.items()})
        return d


def best_per_budget(variants: Sequence[Variant], budgets: Sequence[Budget]) -> list[BudgetResult]:
    """For each budget, the most accurate (variant, η) whose expected GFLOPs fit (ties: cheaper, then the
    earlier variant). A budget below every variant's cheapest point is infeasible, with the reachable range;
    one above every costliest point is feasible but says so."""
    from cfvit.budget import BudgetError, eta_for_budget

    if not variants:
        raise ValueError("no calibrated variants to choose from")
    lo = min(v.reachable[0] for v in variants)
    hi = max(v.reachable[1] for v in variants)
    out = []
    for b in budgets:
        best = None
        for v in variants:
            try:
                p = eta_for_budget(v.curve, b.gflops)
            except BudgetError:
                continue
            if best is None or (p.accuracy, -p.gflops) > (best[1].accuracy, -best[1].gflops):
                best = (v, p)
        what = f"budget {b.spec}" + (f" = {b.gflops:.3f} GFLOPs" if b.percent is not None else " GFLOPs")
        if best is None:
            out.append(BudgetResult(
                b, None, reachable=(lo, hi), note=f"infeasible: reachable {lo:.3f}–{hi:.3f} GFLOPs",
                message=f"{what} is below the cheapest operating point ({lo:.3f} GFLOPs, every image exiting after "
                        f"the coarse stage); reachable budgets are {lo:.3f}–{hi:.3f} GFLOPs"))
            continue
        v, p = best
        note = message = ""
        if b.gflops > hi + 1e-9:
            note = f"above every operating point (max {hi:.3f} GFLOPs)"
            message = (f"{what} is above every operating point (the costliest, every image through the fine stage, "
                       f"is {hi:.3f} GFLOPs): it does not constrain the choice; reachable {lo:.3f}–{hi:.3f} GFLOPs")
        out.append(BudgetResult(b, v, p.eta, p.accuracy, p.gflops, p.exit_fraction, (lo, hi), note, message))
    return out


def eta_table_for(variant: Variant, budgets: Sequence[Budget]) -> list[dict]:
    """The rows `cfvit.budget.eta_table` writes (feasible budgets of this variant only)."""
    from cfvit.budget import eta_table

    return eta_table(variant.curve, [b.gflops for b in budgets])


# ---------------------------------------------------------------------------------------------- probabilities
@dataclass
class Probs:
    coarse: np.ndarray  # N×C float32
    fine: np.ndarray
    labels: np.ndarray


def record_probs(model, batches: Iterable[tuple[np.ndarray, np.ndarray]], settings: Sequence[tuple[float, float]],
                 device: str = "cpu") -> list[Probs]:
    """One pass over the data; for each (α, β) the coarse and fine softmax probabilities of every image.

    Softmax is taken in float32 of the float logits, exactly as `model.infer` compares against η."""
    import torch

    saved = (model.alpha, model.beta)
    acc = [([], [], []) for _ in settings]
    try:
        with torch.no_grad():
            for x, y in batches:
                xt = torch.as_tensor(x).to(device)
                for (a, b), (cp, fp, ys) in zip(settings, acc):
                    model.alpha, model.beta = float(a), float(b)
                    out = model.infer(xt, ETA_ALL_FINE)
                    cp.append(out.coarse_logits.float().softmax(-1).cpu().numpy())
                    fp.append(out.logits.float().softmax(-1).cpu().numpy())
                    ys.append(np.asarray(y, dtype=np.int64))
    finally:
        model.alpha, model.beta = saved
    if not acc or not acc[0][0]:
        raise ValueError("the validation data yielded no images")
    return [Probs(np.concatenate(cp), np.concatenate(fp), np.concatenate(ys)) for cp, fp, ys in acc]


def stage_gflops_at(model, alpha: float) -> dict:
    saved = model.alpha
    try:
        model.alpha = float(alpha)
        return {k: float(v) for k, v in model.stage_gflops().items()}
    finally:
        model.alpha = saved


def variants_from_probs(model, probs: Sequence[Probs], settings: Sequence[tuple[float, float]], source: str = "",
                        meta: Optional[dict] = None) -> list[Variant]:
    from cfvit.budget import eta_curve

    out = []
    for (a, b), p in zip(settings, probs):
        g = stage_gflops_at(model, a)
        curve = eta_curve(p.coarse, p.fine, p.labels, coarse_gflops=g["coarse"], fine_gflops=g["fine"])
        out.append(Variant(float(a), float(b), curve, g, float((p.coarse.argmax(1) == p.labels).mean()),
                           float((p.fine.argmax(1) == p.labels).mean()), len(p.labels), source, dict(meta or {})))
    return out


def inference_settings(model, alphas: Sequence[float] = (), betas: Sequence[float] = ()) -> list[tuple[float, float]]:
    """The model's own (α, β) first, then every other combination asked for (no duplicates)."""
    own = (float(model.alpha), float(model.beta))
    grid = [(float(a), float(b)) for a in (alphas or [own[0]]) for b in (betas or [own[1]])]
    out = [own]
    for s in grid:
        if s not in out:
            out.append(s)
    return out


# ---------------------------------------------------------------------------------------------- data
def eval_batch(batch: dict, data_config_json: str, num_classes: int) -> dict:
    """Rows (`image` uint8 arrays, or encoded `bytes`) + `label` → the eval transform serving uses too
    (`image` float32 C×H×W, `label`, `valid`): the training job's validation preprocessing."""
    from .data import preprocess

    return preprocess(batch, data_config_json, False, "{}", num_classes)


def validation_batches(uri: str, data_config: dict, num_classes: int, *, limit: Optional[int] = None,
                       batch_size: int = 256, fmt: str = "auto") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Eval-transformed validation batches from the URIs training takes: the built-in
    `fashion-mnist[:split]` in this process; `s3://…` or local ImageFolder / WebDataset through Ray Data
    (the training job's readers). Unreadable images are skipped, as in training."""
    dc = json.dumps(data_config, default=list)
    if uri.split(":", 1)[0] == "fashion-mnist":
        from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

        split = uri.split(":", 1)[1] if ":" in uri else "test"
        if split not in ("train", "test"):
            raise ValueError(f"{uri!r}: the fashion-mnist split must be 'train' or 'test'")
        if num_classes != len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{uri} has {len(FASHION_MNIST_CLASSES)} classes but the model has {num_classes}: "
                             f"pass the model's own validation data with --data")
        images, labels = load_fashion_mnist(split)
        if limit:
            images, labels = images[:limit], labels[:limit]
        for i in range(0, len(labels), batch_size):
            out = eval_batch({"image": list(images[i:i + batch_size]), "label": labels[i:i + batch_size]}, dc,
                             num_classes)
            v = out["valid"]
            if v.any():
                yield out["image"][v], out["label"][v]
        return
    import ray

    from .data import describe, read

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    src = describe(uri, fmt)
    if len(src.classes) != num_classes:
        raise ValueError(f"{uri} has {len(src.classes)} classes but the model has {num_classes}")
    ds = read(src, role="val", limit=limit).map_batches(
        eval_batch, fn_kwargs={"data_config_json": dc, "num_classes": num_classes}, batch_size=64,
        batch_format="numpy")
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        v = batch["valid"].astype(bool)
        if v.any():
            yield batch["image"][v], batch["label"][v]


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class LocalCheckpoint:
    path: Path  # directory with config.json + model.safetensors
    origin: str  # what the user passed
    kind: str  # local | s3 | mlflow


def fetch_checkpoint(ref: str, tracking_uri: Optional[str] = None, dst: Optional[str] = None) -> LocalCheckpoint:
    """A local directory for a local path, an `s3://bucket/prefix` (downloaded) or an MLflow model URI
    (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/cfvit_model`)."""
    if ref.startswith("s3://"):
        import pyarrow.fs as pafs

        from .data import s3_filesystem

        local = Path(dst or tempfile.mkdtemp(prefix="cfvit-calib-"))
        fs, root = s3_filesystem(), ref[len("s3://"):].rstrip("/")
        info = fs.get_file_info(f"{root}/config.json")
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{ref}: no config.json there (not a cfvit checkpoint)")
        for name in ("config.json", "model.safetensors"):
            pafs.copy_files(f"{root}/{name}", str(local / name), source_filesystem=fs)
        return LocalCheckpoint(local, ref, "s3")
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        from .tracking import download_model

        return LocalCheckpoint(Path(download_model(ref, dst, tracking_uri)), ref, "mlflow")
    p = Path(ref).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{ref}: not a cfvit checkpoint directory (config.json missing)")
    return LocalCheckpoint(p, ref, "local")


def save_calibrated(model, path, variant: Variant, table: list[dict], calibration: dict) -> Path:
    """Write the model with the variant's α/β (so `cfvit.load` rebuilds it that way) and the η table."""
    import cfvit

    saved = (model.alpha, model.beta, dict(model.model_kwargs))
    try:
        model.alpha, model.beta = variant.alpha, variant.beta
        if (variant.alpha, variant.beta) != (saved[0], saved[1]):  # rebuilt from model_kwargs by cfvit.load
            model.model_kwargs = {**model.model_kwargs, "alpha": variant.alpha, "beta": variant.beta}
        return cfvit.save(model, path, eta_table=table, calibration=calibration)
    finally:
        model.alpha, model.beta = saved[0], saved[1]
        model.model_kwargs = saved[2]


def _upload_s3(local: Path, ref: str) -> None:
    import pyarrow.fs as pafs

    from .data import s3_filesystem

    root = ref[len("s3://"):].rstrip("/")
    for name in ("config.json", "model.safetensors"):
        pafs.copy_files(str(local / name), f"{root}/{name}", destination_filesystem=s3_filesystem())


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

    def summary(self) -> dict:
        return {"checkpoint": self.checkpoint.origin, "written_to": self.written_to,
                "chosen": {"alpha": self.chosen.alpha, "beta": self.chosen.beta},
                "backbone_gflops": self.backbone_gflops, "eta_table": self.table,
                "budgets": [r.summary() for r in self.results],
                "variants": [{"alpha": v.alpha, "beta": v.beta, "coarse_top1": v.coarse_top1, "fine_top1": v.fine_top1,
                              "reachable_gflops": list(v.reachable), "stage_gflops": v.stage_gflops, "n": v.n}
                             for v in self.variants],
                "seconds": self.seconds}


def pick_adopted(variants: Sequence[Variant], results: Sequence[BudgetResult]) -> Variant:
    """The variant that wins the most budgets (ties: higher mean accuracy over all budgets it can meet,
    then the earlier one, i.e. the model's own setting)."""
    from cfvit.budget import BudgetError, eta_for_budget

    wins = {id(v): 0 for v in variants}
    for r in results:
        if r.variant is not None:
            wins[id(r.variant)] += 1

    def mean_acc(v):
        accs = []
        for r in results:
            try:
                accs.append(eta_for_budget(v.curve, r.budget.gflops).accuracy)
            except BudgetError:
                accs.append(0.0)
        return float(np.mean(accs)) if accs else 0.0

    scored = [(wins[id(v)], mean_acc(v), -i) for i, v in enumerate(variants)]
    return variants[max(range(len(variants)), key=lambda i: scored[i])]


def calibrate(checkpoint: str, budgets: str | Sequence[str], *, data: Optional[str] = None, limit: Optional[int] = None,
              alphas: Sequence[float] = (), betas: Sequence[float] = (), adopt_best: bool = False,
              write: bool = True, output: Optional[str] = None, tracking_uri: Optional[str] = None,
              batch_size: int = 256, device: str = "cpu") -> Calibration:
    """Load, record probabilities (per α/β setting), choose η per budget, write the η table."""
    import time

    import cfvit

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
    settings = inference_settings(model, alphas, betas)
    t1 = time.perf_counter()
    probs = record_probs(model, validation_batches(uri, model.data_config, model.num_classes, limit=limit,
                                                   batch_size=batch_size), settings, device)
    t2 = time.perf_counter()
    variants = variants_from_probs(model, probs, settings, meta={"checkpoint": checkpoint})
    results = best_per_budget(variants, parsed)
    chosen = pick_adopted(variants, results) if adopt_best else variants[0]
    table = eta_table_for(chosen, parsed)
    t3 = time.perf_counter()
    written = None
    if write or output:
        info = {"data": uri, "images": chosen.n, "alpha": chosen.alpha, "beta": chosen.beta,
                "budgets": [b.spec for b in parsed],
                "infeasible": [r.summary() for r in best_per_budget([chosen], parsed) if not r.feasible]}
        if output:
            dst = Path(output)
        elif ck.kind == "mlflow":  # never write into the artifact cache: a fresh local copy
            dst = Path(tempfile.mkdtemp(prefix="cfvit-calibrated-"))
        else:
            dst = ck.path
        save_calibrated(model, dst, chosen, table, info)
        if ck.kind == "s3" and not output:
            _upload_s3(dst, ck.origin)
            written = ck.origin
        else:
            written = str(dst)
    seconds = {"load": t1 - t0, "validation_pass": t2 - t1, "calibration": t3 - t2}
    return Calibration(ck, variants, results, chosen, table, written, backbone, seconds)


# ---------------------------------------------------------------------------------------------- output
def results_table(results: Sequence[BudgetResult], title: str = "", show_source: bool = False):
    from rich.table import Table

    cols = ["budget", "GFLOPs"] + (["model"] if show_source else []) + ["α", "β", "η", "top-1", "expected GFLOPs",
                                                                       "exit", "note"]
    t = Table(*cols, title=title or None)
    for r in results:
        head = [r.budget.spec, f"{r.budget.gflops:.3f}"]
        if not r.feasible:
            t.add_row(*head, *([""] if show_source else []), "", "", "", "", "", "", f"[red]{r.note}[/red]")
            continue
        v = r.variant
        t.add_row(*head, *([v.source] if show_source else []), f"{v.alpha:.3g}", f"{v.beta:.4g}", f"{r.eta:.6g}",
                  f"{100 * r.accuracy:.2f}%", f"{r.gflops:.4f}", f"{100 * r.exit_fraction:.1f}%",
                  f"[yellow]{r.note}[/yellow]" if r.note else "")
    return t


def log_to_mlflow(cal: Calibration, tracking_uri: Optional[str], experiment: str, register: Optional[str] = None,
                  alias: Optional[str] = None) -> dict:
    """A run with the calibration's metrics and table; optionally the calibrated model registered."""
    from . import tracking

    uri = tracking.tracking_uri(tracking_uri)
    run_id = tracking.start_run(uri, experiment, "calibrate", {
        "checkpoint": cal.checkpoint.origin, "budgets": ",".join(r.budget.spec for r in cal.results),
        "alpha": cal.chosen.alpha, "beta": cal.chosen.beta, "images": cal.chosen.n}, tags={"cfvit.job": "calibrate"})
    metrics = {"coarse_top1": cal.chosen.coarse_top1, "fine_top1": cal.chosen.fine_top1}
    for r in cal.results:
        if r.feasible:
            key = _metric_key(r.budget)
            metrics.update({f"{key}_accuracy": r.accuracy, f"{key}_gflops": r.gflops, f"{key}_eta": r.eta})
    status = "FAILED"
    try:
        tracking.log_metrics(uri, run_id, metrics, step=0)
        tracking._client(uri).log_dict(run_id, cal.summary(), "calibration.json")
        version = None
        if register and cal.written_to and not cal.written_to.startswith("s3://"):
            version = tracking.log_model(uri, run_id, cal.written_to, register, alias)
        status = "FINISHED"
    finally:
        tracking.end_run(uri, run_id, status)
    return {"run_id": run_id, "model_version": version}


def _metric_key(b: Budget) -> str:
    s = b.spec.replace("%", "pct").replace(".", "_")
    return f"budget_{s}" if b.percent is not None else f"budget_{s}gflops"


# ---------------------------------------------------------------------------------------------- benchmark
def bench(n: int = 50_000, classes: int = 1000, budgets: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
          repeats: int = 3, seed: int = 0) -> dict:
    """Seconds to calibrate `n` samples (random probabilities): the exact curve over every η + one η per
    budget. The validation pass that produces the probabilities is not included."""
    import time

    from cfvit.budget import BudgetError, eta_curve, eta_for_budget

    rng = np.random.default_rng(seed)
    logits_c = rng.standard_normal((n, classes), dtype=np.float32) * 3
    logits_f = rng.standard_normal((n, classes), dtype=np.float32) * 3
    cp = np.exp(logits_c - logits_c.max(1, keepdims=True))
    cp /= cp.sum(1, keepdims=True)
    fp = np.exp(logits_f - logits_f.max(1, keepdims=True))
    fp /= fp.sum(1, keepdims=True)
    labels = rng.integers(0, classes, n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        curve = eta_curve(cp, fp, labels, coarse_gflops=1.9, fine_gflops=2.6)
        for b in budgets:
            try:
                eta_for_budget(curve, b)
            except BudgetError:
                pass
        times.append(time.perf_counter() - t0)
    return {"samples": n, "classes": classes, "budgets": len(budgets), "operating_points": len(curve),
            "seconds_best": min(times), "seconds_median": float(np.median(times)), "repeats": repeats}


# ---------------------------------------------------------------------------------------------- python -m
def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    from rich.console import Console

    p = argparse.ArgumentParser(prog="python -m jobs.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--budgets", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--alphas", default=None)
    p.add_argument("--betas", default=None)
    p.add_argument("--adopt-best", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    console = Console()
    try:
        cal = calibrate(args.checkpoint, args.budgets, data=args.data, limit=args.limit,
                        alphas=parse_floats(args.alphas, "--alphas", 0, 1, lo_open=True),
                        betas=parse_floats(args.betas, "--betas", 0, 1, hi_open=True), adopt_best=args.adopt_best,
                        write=not args.no_write, output=args.output)
    except (BudgetSpecError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_calibration(cal, console)
    return 0


def print_calibration(cal: Calibration, console) -> None:
    multi = len(cal.variants) > 1
    console.print(results_table(cal.results, title=f"η per budget · {cal.checkpoint.origin} · "
                                                   f"{cal.variants[0].n} images · backbone {cal.backbone_gflops:.3f} GFLOPs"))
    if multi:
        from rich.table import Table

        t = Table("α", "β", "coarse top-1", "fine top-1", "reachable GFLOPs", title="inference settings evaluated")
        for v in cal.variants:
            t.add_row(f"{v.alpha:g}", f"{v.beta:g}", f"{100 * v.coarse_top1:.2f}%", f"{100 * v.fine_top1:.2f}%",
                      f"{v.reachable[0]:.3f}–{v.reachable[1]:.3f}")
        console.print(t)
    for r in cal.results:
        if r.message:
            console.print(f"note: {r.message}", highlight=False)
    if cal.written_to:
        console.print(f"η table ({len(cal.table)} rows, α={cal.chosen.alpha:g}, β={cal.chosen.beta:g}) written to "
                      f"{cal.written_to}", highlight=False)


if __name__ == "__main__":
    raise SystemExit(main())
