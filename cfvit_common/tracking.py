"""MLflow for the training job: one run per job, config as params, per-epoch metrics, the accuracy–GFLOPs
plot, and the exported cfvit checkpoint registered as a model version.

The registered version's source is the checkpoint directory logged as plain artifacts (`config.json` +
`model.safetensors`); `download_model("models:/NAME@ALIAS")` fetches it for `cfvit.load`.

Registering records the sha256 of both files as version tags (`cfvit.sha256.model.safetensors`,
`cfvit.sha256.config.json`); every download of a registered version checks the files against them and
refuses a mismatch, or a version without them (`ModelIntegrityError`, naming the version). Whoever can
write the artifact store but not edit the registry cannot change what is loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import mlflow.artifacts
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .storage import cache_dir, fill_once

MODEL_ARTIFACT = "cfvit_model"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # in the working folder, artifacts under ./mlruns
DIGEST_TAG = "cfvit.sha256."  # + the file's name: a registered version's recorded digests
DIGESTED_FILES = ("model.safetensors", "config.json")


class ModelIntegrityError(ValueError):
    """A registered version whose files do not match the digests recorded when it was registered."""


def tracking_uri(configured: Optional[str] = None) -> str:
    """Config, else MLFLOW_TRACKING_URI, else ./mlflow.db; relative local stores are made absolute because
    Ray workers run in another directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri:  # a plain folder: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def _artifact_location(uri: str) -> Optional[str]:
    # A local sqlite store keeps its artifacts beside it in ./mlruns (absolute: workers run elsewhere).
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def mlflow_client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, params: dict, *, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None) -> str:
    """Create the job's run (nested under `parent_run_id` if given) and log the flattened config."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, _artifact_location(uri))
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    """Per-epoch metrics (numbers only) at step = epoch."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    mlflow_client(uri).log_batch(run_id, metrics=items)


def curve_figure(curve, backbone_gflops: Optional[float] = None, title: str = ""):
    fig = Figure(figsize=(5, 3.6), dpi=100)
    ax = fig.subplots()
    ax.plot(curve.gflops, 100 * curve.accuracy, "-", label="CF-ViT (η sweep)")
    if backbone_gflops:
        ax.axvline(backbone_gflops, color="grey", ls="--", lw=1, label="backbone cost")
    ax.set_xlabel("GFLOPs per image (expected)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def log_curve(uri: str, run_id: str, curve, backbone_gflops=None, title: str = "") -> None:
    mlflow_client(uri).log_figure(run_id, curve_figure(curve, backbone_gflops, title), "plots/accuracy_gflops.png")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_digests(local_dir) -> dict:
    """The version tags that pin a cfvit checkpoint directory: sha256 of its weights and its config."""
    missing = [name for name in DIGESTED_FILES if not (Path(local_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{local_dir}: not a cfvit checkpoint ({', '.join(missing)} missing)")
    return {DIGEST_TAG + name: file_sha256(Path(local_dir) / name) for name in DIGESTED_FILES}


def register_artifacts(client, run_id: str, artifact_path: str, name: str, aliases=(), tags=None, *,
                       local_dir) -> int:
    """Register the run's `artifact_path` (the cfvit checkpoint directory `local_dir`, logged there) as a new
    version of `name`, with aliases; the sha256 of its weights and config become version tags."""
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {"format": "cfvit", **(tags or {}), **checkpoint_digests(local_dir)}
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, mv.version)
    return int(mv.version)


def log_model(uri: str, run_id: str, model_dir, name: Optional[str], alias: Optional[str] = None) -> Optional[int]:
    """Log the cfvit checkpoint directory as artifacts; register it under `name` (returns the version)."""
    client = mlflow_client(uri)
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    if not name:
        return None
    return register_artifacts(client, run_id, MODEL_ARTIFACT, name, [alias] if alias else [], local_dir=model_dir)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client(uri).set_terminated(run_id, status)


@contextlib.contextmanager
def run(uri: Optional[str], experiment: str, run_name: str, params: dict, *, parent_run_id: Optional[str] = None,
        tags: Optional[dict] = None, enabled: bool = True) -> Iterator[Optional[str]]:
    """`with tracking.run(...) as run_id:` — the run ends FINISHED, FAILED on an error, KILLED on Ctrl-C or
    SIGTERM (KeyboardInterrupt / SystemExit). Yields None (and tracks nothing) when `enabled` is False."""
    if not enabled:
        yield None
        return
    run_id = start_run(uri, experiment, run_name, params, parent_run_id=parent_run_id, tags=tags)
    try:
        yield run_id
    except (KeyboardInterrupt, SystemExit):
        end_run(uri, run_id, "KILLED")
        raise
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    end_run(uri, run_id)


def download_model(model_uri: str, dst: Optional[str] = None, tracking: Optional[str] = None) -> str:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/cfvit_model` or a local path → the local
    directory holding `config.json` (what `cfvit.load` takes). A registered version's files are checked
    against its recorded digests, from the cache too (ModelIntegrityError otherwise)."""
    mv = name = None
    if "://" not in model_uri and ":/" not in model_uri:
        local = Path(model_uri)
    else:
        uri = tracking_uri(tracking)
        if model_uri.startswith("models:/"):
            name, mv = registered_version(model_uri, uri)
            source = mv.source
            key = f"{name}/{mv.version}/{mv.run_id}/{source}"
        else:
            source = key = model_uri
        if dst:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri))
        else:
            local = _cached_download(source, key, uri)
    found = [local] if (local / "config.json").is_file() else sorted(p.parent for p in local.rglob("config.json"))
    if not found:
        raise FileNotFoundError(f"{model_uri}: no cfvit checkpoint (config.json) in the downloaded artifacts")
    if mv is not None:
        try:
            verify_version(found[0], name, mv)
        except ModelIntegrityError:
            if not dst:  # a cache entry that fails is dropped: a repaired artifact is fetched again
                shutil.rmtree(local.parent, ignore_errors=True)
            raise
    return str(found[0])


def registered_version(model_uri: str, uri: Optional[str] = None):
    """(name, the ModelVersion) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, as the registry has it now."""
    name, version = parse_models_uri(model_uri)
    client = mlflow_client(tracking_uri(uri))
    mv = (client.get_model_version_by_alias(name, version[1:]) if version.startswith("@")
          else client.get_model_version(name, version))
    return name, mv


def pin_model_uri(model_uri: str, uri: Optional[str] = None) -> str:
    """`models:/NAME@ALIAS` → `models:/NAME/VERSION`, the version the alias points at now (other URIs as
    given): what every replica of one deployment loads, wherever the alias moves meanwhile."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    name, mv = registered_version(model_uri, uri)
    return f"models:/{name}/{mv.version}"


def verify_version(folder, name: str, mv) -> None:
    """The downloaded files of registered version `mv` against the sha256 tags recorded at registration."""
    where = f"models:/{name}/{mv.version}"
    recorded = {f: (mv.tags or {}).get(DIGEST_TAG + f) for f in DIGESTED_FILES}
    unrecorded = [f for f, digest in recorded.items() if not digest]
    if unrecorded:
        raise ModelIntegrityError(f"{where} has no recorded sha256 of {', '.join(unrecorded)} (tags {DIGEST_TAG}*): "
                                  "it cannot be verified, so it is not loaded; register the checkpoint again "
                                  "(training, tuning and `cfvit calibrate --register` record them)")
    for file, digest in recorded.items():
        path = Path(folder) / file
        actual = file_sha256(path) if path.is_file() else "missing"
        if actual != digest:
            raise ModelIntegrityError(f"{where}: {file} has sha256 {actual[:16]}…, but {digest[:16]}… was recorded "
                                      "when the version was registered: refusing to load it (the artifact was "
                                      "changed after registration)")


def _cached_download(source: str, key: str, uri: str) -> Path:
    """Download a model version's artifacts once per node. The key holds the version's run id (a UUID), so
    a different server or a re-created model never hits another's cache entry."""
    dest = cache_dir("mlflow") / hashlib.sha256(key.encode()).hexdigest()[:16]

    def fill(tmp: Path) -> None:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp / "artifacts"), tracking_uri=uri)
        (tmp / "done").touch()

    return fill_once(dest, fill, ready="done") / "artifacts"


def parse_models_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "@" + alias
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise ValueError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version
