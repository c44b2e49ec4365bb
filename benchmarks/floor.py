"""Ray Serve's own request path with no model: what any Serve application pays per request on this
machine, measured with the same client, body and transport as the app (`cfvit bench serve --floor`).

- `noop`: an ingress that reads the body (HTTP: a FastAPI route reading the whole request body; gRPC:
  `Classify` reading the image bytes of serve/proto/cfvit.proto) and answers at once.
- `noop+hop`: the same, passing the body through one deployment-handle call to a second deployment that
  answers with its size (what every CF-ViT topology with a model deployment pays at least once).
"""

# (no `from __future__ import annotations`: FastAPI must see `Request` itself to pass the request)
from typing import List, Optional

from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve.proto import cfvit_pb2 as pb

FLOOR_SYSTEMS = ("noop", "noop+hop")

noop_api = FastAPI()


@serve.deployment(name="NoopHop", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class NoopHop:
    async def take(self, files: List[bytes]) -> int:
        return sum(len(f) for f in files)


@serve.deployment(name="NoopIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(noop_api)
class NoopIngress:
    def __init__(self, hop: Optional[DeploymentHandle] = None):
        self.hop = hop

    @noop_api.post("/v1/classify")
    async def classify(self, request: Request) -> dict:
        body = await request.body()
        size = await self.hop.take.remote([body]) if self.hop is not None else len(body)
        return {"bytes": size}

    async def Classify(self, request: pb.ClassifyRequest) -> pb.ClassifyReply:  # noqa: N802 - the gRPC method
        files = list(request.images)
        size = await self.hop.take.remote(files) if self.hop is not None else sum(len(f) for f in files)
        return pb.ClassifyReply(gflops=float(size))


def floor_app(system: str) -> Application:
    """The no-op application `system` names (FLOOR_SYSTEMS)."""
    if system not in FLOOR_SYSTEMS:
        raise ValueError(f"unknown floor system {system!r}: one of {FLOOR_SYSTEMS}")
    return NoopIngress.bind(NoopHop.bind() if system == "noop+hop" else None)
