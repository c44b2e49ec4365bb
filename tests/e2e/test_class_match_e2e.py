"""`cfvit calibrate` on an ImageFolder of real Fashion-MNIST test images (through Ray Data): folders named
after the classes (sorted, they are not the model's order) score as the same images in folders 00–09 and
as the built-in set, and the command says how the classes were matched."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from jobs.calibrate import calibrate

pytestmark = pytest.mark.e2e
N = 300


def _folders(root, name_of) -> str:
    x, y = load_fashion_mnist("test")
    for i in range(N):
        d = root / name_of(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    return str(root)


def test_class_folders_are_matched_by_name(ray_session, fmnist_checkpoint, tmp_path, monkeypatch):
    named = _folders(tmp_path / "named", lambda y: FASHION_MNIST_CLASSES[y].replace("/", "_"))
    numbered = _folders(tmp_path / "numbered", lambda y: f"{y:02d}")
    ck = str(fmnist_checkpoint)
    builtin = calibrate(ck, "60%", data="fashion-mnist:test", limit=N, write=False).variants[0]
    by_name = calibrate(ck, "60%", data=named, write=False)
    by_number = calibrate(ck, "60%", data=numbered, write=False)
    assert by_name.data.labels is not None and by_name.data.matched.startswith("by name")
    assert by_number.data.matched == "numbers as class indices"
    a, b = by_name.variants[0], by_number.variants[0]
    assert a.n == b.n == builtin.n == N
    # the same pixels through the same reader: the same answers; the built-in path resizes in numpy (within
    # one grey level of PIL), so a few images may differ from it
    assert (a.fine_top1, a.coarse_top1) == (b.fine_top1, b.coarse_top1)
    assert abs(a.fine_top1 - builtin.fine_top1) <= 0.02, (a.fine_top1, builtin.fine_top1)
    assert a.fine_top1 > 0.3  # the session model's own accuracy (weak, 3 epochs), far above chance (0.1)

    from cfvit_cli import app

    monkeypatch.chdir(tmp_path)  # the command's log file goes under ./outputs/logs
    res = CliRunner().invoke(app, ["calibrate", "--checkpoint", ck, "--budgets", "60%", "--data", named,
                                   "--no-write", "--json", str(tmp_path / "c.json")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "matched to the model's by name" in res.output and "'T-shirt_top' → 'T-shirt/top'" in res.output
    assert "Ray Data" in res.output and "(--verbose streams them)" in res.output  # its lines went to the file
    assert json.loads((tmp_path / "c.json").read_text())["variants"][0]["fine_top1"] == a.fine_top1
