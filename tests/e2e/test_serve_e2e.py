"""The Serve application over real HTTP on 127.0.0.1, with a model trained for the session (the session's
Serve instance and its test app: tests/fixtures/serve_app.py)."""
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.answers import assert_answers, library_answers
from tests.fixtures.browser import chromium, needs_chromium
from tests.fixtures.metrics import wait_for_metric
from tests.fixtures.serve_app import APP_NAME, FIXED, apps_running
from tests.fixtures.services import png_bytes as png


@pytest.fixture(scope="module")
def fmnist_test():
    from cfvit.data import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    return x[2000:2200], y[2000:2200]  # away from the 1000 images the fixture calibrated η on


@pytest.fixture(scope="module")
def local_model(fmnist_checkpoint):
    import cfvit

    return cfvit.load(str(fmnist_checkpoint)).eval()


def classify(url, data: bytes, ctype="image/png", **params):
    return httpx.post(url + "/v1/classify", content=data, headers={"content-type": ctype}, params=params, timeout=60)


def test_health_model_docs_and_page(served):
    assert httpx.get(served + "/healthz").json() == {"status": "ok"}
    info = httpx.get(served + "/v1/model").json()
    assert info["name"] == "cfvit_tiny_fmnist"
    assert info["class_names"][0] == "T-shirt/top" and info["num_classes"] == 10
    assert info["input_size"] == [1, 56, 56] and info["coarse_grid"] == 7
    assert info["stage_gflops"]["coarse"] > 0 and info["stage_gflops"]["fine"] > 0
    assert info["eta_table"] and {"eta", "gflops"} <= set(info["eta_table"][0])
    assert info["version"].startswith("sha256:")
    spec = httpx.get(served + "/openapi.json").json()
    assert {"/v1/classify", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "image/png" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert httpx.get(served + "/docs").status_code == 200
    page = httpx.get(served + "/")
    assert page.status_code == 200 and "<canvas" in page.text and "://" not in page.text  # no CDNs


def test_accuracy_on_fashion_mnist(served, fmnist_test, fmnist_checkpoint):
    x, y = fmnist_test
    preds, stages = [], []
    for i in range(0, len(x), 32):  # JSON batches of base64 PNGs at the native 28 px
        body = {"images": [base64.b64encode(png(a)).decode() for a in x[i:i + 32]]}
        r = httpx.post(served + "/v1/classify", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["predictions"]) == len(x[i:i + 32])
        assert out["gflops"] == pytest.approx(sum(p["gflops"] for p in out["predictions"]))
        preds += [p["label"] for p in out["predictions"]]
        stages += [p["stage"] for p in out["predictions"]]
    acc = float(np.mean(np.array(preds) == y))
    calibrated = json.loads((Path(fmnist_checkpoint) / "config.json").read_text()).get("val_accuracy")
    # The session fixture is a few hundred CPU steps of training: well above chance (0.1), not converged.
    # What the service answers must match the model's own offline accuracy on held-out data.
    assert acc >= 0.25, f"accuracy {acc:.2f} on {len(y)} Fashion-MNIST test images (checkpoint's own: {calibrated})"
    if calibrated:
        lo, hi = sorted((calibrated["coarse"], calibrated["fine"]))  # the served mix lies near that range
        assert lo - 0.1 <= acc <= hi + 0.1, f"served {acc:.2f} vs offline {calibrated}"
    assert set(stages) <= {"coarse", "fine"}


def test_answers_match_the_library(served, fmnist_test, local_model):
    """The split deployment answers exactly as `model.infer` does in one process."""
    from cfvit.transforms import build_transform, decode_image

    x, _ = fmnist_test
    tf = build_transform(local_model.data_config)
    files = [png(a) for a in x[:12]]
    batch = torch.stack([tf(decode_image(f)) for f in files])
    for eta in (0.0, 0.7, 1.0001):
        ref = local_model.infer(batch, eta, return_indices=True)
        for i, f in enumerate(files):
            out = classify(served, f, eta=eta).json()
            assert out["stage"] == ("fine" if ref.exit_stage[i] else "coarse")
            assert out["label"] == int(ref.logits[i].argmax())
            assert out["confidence"] == pytest.approx(float(ref.logits[i].softmax(-1).max()), abs=1e-4)
            if out["stage"] == "fine":
                assert sorted(out["regions"]) == sorted(ref.selected[i].tolist())
            else:
                assert out["regions"] is None


def test_eta_changes_the_answering_stage(served, fmnist_test, local_model):
    img = png(fmnist_test[0][0])
    g = local_model.stage_gflops()
    low = classify(served, img, eta=0).json()
    assert low["stage"] == "coarse" and low["gflops"] == pytest.approx(g["coarse"]) and low["regions"] is None
    high = classify(served, img, eta=1.0001).json()
    assert high["stage"] == "fine" and high["gflops"] == pytest.approx(g["coarse"] + g["fine"])
    assert len(high["regions"]) == local_model.k_selected
    assert all(0 <= i < local_model.coarse_grid ** 2 for i in high["regions"])
    assert len(high["top5"]) == 5 and high["top5"][0]["label"] == high["label"]
    # η from a budget: the cheapest calibrated point and an infeasible one.
    table = httpx.get(served + "/v1/model").json()["eta_table"]
    cheapest = min(table, key=lambda p: p["gflops"])
    r = classify(served, img, budget_gflops=cheapest["gflops"])
    assert r.status_code == 200 and r.json()["eta"] == pytest.approx(cheapest["eta"])
    r = classify(served, img, budget_gflops=g["coarse"] / 2)
    assert r.status_code == 422 and r.json()["error"] == "budget infeasible"


def test_each_request_keeps_its_own_eta_inside_a_batch(served, fmnist_test):
    img = png(fmnist_test[0][0])
    etas = [0.0, 1.0001] * 12

    def one(eta):
        return eta, classify(served, img, eta=eta).json()["stage"]

    with ThreadPoolExecutor(24) as pool:  # concurrent, so they share coarse batches
        for eta, stage in pool.map(one, etas):
            assert stage == ("coarse" if eta == 0.0 else "fine")


def library_answer(model, data: bytes, eta: float) -> tuple:
    return library_answers(model, [data], eta)[0]


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_images_as_users_have_them(served, fmnist_test, local_model):
    """A colour JPEG, a 16-bit grey PNG, a half-transparent RGBA PNG, raw and as multipart files: each answered
    as the library answers the same file, and the 16-bit PNG as its 8-bit version (not clipped to white)."""
    rng = np.random.default_rng(0)
    x = fmnist_test[0][:3]
    colour = encoded(Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)), "JPEG")
    grey8 = png(x[0])
    grey16 = encoded(Image.fromarray(x[0].astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(grey16)).mode.startswith("I")  # really 16 bits per pixel
    rgba = encoded(Image.fromarray(np.dstack([np.stack([x[1]] * 3, -1), np.full((28, 28), 128, np.uint8)])), "PNG")
    answers = {}
    for name, data, ctype in (("jpeg", colour, "image/jpeg"), ("grey8", grey8, "image/png"),
                              ("grey16", grey16, "image/png"), ("rgba", rgba, "image/png")):
        r = classify(served, data, ctype)
        assert r.status_code == 200, (name, r.text)
        assert_answers(r.json(), library_answer(local_model, data, 0.5))
        answers[name] = r.json()
    assert (answers["grey16"]["label"], answers["grey16"]["stage"]) == (answers["grey8"]["label"], answers["grey8"]["stage"])
    assert answers["grey16"]["confidence"] == pytest.approx(answers["grey8"]["confidence"], abs=1e-4)
    # multipart, one file → one prediction; two files → a batch, each as the library answers it
    r = httpx.post(served + "/v1/classify", files={"file": ("a.jpg", colour, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    assert_answers(r.json(), library_answer(local_model, colour, 0.5))
    r = httpx.post(served + "/v1/classify", files=[("file", ("a.png", grey16, "image/png")),
                                                   ("file", ("b.png", rgba, "image/png"))],
                   params={"eta": 0}, timeout=60)
    assert r.status_code == 200, r.text
    for pred, data in zip(r.json()["predictions"], (grey16, rgba)):
        assert_answers(pred, library_answer(local_model, data, 0.0))


def _bad_requests(img: bytes):
    big = png(np.zeros((1100, 1100), dtype=np.uint8))  # 1.2 MP > max_pixels, yet a small file
    b64 = base64.b64encode(img).decode()
    yield "not an image", dict(content=b"hello, I am not a PNG", headers={"content-type": "image/png"}), 400
    yield "truncated", dict(content=img[: len(img) // 2], headers={"content-type": "image/png"}), 400
    yield "empty body", dict(content=b"", headers={"content-type": "image/png"}), 400
    yield "oversized body", dict(content=b"\0" * (1024 * 1024 + 1), headers={"content-type": "image/png"}), 413
    yield "oversized chunked body", dict(content=iter([b"\0" * 65536] * 20), headers={"content-type": "image/png"}), 413
    yield "too many pixels", dict(content=big, headers={"content-type": "image/png"}), 413
    yield "wrong content type", dict(content=img, headers={"content-type": "text/plain"}), 415
    yield "no content type", dict(content=img), 415
    yield "too many images", dict(json={"images": [b64] * 33}), 413
    yield "too many files", dict(files=[("file", ("a.png", img, "image/png"))] * 33), 413
    yield "far too many files", dict(files=[("file", ("a.png", img, "image/png"))] * 40), 413
    yield "eta too high", dict(content=img, headers={"content-type": "image/png"}, params={"eta": 1.5}), 422
    yield "eta negative", dict(content=img, headers={"content-type": "image/png"}, params={"eta": -0.1}), 422
    yield "eta not a number", dict(content=img, headers={"content-type": "image/png"}, params={"eta": "abc"}), 422
    yield "eta NaN", dict(content=img, headers={"content-type": "image/png"}, params={"eta": "nan"}), 422
    yield "eta in JSON too high", dict(json={"images": [b64], "eta": 7}), 422
    yield "eta in JSON NaN", dict(content=b'{"images": ["%s"], "eta": NaN}' % b64.encode(),
                                  headers={"content-type": "application/json"}), 422
    yield "budget infinite", dict(content=img, headers={"content-type": "image/png"}, params={"budget_gflops": "inf"}), 422
    yield "eta and budget", dict(content=img, headers={"content-type": "image/png"},
                                 params={"eta": 0.5, "budget_gflops": 1}), 422
    yield "malformed JSON", dict(content=b'{"images": [', headers={"content-type": "application/json"}), 400
    yield "bad base64", dict(json={"images": ["***not base64***"]}), 400
    yield "base64 of junk", dict(json={"images": [base64.b64encode(b"junk").decode()]}), 400
    yield "images not a list", dict(json={"images": "abc"}), 422
    yield "no images", dict(json={"images": []}), 422
    yield "unknown JSON field", dict(json={"images": [b64], "etaa": 0.1}), 422
    yield "multipart without file", dict(data={"note": "x"}, files={"other": ("a.png", img, "image/png")}), 422
    yield "malformed multipart", dict(content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xx"}), 422
    yield "multipart without boundary", dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 400


def test_bad_input_gives_4xx_json_and_the_service_stays_up(served, fmnist_test):
    from ray import serve

    img = png(fmnist_test[0][0])
    for name, kwargs, status in _bad_requests(img):
        r = httpx.post(served + "/v1/classify", timeout=60, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error", "detail"} and body["error"], (name, body)
    assert httpx.get(served + "/v1/nothing").json()["error"] == "Not Found"
    assert httpx.get(served + "/healthz").status_code == 200
    assert classify(served, img).status_code == 200
    app = serve.status().applications[APP_NAME]
    assert app.status == "RUNNING"
    for name, dep in app.deployments.items():
        assert dep.status == "HEALTHY", (name, dep)


def test_32_concurrent_clients_zero_errors(served, fmnist_test):
    x, _ = fmnist_test
    files = [png(a) for a in x[:32]]

    def client(k):
        codes = []
        with httpx.Client(base_url=served, timeout=120) as c:
            for j in range(3):  # raw, multipart and JSON bodies, in turn
                f = files[(k + j) % len(files)]
                if j == 0:
                    r = c.post("/v1/classify", content=f, headers={"content-type": "image/png"})
                elif j == 1:
                    r = c.post("/v1/classify", files={"file": ("x.png", f, "image/png")})
                else:
                    r = c.post("/v1/classify", json={"images": [base64.b64encode(f).decode()] * 2})
                codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(32) as pool:
        codes = [c for cs in pool.map(client, range(32)) for c in cs]
    assert codes == [200] * 96


@needs_chromium
def test_page_classifies_in_headless_chromium(served):
    """The page at / loads, classifies a generated image (?demo=1) and shows the answer and the regions."""
    out = chromium(served + "/?demo=1&eta=1.0001", "--dump-dom")
    dom = out.stdout
    assert 'data-state="done"' in dom, (out.stderr[-2000:], dom[-3000:])
    assert '<span id="stage" class="badge fine">fine</span>' in dom
    assert '<span id="n_regions">25</span>' in dom
    info = httpx.get(served + "/v1/model").json()
    shown = dom.split('<b id="class_name">')[1].split("</b>")[0]
    assert shown.replace("&amp;", "&") in info["class_names"]


@needs_chromium
def test_page_offers_samples_and_budgets_and_shows_the_answer(served, tmp_path):
    """A person's first try: the sample strip holds the model's own test images (one per class), the budget
    picker lists the η table, and clicking a sample (?sample=3, with the table's first budget) shows the
    answer, its stage and the true class — in the DOM and on a screenshot."""
    samples = httpx.get(served + "/v1/samples").json()["samples"]
    info = httpx.get(served + "/v1/model").json()
    assert [s["class_name"] for s in samples] == info["class_names"]
    assert all(s["index"] >= 9000 and s["image"].startswith("data:image/png;base64,") for s in samples)
    dom = chromium(served + "/?sample=3&budget=1", "--dump-dom").stdout
    assert 'data-state="done"' in dom, dom[-3000:]
    assert dom.count('<button data-index=') == 10 and f'<span id="true_class">{samples[3]["class_name"]}' in dom
    options = dom.split('<select id="budget">')[1].split("</select>")[0]
    assert options.count("<option") == 1 + len(info["eta_table"]) and "GFLOPs/img (η" in options
    stage = dom.split('<span id="stage" class="badge ')[1].split('"')[0]
    assert stage in ("coarse", "fine")
    shot = tmp_path / "page.png"
    chromium(served + "/?sample=3&budget=1", f"--screenshot={shot}", "--window-size=900,1000",
              "--hide-scrollbars")
    # the stage badge is painted: enough pixels of its colour (coarse #2e7d32, fine #c62828)
    badge = {"coarse": (0x2E, 0x7D, 0x32), "fine": (0xC6, 0x28, 0x28)}[stage]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - badge).sum(1) < 12).sum() > 150, f"no {stage} badge on {shot}"


def test_slo_mode_steps_eta_down_under_load_and_back_up_and_leaves_asked_eta_alone(served, fmnist_test,
                                                                                  fmnist_checkpoint, ray_metrics):
    """SLO mode over real HTTP, on an app beside the test app: requests of 256 images (about a second each
    here) keep p99 over a 400 ms target, so the default η steps down the η table one step per check and stops
    at the floor (`min_eta`, above the table's lowest η), saying why in GET /v1/model; a request that names
    its own η gets that η; then single-image requests (tens of ms) bring p99 under 0.6 × the target and η
    steps back up to the default. The `cfvit_slo_*` metrics on Ray's Prometheus endpoint say the same."""
    table = httpx.get(served + "/v1/model").json()["eta_table"]
    below = sorted({p["eta"] for p in table if p["eta"] < 0.5})
    assert len(below) >= 2, table  # the session model's table has points below the default η
    floor = below[1]  # the table's lowest η lies below the floor
    args = {**FIXED, "checkpoint": str(fmnist_checkpoint), "latency_slo_ms": 400, "min_eta": floor, "max_images": 256,
            "slo_check_s": 0.2, "slo_min_samples": 2, "slo_window_s": 3}
    images = [base64.b64encode(png(a)).decode() for a in fmnist_test[0]] * 2
    with apps_running(served, {"cfvit-slo": args}) as urls:
        url = urls["cfvit-slo"]
        assert httpx.get(served + "/v1/model").json()["slo"] is None  # off by default
        down = []  # η of each heavy request, in the order they were answered

        def heavy(_):
            r = httpx.post(url + "/v1/classify", json={"images": images[:256]}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]["eta"]

        deadline = time.time() + 120
        with ThreadPoolExecutor(3) as pool:  # until the floor has held for 6 requests
            while time.time() < deadline and (len(down) < 6 or any(abs(e - floor) > 1e-9 for e in down[-6:])):
                down += list(pool.map(heavy, range(3)))
        slo = httpx.get(url + "/v1/model").json()["slo"]
        assert down[0] == 0.5 and down[-1] == pytest.approx(floor) and min(down) >= floor - 1e-9, down
        assert "at the floor" in slo["reason"] and slo["latency_slo_ms"] == 400 and 0 <= slo["exit_rate"] <= 1, slo
        assert slo["eta"] == pytest.approx(floor) and slo["floor_eta"] == pytest.approx(floor)
        asked = classify(url, png(fmnist_test[0][0]), eta=0.97).json()
        assert asked["eta"] == 0.97  # answered as asked
        up, deadline = [], time.time() + 90
        while time.time() < deadline and (not up or up[-1] != 0.5):
            r = classify(url, png(fmnist_test[0][len(up) % 100]))
            assert r.status_code == 200, r.text
            up.append(r.json()["eta"])
        assert up[-1] == 0.5 and up == sorted(up), up  # only up while every request meets the target
        state = httpx.get(url + "/v1/model").json()["slo"]
        assert state["level"] == 0 and state["steps"] >= 2 * (len(state["ladder"]) - 1), state
        for name, want in (("cfvit_slo_eta", 0.5), ("cfvit_slo_level", 0.0)):
            assert wait_for_metric(ray_metrics, name, lambda v, w=want: v == pytest.approx(w),
                                   application="cfvit-slo") == pytest.approx(want)
        p99 = state["p99_ms"]
        assert wait_for_metric(ray_metrics, "cfvit_slo_p99_ms", lambda v: v == pytest.approx(p99),
                               application="cfvit-slo") < 240
