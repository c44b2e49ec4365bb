"""16-bit greyscale images (PNG as scanners and medical devices write them) are scaled to 8 bits everywhere an
image is read — the eval/serving transform, the device decoder of training, `cfvit shards --max-side` — never
clipped at 255 (Pillow's own `convert("L")`), which turned them nearly white."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform, decode_image, to_8bit
from jobs.ops.shards import downscale
from jobs.train import device_augment as da


def encoded(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def grey():
    """A Fashion-MNIST image as an 8-bit PNG and as the same picture in 16 bits (value × 257)."""
    x = load_fashion_mnist("test")[0][7]
    wide = encoded(x.astype(np.uint16) * 257)
    assert Image.open(io.BytesIO(wide)).mode.startswith("I")  # 16 bits per pixel on disk
    return x, encoded(x), wide


def test_to_8bit_scales_and_leaves_other_modes_alone(grey):
    x, _, wide = grey
    assert np.array_equal(np.asarray(to_8bit(decode_image(wide))), x)
    ramp = Image.fromarray(np.array([[0, 128, 257, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(to_8bit(ramp)).tolist() == [[0, 0, 1, 128, 255]]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_8bit(rgb) is rgb


@pytest.mark.parametrize("in_chans", [1, 3])
def test_the_eval_transform_sees_a_16_bit_png_as_its_8_bit_twin(grey, in_chans):
    _, narrow, wide = grey
    cfg = {"input_size": (in_chans, 32, 32), "mean": (0.5,) * in_chans, "std": (0.25,) * in_chans}
    tf = build_transform(cfg)
    assert torch.equal(tf(decode_image(wide)), tf(decode_image(narrow)))


def test_the_device_decoder_reads_a_16_bit_png_as_its_8_bit_twin(grey):
    _, narrow, wide = grey
    imgs, valid = da.decode_batch([narrow, wide], "cpu", 3)
    assert valid.tolist() == [True, True] and torch.equal(imgs[0], imgs[1])


def test_shards_downscale_a_16_bit_png_as_its_8_bit_twin():
    x = np.kron(load_fashion_mnist("test")[0][7], np.ones((4, 4), dtype=np.uint8))  # 112 px: something to shrink
    (_, small8), (_, small16) = downscale(encoded(x), "a.png", 56), downscale(encoded(x.astype(np.uint16) * 257),
                                                                              "b.png", 56)
    a8, a16 = (np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=int) for b in (small8, small16))
    assert np.abs(a8 - a16).max() <= 2  # the same JPEG up to encoder rounding; clipped, it was mostly 255
