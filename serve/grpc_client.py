"""A small Python client of the gRPC API (`serve/proto/cfvit.proto`, `cfvit serve --grpc-port N`):

    from serve.grpc_client import Classifier

    with Classifier("127.0.0.1:9000", api_key="…") as c:
        answers = c.classify([open("cat.jpg", "rb").read()], eta=0.5)
    answers[0]["class_name"], answers[0]["stage"], answers[0]["model_version"]

Answers are the HTTP API's JSON predictions (`grpc_api.as_dict`); a refusal raises `ClassifyError` with the
gRPC status code and the HTTP answer it stands for (status, error, detail, retry-after).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

import grpc

from .grpc_api import as_dict
from .proto import cfvit_pb2 as pb
from .proto import cfvit_pb2_grpc as pb_grpc


class ClassifyError(Exception):
    """A refused or failed call: `code` (gRPC), `http_status`, `error`, `detail`, `retry_after_s`."""

    def __init__(self, rpc_error: grpc.RpcError):
        self.code = rpc_error.code()
        try:  # the server's refusals carry the HTTP answer's JSON; transport failures do not
            answer = json.loads(rpc_error.details() or "")
        except ValueError:
            answer = {"error": rpc_error.details(), "detail": None, "http_status": None}
        self.http_status: Optional[int] = answer.get("http_status")
        self.error: str = answer.get("error") or ""
        self.detail: Any = answer.get("detail")
        trailing = dict(rpc_error.trailing_metadata() or ())
        self.retry_after_s: Optional[float] = float(trailing["retry-after"]) if "retry-after" in trailing else None
        super().__init__(f"{self.code.name}" + (f" (HTTP {self.http_status})" if self.http_status else "")
                         + f": {self.error}")


class Classifier:
    """A channel to one server address; `api_key` is sent as `authorization: Bearer KEY` on every call.
    `secure=True` uses TLS with the system's roots (for a server behind a TLS-terminating load balancer)."""

    def __init__(self, address: str, api_key: Optional[str] = None, *, secure: bool = False,
                 timeout_s: float = 60.0):
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials()) if secure
                        else grpc.insecure_channel(address))
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    def classify(self, images: Sequence[bytes], *, eta: Optional[float] = None,
                 budget_gflops: Optional[float] = None) -> List[Dict[str, Any]]:
        """One prediction per image file (PNG, JPEG or WebP bytes), in order."""
        request = pb.ClassifyRequest(images=list(images), eta=eta, budget_gflops=budget_gflops)
        try:
            reply = self.stub.Classify(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise ClassifyError(e) from None
        return [as_dict(p) for p in reply.predictions]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
