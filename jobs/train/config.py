"""The training job's configuration: pydantic models, YAML loading, `--set key.sub=value` overrides and
up-front checks (unknown keys, bad values, unreachable data) that fail with the offending key named."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cfvit_common.errors import ConfigError

from .sources import check_uri

__all__ = ["ConfigError", "JobConfig", "load_config", "parse_set", "resolve_config_path"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # jobs/configs
DEFAULT_CONFIG = CONFIG_DIR / "fmnist_tiny.yaml"
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: str = Field("fashion-mnist", description="URI: fashion-mnist[:train|:test], s3://bucket/prefix or a local path")
    val: str = "fashion-mnist:test"
    format: Literal["auto", "imagefolder", "webdataset"] = "auto"
    train_limit: Optional[int] = Field(None, ge=1, description="use only N training images (the first N of the "
                                       "built-in set; of files, N from the epoch's shuffled order)")
    val_limit: Optional[int] = Field(None, ge=1)
    check_uris: bool = True  # reachability check before anything starts
    # per-worker buffer of preprocessed training images shuffled locally each epoch (0: off)
    shuffle_buffer: int = Field(512, ge=0)
    # CPUs a job (or each tuning trial) leaves free beside its train workers for Ray Data's read/decode
    # tasks; each task takes one, so below 1 the pipeline can starve
    cpus: float = Field(1.0, ge=0)
    # Ray resources of each read/decode/augment task, e.g. {CPU: 1, cpu_node: 1}: a custom resource that only
    # CPU-only nodes declare (infra/: the cpu-data group) keeps preprocessing off the GPU nodes, streaming
    # batches to the train workers (docs/SCALING.md). Empty: one CPU on any node.
    preprocess_resources: dict[str, float] = Field(default_factory=dict)
    # where images are decoded and augmented. cpu: in Ray Data's CPU tasks (PIL decode + timm transform).
    # device: Ray Data only reads the bytes; each training worker decodes and augments its batch on its own
    # device (a GPU: nvjpeg + batched tensor ops; a CPU-only worker runs the same code on its CPU, the
    # fallback). No RandAugment there (augment.auto_augment); jobs/train/device_augment.py. The epoch line's
    # `wait` (data_wait_share) then includes the worker's own decode and augment time.
    decode: Literal["cpu", "device"] = "cpu"

    @field_validator("preprocess_resources")
    @classmethod
    def _resources(cls, v: dict) -> dict:
        for k, amount in v.items():
            if k in ("GPU", "memory", "object_store_memory") or not k:
                raise ValueError(f"{k!r} cannot be a preprocessing resource (use CPU and custom resources)")
            if not amount > 0:
                raise ValueError(f"{k}: the amount must be > 0, got {amount}")
        return v


class AugmentConfig(_Section):
    auto_augment: Optional[str] = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    re_prob: float = Field(0.0, ge=0, le=1)  # random erasing
    color_jitter: float = Field(0.4, ge=0)  # brightness/contrast/saturation factor range (timm's default 0.4)
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class ModelSection(_Section):
    name: str = "cfvit_tiny_fmnist"
    drop_path: float = Field(0.0, ge=0, lt=1)
    alpha: Optional[float] = Field(None, gt=0, le=1)  # None: the model's default
    beta: Optional[float] = Field(None, ge=0, lt=1)
    coarse_loss: Literal["kl", "ce"] = "kl"
    checkpoint_path: Optional[str] = None  # initialise the backbone from a local timm/DeiT file
    overrides: dict[str, Any] = Field(default_factory=dict)  # passed to cfvit.create_model (depth, embed_dim, ...)

    def create_kwargs(self, num_classes: int) -> dict:
        kw = {"num_classes": num_classes, **self.overrides}
        if self.drop_path:
            kw["drop_path_rate"] = self.drop_path
        for k in ("alpha", "beta", "checkpoint_path"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        return kw


class OptimConfig(_Section):
    opt: str = "adamw"  # any timm optimizer name
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(256, ge=2, description="global batch per optimizer step, all workers together")
    momentum: float = 0.9


class ScheduleConfig(_Section):
    epochs: int = Field(10, ge=1)
    sched: str = "cosine"  # any timm scheduler name
    warmup_epochs: int = Field(0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    split_fraction: float = Field(2 / 3, ge=0, le=1, description="epochs < fraction*epochs re-split every patch")
    budgets: list[float] = Field(default_factory=list, description="GFLOPs budgets for the η table in the export")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        return self


class DeepSpeedSection(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    micro_batch_size: int = Field(64, ge=1, description="per worker per forward/backward")
    gradient_clipping: float = Field(0.0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the DeepSpeed config as is


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    ray_address: Optional[str] = None  # None: connect to RAY_ADDRESS or start a local Ray
    # a worker that waits this long for its next batch reports what the cluster lacks and fails (0: never)
    stall_timeout_s: float = Field(900.0, ge=0)
    # Ray placement group strategy of the workers: PACK fills nodes first; SPREAD / STRICT_SPREAD put them on
    # different nodes (losing one node then costs one worker, not all)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # extra Ray resources of each worker, e.g. {trainer: 1}: a custom resource that only some nodes declare
    # keeps the workers there (one per node when each declares 1). CPU and GPU come from the keys above.
    worker_resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("worker_resources")
    @classmethod
    def _worker_resources(cls, v: dict) -> dict:
        for k, amount in v.items():
            if k in ("CPU", "GPU") or not k:
                raise ValueError(f"{k!r}: set CPUs with scaling.cpus_per_worker and GPUs with scaling.use_gpu")
            if not amount > 0:
                raise ValueError(f"{k}: the amount must be > 0, got {amount}")
        return v


class CheckpointSection(_Section):
    storage_path: str = "./outputs/ray_results"  # local path or s3://bucket/prefix (RunConfig.storage_path)
    run_name: Optional[str] = None  # same name + storage path: the run resumes from its latest checkpoint
    every_n_epochs: int = Field(1, ge=1)
    num_to_keep: Optional[int] = Field(2, ge=1)
    max_failures: int = Field(2, ge=-1)  # -1: retry forever
    # a rank whose checkpoint save + upload takes longer says so in the job's log (storage slow or away?)
    slow_write_s: float = Field(60.0, gt=0)


class MLflowSection(_Section):
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (artifacts under ./mlruns)
    experiment: str = "cfvit"
    registered_model: Optional[str] = "cfvit-fmnist-tiny"
    alias: Optional[str] = "candidate"  # models:/NAME@ALIAS ("latest" is reserved by MLflow)

    @field_validator("alias")
    @classmethod
    def _alias(cls, v):
        if v is not None and v.lower() == "latest":
            raise ValueError("'latest' is reserved by MLflow; use another alias (e.g. candidate, champion)")
        return v


class DebugSection(_Section):
    # Failure drill: rank `kill_rank` SIGKILLs itself once at the start of this epoch (tests FailureConfig).
    kill_at_epoch: Optional[int] = Field(None, ge=0)
    kill_rank: int = Field(1, ge=0)
    kill_marker: Optional[str] = None  # file that records the drill happened (so it happens once)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)


class LogSection(_Section):
    # rank 0 prints a progress record this often during an epoch (0: never); `cfvit pipeline` draws it as a bar
    progress_every_s: float = Field(0.0, ge=0)


class JobConfig(_Section):
    name: str = "cfvit"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    mlflow: MLflowSection = Field(default_factory=MLflowSection)
    debug: DebugSection = Field(default_factory=DebugSection)
    log: LogSection = Field(default_factory=LogSection)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("must be a non-empty name without slashes or spaces")
        return v

    @model_validator(mode="after")
    def _batches(self):
        per_step = self.deepspeed.micro_batch_size * self.scaling.num_workers
        if self.optim.batch_size % per_step:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be a multiple of deepspeed.micro_batch_size × "
                f"scaling.num_workers ({self.deepspeed.micro_batch_size} × {self.scaling.num_workers} = {per_step})"
            )
        if (self.augment.mixup or self.augment.cutmix) and self.deepspeed.micro_batch_size % 2:
            raise ValueError("deepspeed.micro_batch_size must be even when mixup/cutmix is on")
        return self

    @model_validator(mode="after")
    def _device_decode(self):
        if self.data.decode == "device" and self.augment.auto_augment:
            raise ValueError(f"augment.auto_augment ({self.augment.auto_augment!r}) needs data.decode=cpu: "
                             "RandAugment does not run on the device (unset it or set data.decode=cpu)")
        return self

    # ---------------------------------------------------------------- derived values
    @property
    def grad_accum(self) -> int:
        return self.optim.batch_size // (self.deepspeed.micro_batch_size * self.scaling.num_workers)

    @property
    def run_name(self) -> str:
        return self.checkpoint.run_name or self.name

    @property
    def split_epochs(self) -> int:
        """Epochs [0, split_epochs) re-split every patch; informative selection from then on."""
        return int(self.schedule.split_fraction * self.schedule.epochs + 0.5)

    def flat(self) -> dict[str, Any]:
        """Dotted keys → values (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix, obj):
            for k, v in obj.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict) and v:
                    walk(key + ".", v)
                else:
                    out[key] = v
        walk("", self.model_dump(mode="json"))
        return out


# -------------------------------------------------------------------- loading
def parse_set(items: list[str] | None) -> dict:
    """`["a.b=1", "c=[1, 2]"]` → nested dict; values use YAML typing (1 → int, true → bool, null → None)."""
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is set to a value and also used as a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        # `model.overrides` and `deepspeed.extra` are free-form: merge into them too
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(path: str | os.PathLike | None) -> Path:
    """A path, or the name of a shipped config (`fmnist_tiny`, `imagenet_deit_s`, ...)."""
    if path is None:
        return DEFAULT_CONFIG
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} not found (shipped configs: {names})")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got}")
    return "\n".join(lines)


def load_config(path=None, overrides: list[str] | None = None, *, check_uris: bool | None = None) -> JobConfig:
    """Read YAML, apply `--set` overrides, validate; then check that the data URIs are reachable."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = _merge(raw, parse_set(overrides))
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path))) from None
    if cfg.data.check_uris if check_uris is None else check_uris:
        check_data_uris(cfg)
    return cfg


def check_data_uris(cfg: JobConfig) -> None:
    for key in ("train", "val"):
        check_uri(getattr(cfg.data, key), f"data.{key}")
    if cfg.checkpoint.storage_path.startswith("s3://"):
        check_uri(cfg.checkpoint.storage_path, "checkpoint.storage_path", need_objects=False)
