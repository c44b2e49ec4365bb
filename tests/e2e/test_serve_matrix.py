"""The serving matrix over real HTTP: every topology (`stages`) × `wire_dtype` × `handoff` (split) answers a
JSON batch exactly as the library does at η 0, where the batch splits, 0.7 and > 1 (the backbone as the
plain ViT's own forward, at its GFLOPs), keeps each concurrent request's η, refuses a bad input with a JSON
400 and answers on, says in `Server-Timing` where the time went, and counts the drift monitor's shadow
checks as the library's coarse and fine answers say: drift on, off (`shadow_fraction: 0`) and without a
calibrated profile (the checkpoint served from `s3://`).

All cells share the session's Serve instance; the split / uint8 / direct cell is the session's test app
itself, the others are deployed side by side in two waves (split, then fused and backbone) so that at most
a dozen replicas hold memory at once.
"""
from __future__ import annotations

import base64
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import numpy as np
import pytest
import torch

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform, decode_image
from cfvit_common.checkpoints import upload_checkpoint
from cfvit_common.tracking import file_sha256
from serve.timing import parse_server_timing
from tests.fixtures.serve_app import APP_NAME, FIXED, app_log, delete, deploy
from tests.fixtures.services import png_bytes as png

S3_URI = "s3://cfvit-serve-matrix/no-profile"
SHADOW_ALL = {"shadow_fraction": 1.0, "drift_seed": 0}
CELLS: Dict[str, dict] = {
    "split-u8-direct": {"stages": "split", "wire_dtype": "uint8", "handoff": "direct", **SHADOW_ALL},  # the test app
    "split-f32-direct": {"stages": "split", "wire_dtype": "float32", "handoff": "direct", **SHADOW_ALL},
    "split-u8-ingress": {"stages": "split", "wire_dtype": "uint8", "handoff": "ingress", **SHADOW_ALL},
    # from S3, a copy of the checkpoint without its agreement profile: drift reports with no reference
    "split-f32-ingress": {"stages": "split", "wire_dtype": "float32", "handoff": "ingress", "checkpoint": S3_URI,
                          **SHADOW_ALL},
    "fused-u8": {"stages": "fused", "wire_dtype": "uint8", **SHADOW_ALL},
    "fused-f32": {"stages": "fused", "wire_dtype": "float32", "shadow_fraction": 0.0},  # drift off
    "backbone-u8": {"stages": "backbone", "wire_dtype": "uint8"},
    "backbone-f32": {"stages": "backbone", "wire_dtype": "float32"},
}
WAVES = [["split-f32-direct", "split-u8-ingress", "split-f32-ingress"],
         ["fused-u8", "fused-f32", "backbone-u8", "backbone-f32"]]
# Server-Timing entries every answer of a topology has, and those of images the fine stage answered
HOPS = {"split": ({"read", "decode", "coarse_in", "coarse_queue", "coarse_compute", "coarse_batch", "coarse_out", "app"},
                  {"fine_in", "fine_fetch", "fine_queue", "fine_compute", "fine_batch", "fine_out"}),
        "fused": ({"read", "decode", "fused_in", "coarse_queue", "coarse_compute", "coarse_batch", "fused_out", "app"},
                  {"fine_queue", "fine_compute", "fine_batch"}),
        "backbone": ({"read", "decode", "backbone_in", "backbone_queue", "backbone_compute", "backbone_batch",
                      "backbone_out", "app"}, set())}


@dataclass
class Reference:
    """The library's answers for the test images, every stage for every image."""

    files: List[bytes]
    coarse_conf: np.ndarray
    coarse_label: np.ndarray
    fine_conf: np.ndarray
    fine_label: np.ndarray
    selected: List[List[int]]
    backbone_conf: np.ndarray
    backbone_label: np.ndarray
    gflops: Dict[str, float]
    mid_eta: float  # where the batch splits: half the images exit

    def expected(self, i: int, eta: float, stages: str) -> dict:
        if stages == "backbone":
            return {"stage": "backbone", "label": int(self.backbone_label[i]), "confidence": self.backbone_conf[i],
                    "gflops": self.gflops["backbone"], "regions": None, "coarse_confidence": None}
        if self.coarse_conf[i] >= eta:
            return {"stage": "coarse", "label": int(self.coarse_label[i]), "confidence": self.coarse_conf[i],
                    "gflops": self.gflops["coarse"], "regions": None, "coarse_confidence": self.coarse_conf[i]}
        return {"stage": "fine", "label": int(self.fine_label[i]), "confidence": self.fine_conf[i],
                "gflops": self.gflops["coarse"] + self.gflops["fine"], "regions": self.selected[i],
                "coarse_confidence": self.coarse_conf[i]}

    def exits(self, eta: float) -> np.ndarray:
        return self.coarse_conf >= eta

    def agree(self) -> np.ndarray:
        return self.coarse_label == self.fine_label


@pytest.fixture(scope="module")
def ref(fmnist_checkpoint) -> Reference:
    """8 test images spread over the coarse confidences, away from the calibration images, and their answers."""
    model = cfvit.load(str(fmnist_checkpoint)).eval()
    tf = build_transform(model.data_config)
    pool = load_fashion_mnist("test")[0][2200:2500]
    files = [png(a) for a in pool]
    x = torch.stack([tf(decode_image(f)) for f in files])
    with torch.no_grad():
        out = model.infer(x, 2.0, return_indices=True)  # both stages for every image
        backbone = model.vit(x).float().softmax(-1)
    conf = out.coarse_logits.softmax(-1).amax(-1).numpy()
    order = np.argsort(conf)
    pick = order[np.linspace(0, len(order) - 1, 8).round().astype(int)]  # from least to most confident
    c = conf[pick]
    assert c[4] - c[3] > 2e-3, c  # a threshold between them splits the batch, clear of float noise
    fine = out.logits.softmax(-1)
    g = model.stage_gflops()
    return Reference(files=[files[i] for i in pick], coarse_conf=c,
                     coarse_label=out.coarse_logits.argmax(-1).numpy()[pick],
                     fine_conf=fine.amax(-1).numpy()[pick], fine_label=fine.argmax(-1).numpy()[pick],
                     selected=[sorted(out.selected[i].tolist()) for i in pick],
                     backbone_conf=backbone.amax(-1).numpy()[pick], backbone_label=backbone.argmax(-1).numpy()[pick],
                     gflops={"coarse": g["coarse"], "fine": g["fine"], "backbone": model.backbone_gflops()},
                     mid_eta=float((c[3] + c[4]) / 2))


@pytest.fixture(scope="module")
def s3_checkpoint(s3_server, fmnist_checkpoint, tmp_path_factory) -> str:
    """The session checkpoint in S3 without its agreement profile (as one calibrated before it existed)."""
    local = tmp_path_factory.mktemp("no-profile")
    for f in fmnist_checkpoint.iterdir():
        shutil.copy(f, local / f.name)
    cfg = json.loads((local / "config.json").read_text())
    cfg.pop("agreement_profile")
    (local / "config.json").write_text(json.dumps(cfg))
    s3_server.client().create_bucket(Bucket=S3_URI.split("/")[2])
    upload_checkpoint(local, S3_URI)
    return S3_URI


class Matrix:
    """The cells' URLs; a wave is deployed when a cell of it is first asked for, and the wave before it deleted."""

    def __init__(self, base: str, served: str, checkpoint: str):
        self.base, self.served, self.checkpoint = base, served, checkpoint
        self.wave: Optional[List[str]] = None
        self.urls: Dict[str, str] = {}

    def url(self, cell: str) -> str:
        if cell == "split-u8-direct":
            return self.served
        wave = next(w for w in WAVES if cell in w)
        if wave != self.wave:
            self.close()
            apps = {c: {**FIXED, "checkpoint": self.checkpoint, **CELLS[c]} for c in wave}
            self.urls, self.wave = deploy(self.base, apps), wave
        return self.urls[cell]

    def close(self) -> None:
        if self.wave:
            delete(*self.wave)
        self.wave = None


@pytest.fixture(scope="module")
def matrix(serve_instance, served, fmnist_checkpoint, s3_checkpoint):
    m = Matrix(serve_instance, served, str(fmnist_checkpoint))
    try:
        yield m
    finally:
        m.close()


def post_batch(url: str, files: List[bytes], eta: float) -> httpx.Response:
    body = {"images": [base64.b64encode(f).decode() for f in files], "eta": eta}
    return httpx.post(url + "/v1/classify", json=body, timeout=60)


def assert_prediction(pred: dict, want: dict, eta: float, where: str) -> None:
    got = {k: pred[k] for k in ("stage", "label", "gflops", "regions")}
    got["regions"] = sorted(got["regions"]) if got["regions"] is not None else None
    assert got == {k: want[k] for k in got} | {"gflops": pytest.approx(want["gflops"])}, (where, pred, want)
    assert pred["confidence"] == pytest.approx(float(want["confidence"]), abs=1e-4), (where, pred, want)
    if want["coarse_confidence"] is None:
        assert pred["coarse_confidence"] is None, where
    else:
        assert pred["coarse_confidence"] == pytest.approx(float(want["coarse_confidence"]), abs=1e-4), where
    assert pred["eta"] == eta and pred["top5"][0]["label"] == pred["label"], where


def assert_timing(header: str, stages: str, any_fine: bool, where: str) -> None:
    """Server-Timing names every hop the answer took, each a duration ≥ 0 (batch sizes 1–16) within `app`."""
    t = parse_server_timing(header)
    always, fine = HOPS[stages]
    assert always | (fine if any_fine else set()) <= set(t), (where, header)
    assert all(v >= 0 for v in t.values()) and all(1 <= v <= 16 for k, v in t.items() if k.endswith("_batch")), header
    assert t["read"] + t["decode"] <= t["app"], (where, header)


def drift_state(url: str) -> Optional[dict]:
    return httpx.get(url + "/v1/model", timeout=10).json()["drift"]


def drift_settled(url: str, shadows: int, timeout: float = 30) -> dict:
    """/v1/model's drift state once `shadows` shadow checks in all have come back (or failed, or were skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        d = drift_state(url)
        if d["shadowed"] + d["failed"] + d["skipped"] >= shadows or time.monotonic() > deadline:
            return d
        time.sleep(0.2)


@pytest.mark.parametrize("cell", list(CELLS))
def test_each_topology_answers_as_the_library(cell, matrix, ref):
    args = CELLS[cell]
    stages, url, name = args["stages"], matrix.url(cell), APP_NAME if cell == "split-u8-direct" else cell
    info = httpx.get(url + "/v1/model", timeout=10).json()
    # the same weights from a folder or from S3: the same identity, never where they are stored
    assert info["stages"] == stages and info["registered_model"] is None and S3_URI not in json.dumps(info)
    assert info["digest"] == "sha256:" + file_sha256(Path(matrix.checkpoint) / "model.safetensors")
    drift0 = drift_state(url)
    assert (drift0 is None) == (stages == "backbone") and info["slo"] is None
    shadow = args.get("shadow_fraction", 0.01) > 0 and stages != "backbone"
    shadowed = lambda d: d["shadowed"] + d["failed"] + d["skipped"]  # noqa: E731
    expected_shadows = shadowed(drift0) if drift0 else 0
    agreed = drift0["agreed"] if drift0 else 0
    # a bad input: a JSON 400 naming the image, and the app answers on
    r = post_batch(url, [ref.files[0], ref.files[1][:40]], 0.5)
    assert r.status_code == 400 and r.json()["error"] == "invalid image" and r.json()["detail"]["index"] == 1, r.text
    images = len(ref.files)
    for eta in (0.0, ref.mid_eta, 0.7, 1.0001):
        r = post_batch(url, ref.files, eta)
        assert r.status_code == 200, (cell, eta, r.text, app_log(name))
        preds = r.json()["predictions"]
        for i, pred in enumerate(preds):
            assert_prediction(pred, ref.expected(i, eta, stages), eta, f"{cell} η={eta} image {i}")
        assert r.json()["gflops"] == pytest.approx(sum(p["gflops"] for p in preds))
        assert_timing(r.headers["server-timing"], stages, any(p["stage"] == "fine" for p in preds), f"{cell} η={eta}")
        if stages != "backbone":
            exits = ref.exits(eta)
            assert [p["stage"] == "coarse" for p in preds] == exits.tolist(), (cell, eta)
            if shadow:
                expected_shadows += int(exits.sum())
                agreed += int((exits & ref.agree()).sum())
                drift_settled(url, expected_shadows)  # one request's shadow checks at a time: none skipped
    # concurrent single-image requests share batches, each keeps its own η
    etas = [0.0, 1.0001] * (images // 2)

    def one(i):
        return httpx.post(url + "/v1/classify", content=ref.files[i], headers={"content-type": "image/png"},
                          params={"eta": etas[i]}, timeout=60)

    with ThreadPoolExecutor(images) as pool:
        for i, r in enumerate(pool.map(one, range(images))):
            assert r.status_code == 200, r.text
            assert_prediction(r.json(), ref.expected(i, etas[i], stages), etas[i], f"{cell} concurrent {i}")
    if stages == "backbone":
        return
    if shadow:
        expected_shadows += sum(1 for i in range(images) if etas[i] == 0.0)
        agreed += sum(int(ref.agree()[i]) for i in range(images) if etas[i] == 0.0)
    d = drift_settled(url, expected_shadows)
    # every coarse answer shadowed (none skipped or failed), agreeing exactly where the library's stages agree
    assert (shadowed(d), d["failed"] - drift0["failed"], d["skipped"] - drift0["skipped"]) == (expected_shadows, 0, 0), d
    assert d["agreed"] == agreed, (cell, d)
    answered = 5 * images  # four batches and the concurrent requests
    assert d["exit_rate"]["samples"] == min(drift0["exit_rate"]["samples"] + answered, 500), d
    calibrated = "checkpoint" not in args
    assert d["calibrated"] == calibrated and (d["exit_rate"]["expected"] is not None) == calibrated, d
    if not calibrated:  # figures without a reference, never an alert; the ingress said so when it started
        assert not d["alert"] and d["agreement"]["expected"] is None, d
        assert "has no agreement_profile" in app_log(name, lines=400)
