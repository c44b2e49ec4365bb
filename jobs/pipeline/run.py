"""`cfvit pipeline`: the main job, end to end on the embedded defaults.

train (Ray Train + DeepSpeed, tracked and registered in MLflow) → calibrate η for a few FLOPs budgets →
start the Ray Serve application on the calibrated model → classify held-out test images over HTTP at
each budget → print a summary → shut down (unless asked to keep serving).
"""
from __future__ import annotations

import base64
import io
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import ray
from PIL import Image
from ray import serve
from rich.table import Table

from cfvit.data import load_fashion_mnist
from cfvit_common import tracking
from cfvit_common.ray_env import init_ray
from jobs.calibrate import calibrate
from jobs.train import EXPORT_DIR, load_config, run_training
from jobs.train.watch import run_watched, train_images
from serve.app import build_app
from serve.placement import deploy
from serve.settings import AppArgs

DEFAULT_CONFIG = "fmnist_main"  # jobs/configs/fmnist_main.yaml
# A run of a few minutes on 2 CPU cores: the mechanics, not a model worth serving.
QUICK_SETS = ["data.train_limit=3000", "data.val_limit=500", "schedule.epochs=2"]
DEFAULT_BUDGETS = "40%,55%,70%"
# η-table points below the served default η, evenly spaced in GFLOPs down to the coarse stage's cost: the
# steps SLO mode takes under load (the given budgets alone may all sit above the default η).
SLO_LADDER_STEPS = 4
CALIBRATION_IMAGES = 5000  # the first test images calibrate η; HTTP classifies images after them


@dataclass
class BudgetServed:
    spec: str
    budget_gflops: float
    eta: Optional[float]
    val_top1: Optional[float]
    expected_gflops: Optional[float]
    http_top1: Optional[float] = None
    exit_rate: Optional[float] = None
    served_gflops: Optional[float] = None
    note: str = ""


@dataclass
class Serving:
    """Where and how long the endpoint serves, and what it classifies."""

    host: str
    port: int
    n_images: int  # test images classified over HTTP at each budget
    keep_serving: bool
    own_ray: bool  # a Ray this job started (its size is fixed: an app that cannot fit is refused at once)


@dataclass
class PipelineResult:
    train_metrics: dict
    mlflow_run_id: Optional[str]
    tracking_uri: str
    model_uri: Optional[str]
    checkpoint: str
    endpoint: str
    budgets: list[BudgetServed] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    calibration_images: int = 0
    http_images: int = 0
    stage_gflops: Optional[dict] = None  # coarse, fine
    backbone_gflops: Optional[float] = None


def _png_b64(img_u8) -> str:
    buf = io.BytesIO()
    Image.fromarray(img_u8).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def classify_over_http(url: str, images_u8, labels, budget_gflops: float, chunk: int = 32) -> dict:
    """POST the images as base64 PNG batches at one budget; accuracy, exit rate, GFLOPs per image."""
    correct = exits = 0
    gflops = 0.0
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(images_u8), chunk):
            body = {"images": [_png_b64(x) for x in images_u8[i:i + chunk]], "budget_gflops": budget_gflops}
            r = client.post(f"{url}v1/classify", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"POST /v1/classify answered {r.status_code}: {r.text[:300]}")
            for p, y in zip(r.json()["predictions"], labels[i:i + chunk]):
                correct += int(p["label"] == int(y))
                exits += int(p["stage"] == "coarse")
                gflops += p["gflops"]
    n = len(images_u8)
    return {"top1": correct / n, "exit_rate": exits / n, "gflops": gflops / n}


def _wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Serve application at {url} did not become healthy in {timeout_s:.0f} s")
        time.sleep(1)


def run_pipeline(config: Optional[str] = None, sets: tuple[str, ...] = (), *, quick: bool = False,
                 budgets: str = DEFAULT_BUDGETS, n_images: int = 1000, host: str = "127.0.0.1", port: int = 8000,
                 keep_serving: bool = False, echo=print, console=None, verbose: bool = False) -> PipelineResult:
    """The main job. `console` (rich): where the training's epoch lines and progress bar go (with the
    worker output routed by `cfvit_common.logs`); without it the workers' output streams as Ray prints it."""


    t0 = time.perf_counter()
    cfg = load_config(config or DEFAULT_CONFIG, [*(QUICK_SETS if quick else []), *sets])
    started_ray = init_ray(cfg.scaling.ray_address, min_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2)
    seconds = {"ray start": time.perf_counter() - t0}
    try:
        outcome = _train(cfg, echo, console, verbose, seconds)
        serving = Serving(host, port, n_images, keep_serving, own_ray=started_ray)
        return _calibrate_and_serve(cfg, outcome, budgets, serving, echo, seconds)
    finally:
        # Our own Ray: stop Serve with it. A shared cluster: remove only our application.
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        elif ray.is_initialized():
            try:
                serve.delete("cfvit")
            except Exception as e:  # never mask the error that brought us here
                echo(f"warning: could not delete the Serve application 'cfvit': {e}")


def _train(cfg, echo, console, verbose: bool, seconds: dict):
    t = time.perf_counter()
    n = train_images(cfg)
    echo(f"[1/4] training {cfg.model.name}: {n or 'all'} images × {cfg.schedule.epochs} epochs, "
         f"{cfg.scaling.num_workers} workers, ZeRO-{cfg.deepspeed.zero_stage}")
    outcome = run_training(cfg) if console is None else run_watched(cfg, console, verbose)
    seconds["train"] = time.perf_counter() - t
    return outcome


def _calibrate_and_serve(cfg, outcome, budgets, serving: Serving, echo, seconds) -> PipelineResult:
    t = time.perf_counter()
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    model_uri = None
    if outcome.model_version is not None and cfg.mlflow.registered_model:
        model_uri = f"models:/{cfg.mlflow.registered_model}/{outcome.model_version}"
    source = model_uri or str(Path(outcome.checkpoint_path) / EXPORT_DIR)
    n_cal = min(cfg.data.val_limit or CALIBRATION_IMAGES, CALIBRATION_IMAGES)
    echo(f"[2/4] calibrating η for budgets {budgets} on {n_cal} {cfg.data.val} images")
    out_dir = Path(cfg.checkpoint.storage_path).expanduser().resolve() / f"{cfg.run_name}-served"
    default_eta = AppArgs.model_fields["eta"].default  # what the served app applies to requests without one
    cal = calibrate(source, budgets, data=cfg.data.val, limit=n_cal, tracking_uri=uri, output=str(out_dir),
                    slo_ladder=(default_eta, SLO_LADDER_STEPS))
    below = sorted(r["eta"] for r in cal.table if r["eta"] < default_eta)
    echo(f"      η table: {len(cal.table)} points, {len(below)} below the default η {default_eta} for SLO mode "
         f"({', '.join(f'{e:.3f}' for e in below) or 'none'})")
    seconds["calibrate"] = time.perf_counter() - t
    rows = []
    for r in cal.results:
        s = r.summary()
        rows.append(BudgetServed(spec=r.budget.spec, budget_gflops=r.budget.gflops, eta=s.get("eta"),
                                 val_top1=s.get("accuracy"), expected_gflops=s.get("gflops"),
                                 note="" if r.feasible else (s.get("note") or "infeasible")))
    result = PipelineResult(train_metrics=outcome.metrics, mlflow_run_id=outcome.mlflow_run_id, tracking_uri=uri,
                            model_uri=model_uri, checkpoint=str(out_dir),
                            endpoint=f"http://{serving.host}:{serving.port}/",
                            budgets=rows, seconds=seconds, calibration_images=n_cal,
                            stage_gflops=dict(cal.chosen.stage_gflops), backbone_gflops=cal.backbone_gflops)
    _serve_and_classify(result, serving, echo)
    if serving.keep_serving:
        echo(f"serving at {result.endpoint} (docs: {result.endpoint}docs) — Ctrl-C to stop")
        _block_until_signal()
    return result


def _serve_and_classify(result: PipelineResult, serving: Serving, echo) -> None:
    t = time.perf_counter()
    echo(f"[3/4] starting the Serve application on {result.endpoint}")
    serve.start(http_options={"host": serving.host, "port": serving.port})
    args = AppArgs(checkpoint=result.checkpoint)
    for stage in (args.coarse, args.fine):  # two cores: one replica each is what fits
        stage.autoscaling_config.update(min_replicas=1, initial_replicas=1, max_replicas=1)
    args.ingress_autoscaling_config = None
    # refused at once, with the numbers, when our own Ray cannot hold it; else a bounded wait
    deploy(build_app(args), args, "cfvit", "/", fixed_cluster=serving.own_ray)
    _wait_healthy(result.endpoint)
    seconds = result.seconds
    seconds["serve start"] = time.perf_counter() - t

    t = time.perf_counter()
    images, labels = load_fashion_mnist("test")
    # the last test images: calibration used the first `calibration_images` ones
    n_images = min(serving.n_images, len(images) - result.calibration_images)
    echo(f"[4/4] classifying {n_images} held-out test images over HTTP at each budget")
    images, labels = images[-n_images:], labels[-n_images:]
    result.http_images = n_images
    for row in result.budgets:
        if row.eta is None:
            continue
        got = classify_over_http(result.endpoint, images, labels, row.budget_gflops)
        row.http_top1, row.exit_rate, row.served_gflops = got["top1"], got["exit_rate"], got["gflops"]
    seconds["HTTP"] = time.perf_counter() - t


def _block_until_signal() -> None:
    stop = {"flag": False}

    def handler(signum, _frame):
        stop["flag"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop["flag"]:
            time.sleep(0.5)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _flops_unit(res: PipelineResult) -> tuple[str, float]:
    """MFLOPs for models below 0.1 GFLOPs (the main job's), else GFLOPs: numbers a person can read."""
    big = max([b.budget_gflops for b in res.budgets] + [res.backbone_gflops or 0])
    return ("GFLOPs", 1.0) if big >= 0.1 else ("MFLOPs", 1e3)


def summary_table(res: PipelineResult):
    """Per budget: η, what calibration expects (its images) and what HTTP served (held-out images). 64 columns."""
    unit, k = _flops_unit(res)
    t = Table("budget", "η", "val\ntop-1", f"val\n{unit}", "HTTP\ntop-1", "coarse\nexits", f"HTTP\n{unit}",
              title=f"CF-ViT per FLOPs budget ({unit} per image)", title_justify="left")
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v: "" if v is None else f"{k * v:.2f}"  # noqa: E731
    for b in res.budgets:
        budget = f"{b.spec} {k * b.budget_gflops:.2f}" if b.spec.endswith("%") else b.spec
        if b.eta is None:
            t.add_row(budget, "—", "infeasible", "", "", "", "")
            continue
        t.add_row(budget, f"{b.eta:.3f}", pct(b.val_top1), num(b.expected_gflops), pct(b.http_top1),
                  "" if b.exit_rate is None else f"{100 * b.exit_rate:.0f}%", num(b.served_gflops))
    return t


def summary_notes(res: PipelineResult) -> list[str]:
    """What the table's columns are and the training's own figures, as short lines."""
    unit, k = _flops_unit(res)
    m, g = res.train_metrics, res.stage_gflops or {}
    lines = [f"val: on the {res.calibration_images} calibration images (the first test images)",
             f"HTTP: the last {res.http_images} test images as PNG through the Serve endpoint",
             "coarse exits: the images the coarse stage answered alone"]
    if g:
        lines.append(f"{unit}: coarse stage {k * g['coarse']:.2f}, both {k * (g['coarse'] + g['fine']):.2f}"
                     + (f", plain ViT {k * res.backbone_gflops:.2f}" if res.backbone_gflops else ""))
    for b in res.budgets:
        if b.eta is None:
            lines.append(f"budget {b.spec}: {b.note}")
    if "val_fine_top1" in m:
        lines.append(f"trained model on {m.get('val_images', '?')} test images: coarse top-1 "
                     f"{100 * m['val_coarse_top1']:.1f}%, fine {100 * m['val_fine_top1']:.1f}%")
    return lines
