"""jobs.train.device_augment (data.decode=device): decoding, the seeded parameters, the batched transform
against timm's per-image PIL one, and the wiring into the config and the Ray Data map stage."""
import json
import random

import numpy as np
import pytest
import torch

from benchmarks.data import DEIT_DATA_CONFIG, synth_jpeg
from cfvit.data import load_fashion_mnist
from cfvit.transforms import build_transform, decode_image, to_model_mode
from jobs.train import device_augment as da
from tests.fixtures.services import png_bytes

FMNIST = {"input_size": (1, 56, 56), "mean": (0.286,), "std": (0.353,), "interpolation": "bilinear",
          "crop_pct": 1.0, "crop_mode": "center"}
AUG = {"scale": (0.08, 1.0), "hflip": 0.5, "color_jitter": 0.4}


@pytest.fixture(scope="module")
def fmnist():
    return load_fashion_mnist("test")[0][:32]


@pytest.fixture(scope="module")
def jpegs():
    rng = np.random.default_rng(0)  # landscape and portrait, small enough to be quick
    return [synth_jpeg(rng, *((150, 200) if i % 2 else (200, 150))) for i in range(6)]


def levels(a: torch.Tensor, b: torch.Tensor, dc: dict) -> torch.Tensor:
    """|a - b| in grey levels (0-255) before Normalize."""
    return (a - b).abs() * torch.tensor(dc["std"]).view(1, -1, 1, 1) * 255


def test_decode_jpeg_png_arrays_and_corrupt_bytes(jpegs, fmnist):
    rgb_png = png_bytes(np.asarray(decode_image(jpegs[0]).convert("RGB")))
    blobs = [jpegs[0], rgb_png, png_bytes(fmnist[0]), jpegs[1][:len(jpegs[1]) // 2], b"\xff\xd8\xffjunk", b"",
             b"not an image", fmnist[1]]
    imgs, valid = da.decode_batch(blobs, "cpu", 3)
    assert valid.tolist() == [True, True, True, False, False, False, False, True]
    assert all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in imgs)
    pil = torch.tensor(np.asarray(decode_image(jpegs[0]).convert("RGB"))).permute(2, 0, 1)
    assert (imgs[0].int() - pil.int()).abs().max() <= 1  # libjpeg either way (measured: identical)
    assert torch.equal(imgs[1], pil) or (imgs[1].int() - pil.int()).abs().max() <= 1
    assert torch.equal(imgs[2], torch.tensor(fmnist[0]).expand(3, -1, -1))  # grey → RGB repeated
    assert torch.equal(imgs[7][0], torch.tensor(fmnist[1]))  # in-memory arrays pass through
    gray, valid = da.decode_batch(blobs, "cpu", 1)
    assert all(im.shape[0] == 1 for im in gray) and valid.sum() == 4
    want = torch.tensor(np.asarray(decode_image(jpegs[0]).convert("L")))
    assert torch.equal(gray[0][0], want)  # PIL's "L" conversion, exactly


def test_train_params_depend_on_the_generator_only():
    sizes = [(150, 200), (200, 150), (28, 28)] * 10
    aug = {**AUG, "re_prob": 0.5}
    a = da.train_params(30, sizes, aug, torch.Generator().manual_seed(3), (56, 56))
    torch.manual_seed(123)  # the global RNG plays no part
    b = da.train_params(30, sizes, aug, torch.Generator().manual_seed(3), (56, 56))
    assert a.keys() == b.keys() == {"box", "flip", "jitter", "order", "erase"}
    assert all(torch.equal(a[k], b[k]) for k in a) and all(v.device.type == "cpu" for v in a.values())
    c = da.train_params(30, sizes, aug, torch.Generator().manual_seed(4), (56, 56))
    assert not torch.equal(a["box"], c["box"])
    assert sorted(a["order"][0].tolist()) == [0, 1, 2]
    assert ((a["jitter"] >= 0.6) & (a["jitter"] <= 1.4)).all()


def test_train_output_is_normalised_and_the_plain_crop_is_the_eval_resize(fmnist):
    imgs, _ = da.decode_batch(list(fmnist), "cpu", 1)
    g = torch.Generator().manual_seed(0)
    x = da.augment_batch(imgs, da.train_params(32, [(28, 28)] * 32, AUG, g), FMNIST, "cpu")
    assert x.shape == (32, 1, 56, 56) and x.dtype == torch.float32
    pixels = x * FMNIST["std"][0] + FMNIST["mean"][0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    plain = {"scale": (1.0, 1.0), "hflip": 0.0, "color_jitter": None}
    p = da.train_params(32, [(28, 28)] * 32, plain, g)
    assert (p["box"] == torch.tensor([0, 0, 28, 28])).all() and "jitter" not in p
    torch.testing.assert_close(da.augment_batch(imgs, p, FMNIST, "cpu"), da.augment_batch(imgs, None, FMNIST, "cpu"))


@pytest.mark.parametrize("case", ["fmnist_png_bilinear", "deit_jpeg_bicubic_crop"])
def test_eval_is_timm_within_a_grey_level(case, fmnist, jpegs):
    """torch's antialiased resize against PIL's, grey levels before Normalize. Measured: bilinear max 1
    (mean 0.14-0.19); bicubic at crop_pct 0.875 max 4 on these 200x150 images, 3 at 500x375, mean 0.18-0.21,
    fewer than 1 value in 10,000 more than 1 level apart (bicubic overshoot clamped at 0/255 differently)."""
    dc, blobs, tol = ((FMNIST, [png_bytes(a) for a in fmnist], 1.0) if case.startswith("fmnist")
                      else (DEIT_DATA_CONFIG, jpegs, 4.0))
    tf = build_transform(dc, is_training=False)
    want = torch.stack([tf(decode_image(b)) for b in blobs])
    imgs, valid = da.decode_batch(blobs, "cpu", dc["input_size"][0])
    got = da.augment_batch(imgs, None, dc, "cpu")
    assert valid.all() and got.shape == want.shape
    d = levels(got, want, dc)
    assert d.max() <= tol + 0.01 and d.mean() <= 0.25 and (d > 1.01).float().mean() < 1e-3


def test_crop_boxes_follow_timm():
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

    n, (h, w), scale = 4000, (375, 500), (0.08, 1.0)
    box = da.train_params(n, [(h, w)] * n, {"scale": scale}, torch.Generator().manual_seed(0))["box"].double()
    area, ratio = box[:, 2] * box[:, 3] / (h * w), box[:, 3] / box[:, 2]
    assert area.min() >= scale[0] - 0.005 and area.max() <= scale[1]
    assert ratio.min() >= 3 / 4 - 0.02 and ratio.max() <= 4 / 3 + 0.02
    assert ((box[:, 0] >= 0) & (box[:, 0] + box[:, 2] <= h) & (box[:, 1] + box[:, 3] <= w)).all()
    random.seed(0)
    img = torch.empty(1, h, w)
    timm_area = np.mean([bh * bw / (h * w) for _, _, bh, bw in (RRC.get_params(img, scale, (3 / 4, 4 / 3))
                                                                for _ in range(n))])
    assert abs(area.mean().item() - timm_area) < 0.02  # same law: sample means of 4000 draws
    for size in ((10, 1000), (1000, 10)):  # no try fits: timm's centre-crop fallback, exactly
        p = da.train_params(1, [size], {"scale": scale}, torch.Generator().manual_seed(0))["box"][0].tolist()
        assert p == list(RRC.get_params(torch.empty(1, *size), scale, (3 / 4, 4 / 3)))


def test_jitter_is_torchvisions_colorjitter_in_a_given_order():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 255
    f = torch.tensor([[1.3, 0.7, 1.2]] * 4)  # brightness, contrast, saturation
    order = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1]])
    got = da._jitter(x.clone(), f, order) / 255
    ops = [lambda t: TF.adjust_brightness(t, 1.3), lambda t: TF.adjust_contrast(t, 0.7),
           lambda t: TF.adjust_saturation(t, 1.2)]
    for i in range(4):
        want = x[i] / 255
        for k in order[i].tolist():
            want = ops[k](want)
        torch.testing.assert_close(got[i], want, atol=0.5 / 255, rtol=0)


def test_random_erasing_zeroes_one_box_like_timms():
    n, size = 200, (56, 56)
    p = da.train_params(n, [(28, 28)] * n, {"scale": (1, 1), "hflip": 0, "color_jitter": None, "re_prob": 0.5},
                        torch.Generator().manual_seed(0), size)
    e = p["erase"].double()
    on = e[:, 2] > 0
    assert 0.35 < on.float().mean() < 0.65  # re_prob
    frac = e[on, 2] * e[on, 3] / (size[0] * size[1])
    assert frac.min() >= 0.015 and frac.max() <= 1 / 3 + 0.03
    imgs = [torch.full((1, 28, 28), 200, dtype=torch.uint8)] * n
    x = da.augment_batch(imgs, p, FMNIST, "cpu")
    assert torch.equal((x == 0).sum((1, 2, 3)), (e[:, 2] * e[:, 3]).long())


def test_batches_of_raw_rows_are_seeded_and_drop_bad_rows(fmnist):
    rows = {"bytes": np.array([png_bytes(a) for a in fmnist[:8]] + [b"junk"], dtype=object),
            "label": np.arange(9), "valid": np.array([True] * 7 + [False, True])}
    pixels = {"pixels": fmnist[:9], "label": np.arange(9), "valid": rows["valid"]}
    a = list(da.batches([rows, pixels], FMNIST, AUG, "cpu", seed=(0, 1, 2)))
    b = list(da.batches([rows, pixels], FMNIST, AUG, "cpu", seed=(0, 1, 2)))
    assert a[0]["valid"].tolist() == [True] * 7 + [False, False]  # flagged upstream; unreadable
    assert a[0]["label"].tolist() == list(range(7)) + [0, 0] and (a[0]["image"][7:] == 0).all()
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    # PNG bytes and the same in-memory arrays, same step seed: the same tensors
    c = next(da.batches([pixels], FMNIST, AUG, "cpu", seed=(0, 1, 2)))
    torch.testing.assert_close(c["image"][:7], a[0]["image"][:7])
    assert not torch.equal(a[0]["image"][:7], a[1]["image"][:7])  # the next step draws anew
    ev = next(da.batches([rows], FMNIST, None, "cpu"))
    assert ev["image"].shape == (9, 1, 56, 56)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_the_cpu_fallback(jpegs):
    """nvjpeg vs libjpeg (JPEG) and float rounding (PNG, decoded on the CPU either way). The JPEG bounds are
    a guess until measured on a GPU (`python -m benchmarks.device_decode --device cuda` prints them).
    Synthetic 28x28 grey images, not Fashion-MNIST: the GPU machine has no Debian data set."""
    gray = np.random.default_rng(1).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    for blobs, dc, tol_max, tol_mean in (([png_bytes(a) for a in gray], FMNIST, 3.0, 0.05),
                                         (jpegs, DEIT_DATA_CONFIG, 16.0, 1.0)):
        for aug in (None, AUG):
            out = {}
            for dev in ("cpu", "cuda"):
                imgs, valid = da.decode_batch(blobs, dev, dc["input_size"][0])
                p = aug and da.train_params(len(imgs), [i.shape[1:] for i in imgs], aug,
                                            torch.Generator().manual_seed(0))
                out[dev] = da.augment_batch(imgs, p, dc, dev).cpu()
                assert valid.all()
            d = levels(out["cuda"], out["cpu"], dc)
            assert d.max() <= tol_max and d.mean() <= tol_mean, (d.max(), d.mean())


def test_config_and_check_refuse_what_the_device_cannot_do():
    from jobs.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="augment.auto_augment"):
        load_config("fmnist_tiny", ["data.decode=device", "augment.auto_augment=rand-m9-mstd0.5"], check_uris=False)
    cfg = load_config("fmnist_tiny", ["data.decode=device", "augment.re_prob=0.25"], check_uris=False)
    assert cfg.data.decode == "device"
    with pytest.raises(ValueError, match="interpolation"):
        da.check({**FMNIST, "interpolation": "nearest"}, {})
    with pytest.raises(ValueError, match="augment.auto_augment"):
        da.check(FMNIST, {"auto_augment": "rand-m9"})
    da.check(DEIT_DATA_CONFIG, {**AUG, "re_prob": 0.25})


def test_build_datasets_with_device_decode_maps_to_bytes_rows(monkeypatch, fmnist):
    from jobs.train import data
    from jobs.train.config import load_config

    class FakeDataset:  # records the map stage instead of running Ray Data
        def map_batches(self, fn, fn_kwargs, **kw):
            self.fn, self.kw = fn, fn_kwargs
            return self

    monkeypatch.setattr(data, "read", lambda *a, **k: FakeDataset())
    cfg = load_config("fmnist_tiny", ["data.decode=device"], check_uris=False)
    src = data.Source("s3://b/p", "imagefolder", [str(i) for i in range(10)])
    out = data.build_datasets(cfg, FMNIST, src, src)
    blobs = np.array([png_bytes(a) for a in fmnist[:3]], dtype=object)
    rows = out["train"].fn({"bytes": blobs, "label": np.array([1, 12, -1])}, **out["train"].kw)
    assert set(rows) == {"bytes", "label", "valid"} and rows["bytes"][0] == blobs[0]
    assert rows["valid"].tolist() == [True, False, False] and rows["label"].tolist() == [1, 0, 0]
    builtin = out["val"].fn({"image": fmnist[:2], "label": np.array([0, 1])}, **out["val"].kw)
    assert set(builtin) == {"pixels", "label", "valid"} and builtin["pixels"].dtype == np.uint8
    cpu = data.build_datasets(load_config("fmnist_tiny", check_uris=False), FMNIST, src, src)
    assert cpu["train"].fn is data.preprocess and json.loads(cpu["train"].kw["data_config_json"])
    assert cpu["train"].kw["num_classes"] == 10


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(monkeypatch, jpegs):
    """A decompression bomb is marked unreadable before a decoder allocates it (the CPU path's limit)."""
    import cfvit.transforms

    monkeypatch.setattr(cfvit.transforms, "MAX_IMAGE_PIXELS", 100 * 100)  # the test JPEGs are larger
    imgs, valid = da.decode_batch([jpegs[0], png_bytes(np.zeros((8, 8), np.uint8))], "cpu", 3)
    assert valid.tolist() == [False, True] and imgs[0].shape == (3, 1, 1)


def test_formats_torchvision_cannot_read_are_decoded_as_the_cpu_path_does():
    """BMP and TIFF (in the readers' extensions) and 16-bit PNG: read with PIL like the CPU path, not
    dropped or clamped into wrong pixels."""
    import io

    from PIL import Image

    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    blobs = []
    for fmt in ("BMP", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        blobs.append(buf.getvalue())
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30), 200, np.uint16)).save(buf, format="PNG")  # 16-bit grey
    blobs.append(buf.getvalue())
    imgs, valid = da.decode_batch(blobs, "cpu", 3)
    assert valid.all()
    for img in imgs[:2]:
        assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(rgb).permute(2, 0, 1))
    want = np.asarray(to_model_mode(decode_image(blobs[2]), 3))  # what the CPU path makes of it: 200/257 → 1
    assert (want == 1).all()
    assert imgs[2].dtype == torch.uint8 and torch.equal(imgs[2], torch.from_numpy(want.copy()).permute(2, 0, 1))
