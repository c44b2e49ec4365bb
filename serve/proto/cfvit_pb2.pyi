from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "eta", "budget_gflops")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    eta: float
    budget_gflops: float
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., eta: _Optional[float] = ..., budget_gflops: _Optional[float] = ...) -> None: ...

class TopClass(_message.Message):
    __slots__ = ("label", "class_name", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: int
    class_name: str
    probability: float
    def __init__(self, label: _Optional[int] = ..., class_name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "class_name", "confidence", "top5", "stage", "gflops", "eta", "coarse_confidence", "regions", "model_version")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TOP5_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    COARSE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    label: int
    class_name: str
    confidence: float
    top5: _containers.RepeatedCompositeFieldContainer[TopClass]
    stage: str
    gflops: float
    eta: float
    coarse_confidence: float
    regions: _containers.RepeatedScalarFieldContainer[int]
    model_version: str
    def __init__(self, label: _Optional[int] = ..., class_name: _Optional[str] = ..., confidence: _Optional[float] = ..., top5: _Optional[_Iterable[_Union[TopClass, _Mapping]]] = ..., stage: _Optional[str] = ..., gflops: _Optional[float] = ..., eta: _Optional[float] = ..., coarse_confidence: _Optional[float] = ..., regions: _Optional[_Iterable[int]] = ..., model_version: _Optional[str] = ...) -> None: ...

class ClassifyReply(_message.Message):
    __slots__ = ("predictions", "gflops")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    gflops: float
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., gflops: _Optional[float] = ...) -> None: ...
