"""jobs.train.batch_transforms: the built-in set's batched numpy transforms against timm's per-image PIL ones
(the eval path is what calibration and validation see, and serving uses the PIL one)."""
import json

import numpy as np
import pytest
import torch

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform
from jobs.train import batch_transforms
from jobs.train.data import preprocess


@pytest.fixture(scope="module")
def images():
    return load_fashion_mnist("test")[0][:64]


@pytest.mark.parametrize("name", ["cfvit_tiny32_fmnist", "cfvit_tiny_fmnist"])
def test_eval_transform_equals_the_pil_one_serving_uses(images, name):
    from PIL import Image

    dc = dict(cfvit.create_model(name).data_config)
    assert batch_transforms.supports(images, dc, False, {})
    got = batch_transforms.transform(images, dc, False, {})
    tf = build_transform(dc, is_training=False)
    want = torch.stack([tf(Image.fromarray(a)) for a in images]).numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    # PIL rounds to uint8 after resampling, as the numpy path does: at most one grey level apart
    assert np.abs(got - want).max() <= 1.01 / 255 / dc["std"][0]


def test_train_transform_is_timm_like_and_reproducible(images):
    dc = dict(cfvit.create_model("cfvit_tiny32_fmnist").data_config)
    plain = {"scale": [1.0, 1.0], "hflip": 0.0, "color_jitter": None}
    # whole-image crop, no flip, no jitter: the same pixels as the eval resize (aspect jitter aside, the
    # 28x28 source only fits a square box at scale 1)
    same = batch_transforms.transform(images, dc, True, plain, rng=np.random.default_rng(0))
    np.testing.assert_allclose(same, batch_transforms.transform(images, dc, False, {}), atol=1e-6)
    aug = {"scale": [0.5, 1.0], "hflip": 0.5, "color_jitter": 0.4}
    a = batch_transforms.transform(images, dc, True, aug, rng=np.random.default_rng(1))
    b = batch_transforms.transform(images, dc, True, aug, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 1, 32, 32) and not np.allclose(a, same)
    pixels = a * dc["std"][0] + dc["mean"][0]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # stays inside [0, 1] before Normalize


def test_unsupported_settings_take_the_per_image_timm_path(images):
    dc = dict(cfvit.create_model("cfvit_tiny32_fmnist").data_config)
    assert not batch_transforms.supports(images, dc, True, {"auto_augment": "rand-m9-mstd0.5", "scale": [0.5, 1]})
    assert not batch_transforms.supports(images, dc, True, {"re_prob": 0.25})
    small = {**dc, "input_size": (1, 16, 16)}  # downsampling: PIL antialiases, the numpy path would not
    assert not batch_transforms.supports(images, small, False, {})
    # preprocess falls back and still returns valid rows
    batch = {"image": list(images[:4]), "label": np.arange(4)}
    out = preprocess(batch, json.dumps(small), False, json.dumps({}), 10)
    assert out["image"].shape == (4, 1, 16, 16) and out["valid"].all()
