"""Arguments of the Serve application (what `serve run serve.app:build_app k=v` and config.yaml pass).

Unknown keys are refused with their name (a typo never silently falls back to a default), and a
partial stage block (`fine: {max_batch_size: 8}`) is merged over that stage's defaults, its
`autoscaling_config` key by key, so it changes only what it names (`autoscaling_config: null`
switches autoscaling off).
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# η above 1 sends every image to the fine stage (no softmax reaches it); we accept a hair above 1 so
# clients can ask for "always fine" without an unbounded number meaning the same thing.
ETA_MIN = 0.0
ETA_MAX = 1.0001

STAGE_BLOCKS = ("coarse", "fine", "fused")


class StageOptions(BaseModel):
    """Batching, placement and autoscaling of one model stage."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=5.0)
    # fused replicas only: the fine stage runs on hard images pooled across coarse batches, `fine_batch_size`
    # at a time, or fewer after `fine_wait_timeout_s` (as `cfvit.streaming.infer_stream` does offline).
    fine_batch_size: int = Field(16, ge=1, le=4096)
    fine_wait_timeout_s: float = Field(0.05, ge=0.0, le=5.0)
    # Logical CPUs per replica. Half a CPU by default so one coarse + one fine + the ingress fit a
    # 2-core laptop (`cfvit serve`); serve/config.yaml reserves whole CPUs on a cluster.
    num_cpus: float = Field(0.5, ge=0.0)
    # A replica that reserves a GPU runs its model there; "auto" precision is bf16 autocast on CUDA, fp32 on CPU.
    num_gpus: float = Field(0.0, ge=0.0)
    # Custom Ray resources each replica needs (e.g. {"cpu_pool": 1} to keep it on such nodes), and at most
    # this many replicas on one node (spread across nodes, so losing one node loses a share of the replicas).
    resources: Dict[str, float] = Field(default_factory=dict)
    max_replicas_per_node: Optional[int] = Field(None, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Intra-op threads for torch in each replica; 0 = one per CPU the replica reserves (at least 1).
    torch_threads: int = Field(0, ge=0)
    # Requests a replica holds at once (queued + in its batch): it caps the batch it can form.
    max_ongoing_requests: int = Field(256, ge=1)
    num_replicas: int = Field(1, ge=1, description="used when autoscaling_config is null")
    autoscaling_config: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _batch_fits(self) -> "StageOptions":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) < max_batch_size "
                             f"({self.max_batch_size}): a replica could never form a full batch")
        return self


# Delays from `cfvit bench serve --autoscale` (docs/BENCHMARKS.md "Autoscaling, seen"): new capacity took
# far longer to start (a node ≈17 s, a replica ≈30 s on a busy 2-core box) than the 5 s upscale delay, so
# the delay is kept short; a 10 s look-back (Serve's default: 30 s) lets a load step show in the average
# within seconds. Scale-down lost no request (a leaving replica drains), but a short delay made a node
# leave and come back: 60 s holds capacity across dips shorter than about twice its start time.
def _autoscaling(max_replicas: int, target: int) -> Dict[str, Any]:
    return {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max_replicas,
            "target_ongoing_requests": target, "upscale_delay_s": 5, "downscale_delay_s": 60,
            "look_back_period_s": 10}


# Every image pays the coarse stage, so it gets the most replicas. A replica is "busy" when about one
# batch is waiting on it.
COARSE_DEFAULTS: Dict[str, Any] = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005,
                                   "autoscaling_config": _autoscaling(4, 32)}
# Sized for the share of hard images: with DeiT-S at η≈0.5 about a quarter of the images go on and the
# fine pass costs ≈2.7× the coarse one, so fine work ≈ 0.65× coarse work → at most 3 replicas where
# coarse has 4. Its batches fill more slowly (only hard images), hence the longer wait.
FINE_DEFAULTS: Dict[str, Any] = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01,
                                 "autoscaling_config": _autoscaling(3, 16)}
# One replica type runs both stages (no coarse state crosses processes); it scales as one.
FUSED_DEFAULTS: Dict[str, Any] = {"max_batch_size": 32, "batch_wait_timeout_s": 0.005, "fine_batch_size": 16,
                                  "fine_wait_timeout_s": 0.05, "autoscaling_config": _autoscaling(4, 32)}
_DEFAULTS = {"coarse": COARSE_DEFAULTS, "fine": FINE_DEFAULTS, "fused": FUSED_DEFAULTS}


def merge_stage(name: str, given: Any) -> Any:
    """A stage block merged over that stage's defaults (autoscaling_config merged key by key)."""
    if isinstance(given, StageOptions):
        given = given.model_dump(exclude_unset=True)
    if not isinstance(given, dict):
        return given  # pydantic reports the wrong type
    base = _DEFAULTS[name]
    merged = {**base, **given}
    auto_base, auto_given = base.get("autoscaling_config"), given.get("autoscaling_config", {})
    if isinstance(auto_base, dict) and isinstance(auto_given, dict):
        merged["autoscaling_config"] = {**auto_base, **auto_given}
    return merged


class AppArgs(BaseModel):
    """Arguments of `build_app`.

    `checkpoint`: a `cfvit.save`d directory, an `s3://bucket/prefix` holding one (endpoint from
    `AWS_ENDPOINT_URL`), or an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/…`).
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    # split: CoarseStage and FineStage deployments, each batched and autoscaled on its own; the coarse
    # state goes from a coarse replica to a fine one through the object store (only a reference passes
    # through the ingress). fused: one FusedStage deployment runs both stages in each replica and pools
    # hard images across coarse batches (no coarse state leaves the process). backbone: the plain ViT on
    # every fine token through the same ingress (the baseline of `cfvit bench serve`, or an A/B
    # comparison); the `coarse` options then apply to it.
    stages: Literal["split", "fused", "backbone"] = "split"
    # fused or backbone only: each ingress replica loads the stage and runs it itself (no hop to a model
    # deployment, nothing serialised); the ingress then takes that stage block's CPUs/GPUs, request limit and
    # autoscaling (plus ingress_num_cpus), so the model scales with the ingress.
    model_in_ingress: bool = False
    eta: float = Field(0.5, ge=ETA_MIN, le=ETA_MAX, description="default η when a request names none")
    max_images: int = Field(32, ge=1, le=1024, description="most images in one request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, width × height")
    # What crosses the object store between the ingress and the stages: decoded, resized and cropped
    # uint8 pixels (normalised in batches inside the stage replicas), or normalised float32 (4× larger,
    # normalised per image in the ingress; kept to measure the difference).
    wire_dtype: Literal["uint8", "float32"] = "uint8"
    # split only: "direct" hands image + coarse state from the coarse replica to the fine one through the
    # object store; "ingress" sends the state back to the ingress and on to the fine stage (to measure).
    handoff: Literal["direct", "ingress"] = "direct"
    coarse: StageOptions = Field(default_factory=lambda: StageOptions(**COARSE_DEFAULTS))
    fine: StageOptions = Field(default_factory=lambda: StageOptions(**FINE_DEFAULTS))
    fused: StageOptions = Field(default_factory=lambda: StageOptions(**FUSED_DEFAULTS))
    # SLO mode (off while latency_slo_ms is null; serve/slo.py): when the p99 latency the ingress measures
    # passes the target, the default η steps down the model's η table, never below the floor (min_eta, or
    # the lowest η whose table accuracy is within max_accuracy_drop of the default's), and back up once p99
    # falls below slo_recover_ratio × target. Requests that name their own eta/budget_gflops are untouched.
    latency_slo_ms: Optional[float] = Field(None, gt=0, description="p99 target of SLO mode (null: off)")
    min_eta: Optional[float] = Field(None, ge=ETA_MIN, le=ETA_MAX, description="SLO mode's lowest η")
    max_accuracy_drop: Optional[float] = Field(None, ge=0, le=1, description="SLO mode's floor as accuracy")
    slo_window_s: float = Field(10.0, gt=0, le=600, description="latencies judged by SLO mode")
    slo_check_s: float = Field(1.0, gt=0, le=60, description="how often SLO mode may take a step")
    slo_recover_ratio: float = Field(0.6, gt=0, lt=1, description="p99 below this × target steps η up")
    slo_min_samples: int = Field(20, ge=1, description="latencies needed before SLO mode decides")
    # Drift monitor (serve/drift.py; split and fused): shadow_fraction of the images the coarse stage answers
    # also go through the fine stage after the reply (0: none); the rolling coarse-fine agreement and the exit
    # rate are compared with the checkpoint's calibrated agreement_profile at each image's η, and a warning is
    # logged when agreement falls more than drift_agreement_margin below it, or the exit rate moves more
    # than drift_exit_rate_margin away from it.
    shadow_fraction: float = Field(0.01, ge=0, le=1, description="share of coarse answers re-checked by the fine stage")
    drift_agreement_margin: float = Field(0.1, gt=0, le=1)
    drift_exit_rate_margin: float = Field(0.15, gt=0, le=1)
    drift_window: int = Field(200, ge=1, description="shadowed images in the rolling agreement")
    drift_exit_window: int = Field(500, ge=1, description="answered images in the rolling exit rate")
    drift_min_samples: int = Field(50, ge=1, description="shadowed images needed before an agreement alert")
    drift_seed: Optional[int] = Field(None, description="seed of the shadow sampling (tests)")
    # The front door (serve/guard.py). api_keys_file: one key per line or `sha256:HEX` of one; every /v1/
    # route then needs `Authorization: Bearer KEY`; re-read within keys_reload_s of a change. Rate limit: a
    # token bucket per key (per client address without keys) in each ingress replica. request_timeout_s:
    # 408 for a request not answered in time (a client's x-request-timeout-seconds may only shorten it).
    api_keys_file: Optional[str] = Field(None, description="file of API keys (null: /v1 needs no key)")
    keys_reload_s: float = Field(5.0, gt=0, le=300, description="how often a changed keys file is re-read")
    rate_limit_per_s: Optional[float] = Field(None, gt=0, description="requests per second per key (null: none)")
    rate_limit_burst: Optional[int] = Field(None, ge=1, description="requests at once (default: one second's)")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="408 after this long")
    max_request_pixels: int = Field(64_000_000, ge=1, description="decoded pixels of all a request's images")
    ingress_num_cpus: float = Field(0.1, ge=0.0)
    ingress_resources: Dict[str, float] = Field(default_factory=dict, description="custom Ray resources of "
                                                "each ingress replica (e.g. to keep it on the head node)")
    ingress_autoscaling_config: Optional[Dict[str, Any]] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})

    @model_validator(mode="after")
    def _embeddable(self) -> "AppArgs":
        if self.model_in_ingress and self.stages == "split":
            raise ValueError("model_in_ingress takes stages fused or backbone: split's point is two deployments "
                             "that scale apart")
        return self

    @model_validator(mode="before")
    @classmethod
    def _merge_stage_blocks(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for name in STAGE_BLOCKS:
                if name in data and data[name] is not None:
                    data[name] = merge_stage(name, data[name])
        return data
