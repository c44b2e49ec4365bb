"""`cfvit pipeline`: the main job, end to end on the embedded defaults.

train (Ray Train + DeepSpeed, tracked and registered in MLflow) → calibrate η for a few FLOPs budgets →
start the Ray Serve application on the calibrated model → classify held-out test images over HTTP at
each budget → print a summary → shut down (unless asked to keep serving).
"""
from __future__ import annotations

import base64
import io
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# A run of a few minutes on 2 CPU cores: fewer images and epochs than the shipped config.
QUICK_SETS = ["data.train_limit=3000", "data.val_limit=500", "schedule.epochs=2"]
DEFAULT_BUDGETS = "40%,55%,70%"


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
class PipelineResult:
    train_metrics: dict
    mlflow_run_id: Optional[str]
    tracking_uri: str
    model_uri: Optional[str]
    checkpoint: str
    endpoint: str
    budgets: list[BudgetServed] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def _png_b64(img_u8) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img_u8).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def classify_over_http(url: str, images_u8, labels, budget_gflops: float, chunk: int = 32) -> dict:
    """POST the images as base64 PNG batches at one budget; accuracy, exit rate, GFLOPs per image."""
    import httpx

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
    import httpx

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
                 budgets: str = DEFAULT_BUDGETS, n_images: int = 200, host: str = "127.0.0.1", port: int = 8000,
                 keep_serving: bool = False, echo=print) -> PipelineResult:
    import ray
    from ray import serve

    from cfvit.data import load_fashion_mnist
    from serve.app import build_app
    from serve.settings import AppArgs

    from jobs.calibrate import calibrate
    from jobs.common import tracking
    from jobs.train import EXPORT_DIR, load_config, run_training

    t0 = time.perf_counter()
    cfg = load_config(config, [*(QUICK_SETS if quick else []), *sets])
    started_ray = not ray.is_initialized() and not (cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS"))
    echo(f"[1/4] training {cfg.model.name} on {cfg.data.train} ({cfg.schedule.epochs} epochs, "
         f"{cfg.scaling.num_workers} workers, DeepSpeed ZeRO-{cfg.deepspeed.zero_stage})")
    outcome = run_training(cfg)
    t_train = time.perf_counter()
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    model_uri = None
    if outcome.model_version is not None and cfg.mlflow.registered_model:
        model_uri = f"models:/{cfg.mlflow.registered_model}/{outcome.model_version}"
    source = model_uri or str(Path(outcome.checkpoint_path) / EXPORT_DIR)

    echo(f"[2/4] calibrating η for budgets {budgets} on {cfg.data.val} (source: {source})")
    out_dir = Path(cfg.checkpoint.storage_path).expanduser().resolve() / f"{cfg.run_name}-served"
    cal = calibrate(source, budgets, data=cfg.data.val, limit=cfg.data.val_limit, tracking_uri=uri,
                    output=str(out_dir))
    t_cal = time.perf_counter()
    rows = []
    for r in cal.results:
        s = r.summary()
        rows.append(BudgetServed(spec=r.budget.spec, budget_gflops=r.budget.gflops, eta=s.get("eta"),
                                 val_top1=s.get("accuracy"), expected_gflops=s.get("gflops"),
                                 note="" if r.feasible else (s.get("note") or "infeasible")))

    echo(f"[3/4] starting the Serve application on http://{host}:{port}/")
    endpoint = f"http://{host}:{port}/"
    try:
        serve.start(http_options={"host": host, "port": port})
        args = AppArgs(checkpoint=str(out_dir))
        for stage in (args.coarse, args.fine):  # two cores: one replica each is what fits
            stage.autoscaling_config.update(min_replicas=1, initial_replicas=1, max_replicas=1)
        args.ingress_autoscaling_config = None
        serve.run(build_app(args.model_dump()), name="cfvit", route_prefix="/")
        _wait_healthy(endpoint)

        echo(f"[4/4] classifying {n_images} Fashion-MNIST test images over HTTP at each budget")
        images, labels = load_fashion_mnist("test")
        # the last test images: the calibration pass used the first val_limit ones
        images, labels = images[-n_images:], labels[-n_images:]
        for row in rows:
            if row.eta is None:
                continue
            got = classify_over_http(endpoint, images, labels, row.budget_gflops)
            row.http_top1, row.exit_rate, row.served_gflops = got["top1"], got["exit_rate"], got["gflops"]
        t_http = time.perf_counter()
        result = PipelineResult(train_metrics=outcome.metrics, mlflow_run_id=outcome.mlflow_run_id, tracking_uri=uri,
                                model_uri=model_uri, checkpoint=str(out_dir), endpoint=endpoint, budgets=rows,
                                seconds={"train": t_train - t0, "calibrate": t_cal - t_train, "serve+http": t_http - t_cal})
        if keep_serving:
            echo(f"serving at {endpoint} (docs: {endpoint}docs) — Ctrl-C to stop")
            _block_until_signal()
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
    return result


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


def summary_table(res: PipelineResult, backbone_gflops: Optional[float] = None):
    from rich.table import Table

    t = Table("budget", "GFLOPs", "η", "val top-1", "expected GFLOPs", "HTTP top-1", "exit rate", "served GFLOPs/img",
              title="CF-ViT per FLOPs budget (validation = calibration set; HTTP = held-out test images)")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for b in res.budgets:
        if b.eta is None:
            t.add_row(b.spec, f"{b.budget_gflops:.4f}", "—", b.note, "", "", "", "")
            continue
        t.add_row(b.spec, f"{b.budget_gflops:.4f}", f"{b.eta:.4f}", fmt(b.val_top1, ".3f"),
                  fmt(b.expected_gflops, ".4f"), fmt(b.http_top1, ".3f"), fmt(b.exit_rate, ".2f"),
                  fmt(b.served_gflops, ".4f"))
    return t
