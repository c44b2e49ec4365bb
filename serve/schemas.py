"""Pydantic request/response models of the HTTP API (they also make the OpenAPI document)."""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, Field

from .settings import ETA_MAX, ETA_MIN


class TopClass(BaseModel):
    label: int
    class_name: str
    probability: float


class Prediction(BaseModel):
    label: int = Field(description="predicted class index")
    class_name: str
    confidence: float = Field(description="softmax probability of the predicted class")
    top5: List[TopClass]
    stage: Literal["coarse", "fine", "backbone"] = Field(
        description="the stage that answered (`backbone` only when the app serves the single-stage baseline)")
    gflops: float = Field(description="GFLOPs (multiply-accumulates) spent: coarse, coarse + fine, or the backbone's")
    eta: float = Field(description="the exit threshold applied to this image")
    coarse_confidence: Optional[float] = Field(
        description="top softmax probability of the coarse stage (null for the `backbone` topology: no coarse pass)")
    regions: Optional[List[int]] = Field(
        None, description="fine answers: the coarse-grid indices (row-major) that were re-split")
    model_version: str = Field(description="the model version that answered (every image of a request: the same "
                                           "one, also during a rollout; also the `cfvit-model-version` header)")


class BatchPrediction(BaseModel):
    predictions: List[Prediction]
    gflops: float = Field(description="total GFLOPs spent on the request")


class ClassifyJSON(BaseModel):
    """JSON body of POST /v1/classify."""

    images: List[str] = Field(description="base64-encoded PNG/JPEG files (data: URLs accepted)")
    eta: Optional[float] = Field(None, ge=ETA_MIN, le=ETA_MAX, description="exit threshold")
    budget_gflops: Optional[float] = Field(None, gt=0, description="average GFLOPs per image; picks η from the table")

    model_config = {"extra": "forbid"}


class ModelInfo(BaseModel):
    name: str
    registered_model: Optional[str] = Field(None, description="the model's name in the registry (null: served "
                                                               "from a checkpoint folder)")
    version: str = Field(description="the registered version, else the checkpoint's version or a short hash")
    digest: Optional[str] = Field(None, description="sha256 of the served weights (model.safetensors)")
    class_names: List[str]
    num_classes: int
    input_size: List[int] = Field(description="C, H, W the images are brought to")
    data_config: Dict[str, Any]
    coarse_grid: int
    stage_gflops: Dict[str, float]
    eta_default: float
    eta_range: List[float]
    eta_table: Optional[List[Dict[str, float]]] = None
    max_images: int
    max_body_bytes: int
    stages: Literal["split", "fused", "backbone"] = Field(description="the topology serving the model")
    model_in_ingress: bool = Field(False, description="the model runs inside the ingress replicas (no hop)")
    slo: Optional[Dict[str, Any]] = Field(None, description="SLO mode: current η, why, p99, floor, exit rate "
                                                            "(null when off)")
    provenance: Optional[Dict[str, Any]] = Field(
        None, description="an imported model's origin: the authors' repository and model, the source file's "
                          "sha256, their checkpoint's own figures and the published accuracy per η (null for "
                          "models trained here)")
    drift: Optional[Dict[str, Any]] = Field(None, description="drift monitor: shadowed images, rolling coarse-fine "
                                                              "agreement and exit rate vs calibration, alert (null "
                                                              "for the backbone topology)")


class Sample(BaseModel):
    label: Optional[int] = Field(description="the image's true class (null for a photograph no single class fits)")
    class_name: str = Field(description="the true class's name, or the photograph's name")
    index: int = Field(description="index in the data set's test split (or in the list of photographs)")
    image: str = Field(description="PNG as a data: URL")


class Samples(BaseModel):
    samples: List[Sample] = Field(description="a few of the model's own test images (empty when the server "
                                              "has none for this model)")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorBody(BaseModel):
    error: str
    detail: Any = None
