"""The gRPC face of the ingress (`serve/proto/cfvit.proto`, service `cfvit.v1.Classifier`): the messages
built from the same `Prediction`s as the HTTP answers, and the HTTP statuses of the same checks mapped to
gRPC status codes.

A refused call sets its code, the HTTP answer's JSON (`{"error", "detail", "http_status"}`) as the status
details and the answer's headers (e.g. `retry-after`) as trailing metadata, and returns an empty reply:
Ray Serve sends the code to the client (raising instead would log a traceback for a client's mistake).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Optional, Tuple

import grpc

from .inputs import finite
from .proto import cfvit_pb2 as pb
from .schemas import Prediction

SERVICE = "cfvit.v1.Classifier"
# What Ray Serve's gRPC proxy (and each direct-ingress replica) registers: `gRPCOptions.grpc_servicer_functions`.
SERVICER_FUNCTION = "serve.proto.cfvit_pb2_grpc.add_ClassifierServicer_to_server"

# The HTTP status of each check → the gRPC code that says the same (docs/API.md, "gRPC").
STATUS_CODES: Dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,    # malformed image, empty file
    401: grpc.StatusCode.UNAUTHENTICATED,     # missing or unknown API key
    408: grpc.StatusCode.DEADLINE_EXCEEDED,   # not answered within the request timeout
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # too many images, pixels or bytes
    415: grpc.StatusCode.INVALID_ARGUMENT,    # an image format outside the allow-list
    422: grpc.StatusCode.INVALID_ARGUMENT,    # eta / budget_gflops out of range or infeasible, no images
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the rate limit (trailing metadata retry-after)
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,         # a model stage overloaded or restarting: retry
}


def status_code(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.UNKNOWN)


def error_details(http_status: int, error: str, detail: Any = None) -> str:
    return json.dumps({"error": error, "detail": finite(detail), "http_status": http_status})


def refuse(context, http_status: int, error: str, detail: Any = None,
           headers: Iterable[Tuple[bytes, bytes]] = ()) -> pb.ClassifyReply:
    """Set the call's status from an HTTP answer; the empty reply to return."""
    if context is not None:
        context.set_code(status_code(http_status))
        context.set_details(error_details(http_status, error, detail))
        trailing = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if k != b"www-authenticate"]
        if trailing:
            context.set_trailing_metadata(trailing)
    return pb.ClassifyReply()


def metadata_headers(context) -> Dict[bytes, bytes]:
    """The call's metadata as the guard reads HTTP headers: lower-case byte names and values."""
    if context is None:
        return {}
    out: Dict[bytes, bytes] = {}
    for key, value in context.invocation_metadata() or ():
        out[key.lower().encode("latin-1")] = value if isinstance(value, bytes) else str(value).encode("latin-1")
    return out


def peer_address(context) -> str:
    """The client's address (`ipv4:1.2.3.4:5678` → `1.2.3.4`): the rate-limit bucket when keys are off."""
    peer = (context.peer() if context is not None else None) or "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host.strip("[]") or rest
    return peer


def request_options(request: pb.ClassifyRequest) -> Tuple[List[bytes], Optional[float], Optional[float]]:
    """(image files, eta, budget_gflops) of a Classify call; unset options are None."""
    eta = request.eta if request.HasField("eta") else None
    budget = request.budget_gflops if request.HasField("budget_gflops") else None
    return list(request.images), eta, budget


def reply(predictions: List[Prediction]) -> pb.ClassifyReply:
    return pb.ClassifyReply(predictions=[_message(p) for p in predictions],
                            gflops=sum(p.gflops for p in predictions))


def _message(p: Prediction) -> pb.Prediction:
    return pb.Prediction(label=p.label, class_name=p.class_name, confidence=p.confidence,
                         top5=[pb.TopClass(label=t.label, class_name=t.class_name, probability=t.probability)
                               for t in p.top5],
                         stage=p.stage, gflops=p.gflops, eta=p.eta, coarse_confidence=p.coarse_confidence,
                         regions=p.regions or [], model_version=p.model_version)


def as_dict(message: pb.Prediction) -> Dict[str, Any]:
    """A Prediction message as the HTTP API's JSON (for clients and tests that compare the two)."""
    return {"label": message.label, "class_name": message.class_name, "confidence": message.confidence,
            "top5": [{"label": t.label, "class_name": t.class_name, "probability": t.probability}
                     for t in message.top5],
            "stage": message.stage, "gflops": message.gflops, "eta": message.eta,
            "coarse_confidence": message.coarse_confidence if message.HasField("coarse_confidence") else None,
            "regions": list(message.regions) or None, "model_version": message.model_version}
