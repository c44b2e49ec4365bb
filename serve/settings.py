"""Arguments of the Serve application (what `serve run serve.app:build_app k=v` and config.yaml pass)."""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, Field

# η above 1 sends every image to the fine stage (no softmax reaches it); we accept a hair above 1 so
# clients can ask for "always fine" without an unbounded number meaning the same thing.
ETA_MIN = 0.0
ETA_MAX = 1.0001


class StageOptions(BaseModel):
    """Batching, placement and autoscaling of one model stage."""

    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=5.0)
    # Logical CPUs per replica. Half a CPU by default so one coarse + one fine + the ingress fit a
    # 2-core laptop (`cfvit serve`); serve/config.yaml reserves whole CPUs on a cluster.
    num_cpus: float = Field(0.5, ge=0.0)
    # A replica that reserves a GPU runs its model there; "auto" precision is bf16 autocast on CUDA, fp32 on CPU.
    num_gpus: float = Field(0.0, ge=0.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Intra-op threads for torch in each replica; 0 = one per CPU the replica reserves (at least 1).
    torch_threads: int = Field(0, ge=0)
    max_ongoing_requests: int = Field(256, ge=1)
    num_replicas: int = Field(1, ge=1, description="used when autoscaling_config is null")
    autoscaling_config: Optional[Dict[str, Any]] = None


def _coarse_default() -> StageOptions:
    # Every image pays the coarse stage, so it gets the most replicas. A replica is "busy" when about
    # one batch is waiting on it.
    return StageOptions(
        max_batch_size=32,
        batch_wait_timeout_s=0.005,
        autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                            "target_ongoing_requests": 32, "upscale_delay_s": 5, "downscale_delay_s": 60},
    )


def _fine_default() -> StageOptions:
    # Sized for the share of hard images: with DeiT-S at η≈0.5 about a quarter of the images go on and
    # the fine pass costs ≈2.7× the coarse one, so fine work ≈ 0.65× coarse work → at most 3 replicas
    # where coarse has 4. Its batches fill more slowly (only hard images), hence the longer wait.
    return StageOptions(
        max_batch_size=16,
        batch_wait_timeout_s=0.01,
        autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 3,
                            "target_ongoing_requests": 16, "upscale_delay_s": 5, "downscale_delay_s": 60},
    )


class AppArgs(BaseModel):
    """Arguments of `build_app`.

    `checkpoint`: a `cfvit.save`d directory, an `s3://bucket/prefix` holding one (endpoint from
    `AWS_ENDPOINT_URL`), or an MLflow model URI (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/…`).
    """

    checkpoint: str
    # "backbone" serves the plain ViT on every fine token through the same ingress (the baseline of
    # `cfvit bench serve`, or an A/B comparison); the `coarse` options then apply to it.
    stages: Literal["cfvit", "backbone"] = "cfvit"
    eta: float = Field(0.5, ge=ETA_MIN, le=ETA_MAX, description="default η when a request names none")
    max_images: int = Field(32, ge=1, le=1024, description="most images in one request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, width × height")
    coarse: StageOptions = Field(default_factory=_coarse_default)
    fine: StageOptions = Field(default_factory=_fine_default)
    ingress_num_cpus: float = Field(0.1, ge=0.0)
    ingress_autoscaling_config: Optional[Dict[str, Any]] = Field(
        default_factory=lambda: {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})
