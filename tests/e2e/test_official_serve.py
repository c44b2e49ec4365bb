"""An imported model of the paper's, served over real HTTP: ImageNet class names in the replies, the
authors' eval transform, photographs to click on the page, the provenance in `GET /v1/model`."""
import base64
import io

import httpx
import pytest
import torch
from PIL import Image

import cfvit
from cfvit.transforms import build_transform
from tests.fixtures.serve_app import serving
from tests.unit.test_official_cli import imagenet_sized

pytestmark = pytest.mark.e2e
APP = "official-test"
STAGE = {"num_cpus": 0, "torch_threads": 1, "max_batch_size": 8, "autoscaling_config": None}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    info = cfvit.official.import_official(imagenet_sized(tmp), "cf_deit_small", tmp / "model")
    return info["path"]


@pytest.fixture(scope="module")
def url(ray_session, imported):
    """The app at / on a Serve instance of its own (the page's photographs), failing with its log if it
    does not come up."""
    with serving({"checkpoint": imported, "stages": "fused", "fused": STAGE, "ingress_num_cpus": 0,
                  "ingress_autoscaling_config": None}, name=APP) as base:
        yield base


def test_served_as_the_library_answers(url, imported):
    info = httpx.get(url + "/v1/model").json()
    assert info["num_classes"] == 1000 and info["class_names"][281] == "tabby, tabby cat"
    assert info["provenance"]["official_model"] == "cf_deit_small"
    assert info["data_config"]["interpolation"] == "bicubic" and info["data_config"]["crop_pct"] == 0.875
    samples = httpx.get(url + "/v1/samples").json()["samples"]
    cat = next(s for s in samples if s["label"] == 281)
    jpeg = base64.b64decode(cat["image"].split(",", 1)[1])
    r = httpx.post(url + "/v1/classify", content=jpeg, headers={"content-type": "image/jpeg"}, params={"eta": 2 / 3},
                   timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["class_name"] == info["class_names"][got["label"]]
    # the same image through the library: decode, the authors' eval transform (bicubic resize to 224 / 0.875,
    # centre crop, ImageNet normalisation), early exit at the same η
    model = cfvit.load(imported)
    x = build_transform(model.data_config)(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
    with torch.inference_mode():
        out = model.infer(x, 2 / 3)
    probs = out.logits.float().softmax(-1)[0]
    assert got["stage"] == ("coarse" if int(out.exit_stage[0]) == 0 else "fine")
    assert got["label"] == int(probs.argmax())
    for t in got["top5"]:
        assert t["probability"] == pytest.approx(float(probs[t["label"]]), abs=1e-4)
