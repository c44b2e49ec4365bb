"""The CF-ViT Serve application: the ingress (HTTP through FastAPI, gRPC through `Classify`) → the model:
CoarseStage → (hard images only) FineStage, one FusedStage, or the backbone; or, with `model_in_ingress`,
the fused or backbone stage inside the ingress replica itself (no hop).

    serve run serve.app:build_app checkpoint=/path/to/ckpt eta=0.5
"""

import asyncio
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from fastapi import Query, Request, Response
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cfvit_common.checkpoints import pin_checkpoint

from . import grpc_api
from .deployments import EMBEDDABLE, BackboneStage, CoarseStage, FineStage, FusedStage
from .drift import monitor_for
from .guard import active_guard, admit, install, open_endpoint_warning, page_headers, proxy_host
from .http_api import BODY_DOC, ERROR_RESPONSES, api, once_more_if_replica_died, stage_unavailable, unexpected_failure
from .inputs import (
    RAW_TYPES,
    APIError,
    PixelTransform,
    check_count,
    decode_to_pixels,
    media_type,
    normalise,
    parse_json_body,
    read_body,
    resolve_eta,
)
from .messages import StageAnswer
from .model_host import load_model, model_identity
from .proto import cfvit_pb2 as pb
from .samples import sample_images
from .schemas import BatchPrediction, Health, ModelInfo, Prediction, Samples, TopClass
from .settings import ETA_MAX, ETA_MIN, AppArgs, StageOptions
from .slo import governor_for
from .timing import server_timing
from .versions import VERSION_HEADER, answered_by_one_version

logger = logging.getLogger("ray.serve")
ETA_NEVER_EXIT = 2.0  # above any softmax probability: every image goes on to the fine stage

STATIC = Path(__file__).parent / "static"
# A redeployment (a new model version, say) starts each replacement replica before its old replica stops:
# Serve's default (0) stops the old one first, and a one-replica stage then answers nothing until the new
# one has loaded the model (docs/RELIABILITY.md, "Rollout under load").
ROLLOUT_SURGE_PERCENT = 100


def _normalise_table(raw) -> Optional[List[Dict[str, float]]]:
    """The checkpoint's η table as a list of {eta, gflops[, accuracy, exit_fraction]} points."""
    if not raw:
        return None
    if isinstance(raw, dict):  # {budget_gflops: eta}
        return [{"gflops": float(k), "eta": float(v)} for k, v in raw.items()]
    points = []
    for p in raw:
        point = {"eta": float(p["eta"]), "gflops": float(p.get("gflops", p.get("budget_gflops")))}
        for key in ("accuracy", "exit_fraction"):
            if p.get(key) is not None:
                point[key] = float(p[key])
        points.append(point)
    return points


# Module-level helpers the ingress calls stand above the class: `serve.ingress` copies its methods with the
# module's globals as they are when the class is defined.
def _book_return(answers: List[StageAnswer], stage: str, received: float) -> None:
    """`<stage>_out`: the time each answer took from its replica back to the ingress."""
    for a in answers:
        a.timing[f"{stage}_out"] = (received - a.done_at) * 1000


class _Remote:
    """A stage deployment behind its handle, with the awaitable `run`/`shadow` an embedded stage has."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    def run(self, *args):
        return self.handle.run.remote(*args)

    def shadow(self, *args):
        return self.handle.shadow.remote(*args)


def _embedded_stage(args: AppArgs):
    """The fused or backbone stage inside the ingress replica (`model_in_ingress`), with its stage block's
    batching and torch threads."""
    return EMBEDDABLE[args.stages](args.checkpoint, args.fused if args.stages == "fused" else args.coarse,
                                   embedded=True)


@serve.deployment(name="CFViTIngress", max_ongoing_requests=128)
@serve.ingress(api)
class CFViTIngress:
    """HTTP and gRPC front: parses, decodes and brings each image to the model's input size, then sends all
    the images of a request in one call to the model (CoarseStage, FusedStage or BackboneStage, as `stages`
    says, or the stage this replica embeds) and, for split, the hard images' object-store references in one
    call to the fine stage."""

    def __init__(self, model: Optional[DeploymentHandle], fine: Optional[DeploymentHandle], args: AppArgs):
        torch.set_num_threads(1)
        self.args = args
        install(args)
        if not args.api_keys_file:
            warning = open_endpoint_warning(proxy_host(), args)
            if warning:
                logger.warning(warning)
        self.stage = _embedded_stage(args) if args.model_in_ingress else _Remote(model)
        self.fine = _Remote(fine) if fine is not None else None
        # The ingress pre-processes: it reads the model's description here and drops these weights.
        model, local = load_model(self.args.checkpoint)
        cfg = dict(getattr(model, "cfvit_config", {}) or {})
        self.data_config = dict(model.data_config)
        self.transform = PixelTransform(self.data_config)
        self.stage_gflops = {k: float(v) for k, v in model.stage_gflops().items()}
        # what an answer cost, by the stage that gave it (a fine answer paid for the coarse pass too)
        self.gflops = {"coarse": self.stage_gflops["coarse"], "backbone": float(model.backbone_gflops()),
                       "fine": self.stage_gflops["coarse"] + self.stage_gflops["fine"]}
        self._first_stage = {"backbone": "backbone", "fused": "fused", "split": "coarse"}[self.args.stages]
        self.num_classes = int(model.num_classes)
        self.class_names = [str(c) for c in cfg.get("class_names") or range(self.num_classes)]
        self.eta_table = _normalise_table(cfg.get("eta_table"))
        self.info = ModelInfo(
            name=str(cfg.get("name") or cfg.get("model_name") or getattr(model, "model_name", None) or "cfvit"),
            **model_identity(self.args.checkpoint, local, cfg),  # name, version, digest; not where it is stored
            class_names=self.class_names,
            num_classes=self.num_classes,
            input_size=list(self.data_config["input_size"]),
            data_config={k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            coarse_grid=int(model.coarse_grid),
            stage_gflops=self.stage_gflops,
            eta_default=self.args.eta,
            eta_range=[ETA_MIN, ETA_MAX],
            eta_table=self.eta_table,
            max_images=self.args.max_images,
            max_body_bytes=self.args.max_body_bytes,
            stages=self.args.stages,
            model_in_ingress=self.args.model_in_ingress,
            provenance=cfg.get("provenance"),
        )
        self.samples = Samples(samples=sample_images(self.class_names))
        self.slo = governor_for(self.args, self.eta_table)
        self.drift = monitor_for(self.args, cfg.get("agreement_profile"))
        self._shadow_tasks: set = set()  # referenced until done (the loop keeps only weak references)
        del model

    # ------------------------------------------------------------------ routes
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=page_headers(html))

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health()

    @api.get("/v1/model", response_model=ModelInfo)
    async def model_info(self) -> ModelInfo:
        update = {"slo": self.slo.state() if self.slo else None, "drift": self.drift.state() if self.drift else None}
        return self.info.model_copy(update=update)

    @api.get("/v1/samples", response_model=Samples)
    async def sample_list(self) -> Samples:
        """A few of the model's own held-out test images to try (the page at / shows them)."""
        return self.samples

    @api.post("/v1/classify", response_model=Union[Prediction, BatchPrediction], responses=ERROR_RESPONSES,
              openapi_extra=BODY_DOC,
              summary="Classify one image (raw or multipart) or a JSON batch of base64 images")
    async def classify(
        self,
        request: Request,
        response: Response,
        eta: Optional[float] = Query(None, ge=ETA_MIN, le=ETA_MAX,
                                     description=f"exit threshold, {ETA_MIN} ≤ η ≤ {ETA_MAX}"),
        budget_gflops: Optional[float] = Query(None, gt=0, description="average GFLOPs per image; picks η "
                                                                       "from the table"),
    ):
        t0 = time.perf_counter()
        files, batch, eta, budget_gflops = await self._read_request(request, eta, budget_gflops)
        preds, response.headers["Server-Timing"] = await self._answer_files(files, eta, budget_gflops, t0)
        response.headers[VERSION_HEADER] = preds[0].model_version
        if batch:
            return BatchPrediction(predictions=preds, gflops=sum(p.gflops for p in preds))
        return preds[0]

    async def Classify(self, request: pb.ClassifyRequest, grpc_context=None) -> pb.ClassifyReply:  # noqa: N802
        """gRPC `cfvit.v1.Classifier/Classify` (serve/proto/cfvit.proto): the checks, η and answers of
        POST /v1/classify, refusals as gRPC status codes (serve/grpc_api.py)."""
        t0 = time.perf_counter()
        guard, headers = active_guard(), grpc_api.metadata_headers(grpc_context)
        refusal = admit(guard, headers, grpc_api.peer_address(grpc_context)) if guard is not None else None
        if refusal is not None:
            return grpc_api.refuse(grpc_context, refusal.status, refusal.error, refusal.detail, refusal.headers)
        timeout = guard.deadline(headers) if guard is not None else self.args.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                files, eta, budget_gflops = grpc_api.request_options(request)
                check_count(len(files), self.args.max_images)
                size = sum(len(f) for f in files)
                if size > self.args.max_body_bytes:
                    raise APIError(413, "request body too large", {"limit_bytes": self.args.max_body_bytes,
                                                                   "content_length": size})
                preds, timing = await self._answer_files(files, eta, budget_gflops, t0)
        except APIError as e:
            return grpc_api.refuse(grpc_context, e.status, e.error, e.detail)
        except TimeoutError:
            return grpc_api.refuse(grpc_context, 408, "request timeout",
                                   {"timeout_s": timeout, "message": "not answered in time"})
        except Exception as e:  # noqa: BLE001 - every failure is a status code, never a traceback to the client
            return grpc_api.refuse(grpc_context, *unexpected_failure(e))
        if grpc_context is not None:
            grpc_context.set_trailing_metadata([("server-timing", timing), (VERSION_HEADER, preds[0].model_version)])
        return grpc_api.reply(preds)

    # ------------------------------------------------------------------ helpers
    async def _answer_files(self, files: List[bytes], eta: Optional[float], budget_gflops: Optional[float],
                        t0: float) -> Tuple[List[Prediction], str]:
        """The images of one request through the model: (one answer per image, the Server-Timing value)."""
        default_eta = self.slo.current_eta if self.slo is not None else self.args.eta
        eta_value = resolve_eta(eta, budget_gflops, default_eta, self.eta_table)
        t1 = time.perf_counter()
        images = await asyncio.to_thread(self._pixels, files)
        t2 = time.perf_counter()
        answers = await self._infer(images, eta_value)
        preds = [self._prediction(a, eta_value) for a in answers]
        timing = {"read": (t1 - t0) * 1000, "decode": (t2 - t1) * 1000}
        total_ms = (time.perf_counter() - t0) * 1000
        if self.slo is not None:
            self.slo.observe(total_ms, [p.stage for p in preds])
        if self.drift is not None:
            self.drift.observe_exits([eta_value] * len(preds), [p.stage == "coarse" for p in preds])
        return preds, server_timing([a.timing for a in answers], timing, total_ms)

    async def _read_request(self, request: Request, eta, budget_gflops):
        """(image files, whether the answer is a batch, eta, budget_gflops) of a classify request."""
        kind = media_type(request.headers.get("content-type"))
        if not (kind.startswith(RAW_TYPES) or kind in ("multipart/form-data", "application/json")):
            raise APIError(415, "unsupported content type",
                           {"content_type": kind or None,
                            "accepted": ["image/png", "image/jpeg", "image/webp", "multipart/form-data",
                                         "application/json"]})
        body = await read_body(request.stream(), request.headers.get("content-length"), self.args.max_body_bytes)
        batch = False
        if kind == "application/json":
            files, params = parse_json_body(body, self.args.max_images)
            batch = True
            if params["eta"] is not None or params["budget_gflops"] is not None:
                if eta is not None or budget_gflops is not None:
                    raise APIError(422, "give eta/budget_gflops in the query or in the JSON body, not both")
                eta, budget_gflops = params["eta"], params["budget_gflops"]
        elif kind == "multipart/form-data":
            files = await self._form_files(request, body)
            batch = len(files) > 1
        else:
            files = [body]
        check_count(len(files), self.args.max_images)
        return files, batch, eta, budget_gflops

    def _pixels(self, files: List[bytes]) -> list:
        images = decode_to_pixels(files, self.transform, self.args.max_pixels, self.args.max_request_pixels)
        if self.args.wire_dtype == "float32":  # the old path: normalised per image here, 4× the bytes
            images = [normalise(x, self.transform.mean, self.transform.std) for x in images]
        return images

    async def _infer(self, images: list, eta: float) -> List[StageAnswer]:
        """The request's answers, all of one model version (serve/versions.py)."""
        return await answered_by_one_version(lambda: self._infer_once(images, eta))

    async def _infer_once(self, images: list, eta: float) -> List[StageAnswer]:
        """One call per request to the model deployment; for split, one more for the hard images."""
        if self.args.stages == "backbone":
            answers = await once_more_if_replica_died(lambda: self.stage.run(images, time.time()))
        else:
            shadows = self.drift.pick_shadows(len(images)) if self.drift is not None else None
            answers = await once_more_if_replica_died(
                lambda: self.stage.run(images, [eta] * len(images), time.time(), shadows))
        _book_return(answers, self._first_stage, time.time())
        self._shadow([(a.take_handoff(), eta, int(a.probs.argmax())) for a in answers
                      if a.stage == "coarse" and a.exited and a.handoff is not None])
        hard_at = [i for i, a in enumerate(answers) if not a.exited]
        if hard_at:
            fine = await self._fine([answers[i].take_handoff() for i in hard_at], [images[i] for i in hard_at])
            _book_return(fine, "fine", time.time())
            for i, f in zip(hard_at, fine):
                answers[i] = answers[i].finished_by(f)
        return answers

    async def _fine(self, handoffs: list, images: list) -> List[StageAnswer]:
        """The fine stage for the hard images; if their coarse state was lost (its coarse replica died, or the
        object store lost it), once more from the pixels: a coarse pass that exits nothing, then fine."""
        try:
            return await self.fine.run(handoffs, time.time())
        except Exception as e:  # noqa: BLE001 - only the "state gone / stage restarting" kinds are retried
            if not stage_unavailable(e):
                raise
            logger.info("fine stage failed (%s): re-running %d image(s) from their pixels", type(e).__name__, len(images))
        again = await self.stage.run(images, [ETA_NEVER_EXIT] * len(images), time.time())
        return await self.fine.run([a.handoff for a in again], time.time())

    def _shadow(self, items: list) -> None:
        """Send answered (coarse-exit) images through the fine stage in the background, for the drift
        monitor: the request does not wait for it, and a failure only counts as failed."""
        items = [it for it in items if self.drift.start_shadow()]
        if not items:
            return

        async def check():
            handoffs = [h for h, _, _ in items]
            try:
                if self.args.stages == "split":
                    fine = await self.fine.run(handoffs, time.time())
                else:
                    fine = await self.stage.shadow(handoffs)
                labels = [int(f.probs.argmax()) for f in fine]
            except Exception as e:  # noqa: BLE001 - the replies went out already; just count it
                logger.info("drift monitor: a shadow call failed: %r", e)
                labels = [None] * len(items)
            for (_, eta, coarse), fine_label in zip(items, labels):
                self.drift.shadow_done(eta, coarse, fine_label)

        task = asyncio.get_running_loop().create_task(check())
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _form_files(self, request: Request, body: bytes) -> List[bytes]:
        sent = False

        async def replay():  # hand the already size-checked body to Starlette's multipart parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=self.args.max_images + 1, max_fields=16)
        except Exception as e:  # noqa: BLE001 - malformed multipart of any kind is the client's error
            detail = str(getattr(e, "detail", e))
            if detail.startswith("Too many files"):  # more than max_images: the same answer as JSON bodies
                raise APIError(413, "too many images", {"max_images": self.args.max_images,
                                                        "got": f"more than {self.args.max_images + 1}"}) from None
            raise APIError(400, "malformed multipart body", detail) from None
        try:
            uploads = form.getlist("file")
            if not uploads:
                raise APIError(422, "no `file` field in the multipart form", {"fields": list(form.keys())})
            check_count(len(uploads), self.args.max_images)
            files = []
            for u in uploads:
                if isinstance(u, str):
                    raise APIError(422, "`file` must be a file upload, not a text field")
                files.append(await u.read())
            return files
        finally:
            await form.close()  # spooled upload files are released now, not at garbage collection

    def _prediction(self, answer: StageAnswer, eta: float) -> Prediction:
        k = min(5, self.num_classes)
        top_p, top_i = answer.probs.topk(k)
        top = [TopClass(label=int(i), class_name=self.class_names[int(i)], probability=float(p))
               for p, i in zip(top_p, top_i)]
        coarse = answer.coarse_probs
        return Prediction(label=top[0].label, class_name=top[0].class_name, confidence=top[0].probability,
                          top5=top, stage=answer.stage, gflops=self.gflops[answer.stage], eta=eta,
                          coarse_confidence=None if coarse is None else float(coarse.max()),
                          regions=answer.selected, model_version=answer.version)


def _stage_options(deployment, opts: StageOptions, name: str):
    return deployment.options(
        name=name,
        ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus,
                           **({"resources": opts.resources} if opts.resources else {})},
        max_ongoing_requests=opts.max_ongoing_requests,
        max_replicas_per_node=opts.max_replicas_per_node,
        max_surge_percent=ROLLOUT_SURGE_PERCENT,
        **({"autoscaling_config": opts.autoscaling_config} if opts.autoscaling_config
           else {"num_replicas": opts.num_replicas}),
    )


def _ingress_options(cfg: AppArgs):
    """The ingress's placement and scaling: its own, or, when it embeds the model, the stage block's (its CPUs
    and GPUs plus the ingress's CPUs, the stage's request limit and autoscaling)."""
    resources = {**cfg.ingress_resources}
    if not cfg.model_in_ingress:
        actor = {"num_cpus": cfg.ingress_num_cpus}
        scaling = ({"autoscaling_config": cfg.ingress_autoscaling_config} if cfg.ingress_autoscaling_config
                   else {"num_replicas": 1})
        return {"ray_actor_options": {**actor, **({"resources": resources} if resources else {})},
                "max_surge_percent": ROLLOUT_SURGE_PERCENT, **scaling}
    opts = cfg.fused if cfg.stages == "fused" else cfg.coarse
    resources.update(opts.resources)
    actor = {"num_cpus": opts.num_cpus + cfg.ingress_num_cpus, "num_gpus": opts.num_gpus,
             **({"resources": resources} if resources else {})}
    scaling = ({"autoscaling_config": opts.autoscaling_config} if opts.autoscaling_config
               else {"num_replicas": opts.num_replicas})
    return {"ray_actor_options": actor, "max_ongoing_requests": opts.max_ongoing_requests,
            "max_replicas_per_node": opts.max_replicas_per_node, "max_surge_percent": ROLLOUT_SURGE_PERCENT, **scaling}


def build_app(args: AppArgs) -> Application:
    """The Serve application builder, typed as Ray's application builders are: `serve run serve.app:build_app
    k=v …` and a config file's `args:` reach it validated as `AppArgs` (unknown keys refused by name). Called
    directly, a plain dict of the same arguments is validated the same way. A `models:/NAME@ALIAS` checkpoint
    is resolved to the version the alias names now, and that version is bound to every deployment."""
    cfg = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    # An alias is read once, here: every replica, now and added later, loads this one version.
    cfg = cfg.model_copy(update={"checkpoint": pin_checkpoint(cfg.checkpoint)})
    model = fine = None
    if cfg.model_in_ingress:
        pass  # the ingress replica loads and runs the stage itself
    elif cfg.stages == "backbone":
        model = _stage_options(BackboneStage, cfg.coarse, "BackboneStage").bind(cfg.checkpoint, cfg.coarse)
    elif cfg.stages == "fused":
        model = _stage_options(FusedStage, cfg.fused, "FusedStage").bind(cfg.checkpoint, cfg.fused)
    else:
        model = _stage_options(CoarseStage, cfg.coarse, "CoarseStage").bind(cfg.checkpoint, cfg.coarse, cfg.handoff)
        fine = _stage_options(FineStage, cfg.fine, "FineStage").bind(cfg.checkpoint, cfg.fine)
    return CFViTIngress.options(**_ingress_options(cfg)).bind(model, fine, cfg)
