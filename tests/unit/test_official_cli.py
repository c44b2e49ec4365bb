"""`cfvit import-official` and `cfvit models --checkpoint`: the authors' checkpoint imported with its
provenance, shown beside this project's calibration; refusals are one clear line, not a traceback."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import cfvit
from cfvit.official import imagenet_class_ids, imagenet_class_names
from cfvit_cli import app
from serve.samples import sample_images

DATA = Path(__file__).parents[1] / "data" / "official"


def imagenet_sized(tmp_path) -> Path:
    """The reduced DeiT reference in the authors' key layout, with a 1000-class head: an ImageNet model."""
    state = load_file(str(DATA / "deit_s_7.model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    dim = state["head.weight"].shape[1]
    state["head.weight"] = torch.randn(1000, dim, generator=gen) * 0.02
    state["head.bias"] = torch.zeros(1000)
    path = tmp_path / "cf_deit_small_1000.safetensors"
    save_file(state, str(path))
    return path


def test_import_then_describe(tmp_path):
    src = imagenet_sized(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["import-official", str(src), "--model", "cf_deit_small", "--out", str(tmp_path / "m")],
                        terminal_width=120)
    assert res.exit_code == 0, res.output
    assert "cfvit_deit_small_patch16_224, 7x7 coarse grid" in res.output and "cfvit calibrate --checkpoint" in res.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    prov = cfg["provenance"]
    assert prov["official_model"] == "cf_deit_small" and len(prov["sha256"]) == 64
    assert prov["published"] == []  # a reduced model: the paper's figures are not its own
    assert cfg["class_names"] == imagenet_class_names() and cfg["class_ids"][281] == "n02123045"
    assert cfg["class_ids"] == imagenet_class_ids() and cfg["class_names"][281] == "tabby, tabby cat"
    res = runner.invoke(app, ["models", "--checkpoint", str(tmp_path / "m")], terminal_width=120)
    assert res.exit_code == 0, res.output
    assert "1000 classes" in res.output and "source: https://github.com/ChenMnZ/CF-ViT" in res.output
    assert "not calibrated here yet" in res.output
    # the imported model answers as from_official's
    x = torch.randn(2, 3, 224, 224)
    ours = cfvit.load(str(tmp_path / "m"))
    theirs = cfvit.from_official(str(src), "cf_deit_small")
    with torch.no_grad():
        assert torch.equal(ours.infer(x, 0.5).logits, theirs.infer(x, 0.5).logits)


@pytest.mark.parametrize("args, message", [
    (["--model", "cf_lvvit_small"], "DeiT-S checkpoint"),
    (["--model", "cf_deit_small", "--coarse-grid", "9"], "not 9x9"),
    (["--model", "vit_base"], "vit_base"),
])
def test_refusals_are_one_line(tmp_path, args, message):
    res = CliRunner().invoke(app, ["import-official", str(DATA / "deit_s_7.model.safetensors"), *args,
                                   "--out", str(tmp_path / "x")], terminal_width=200)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "x" / "config.json").exists()


def test_a_missing_file_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["import-official", str(tmp_path / "nope.pth"), "--model", "cf_deit_small",
                                   "--out", str(tmp_path / "x")], terminal_width=200)
    assert res.exit_code == 2 and "is not a file" in " ".join(res.output.split())


def test_imagenet_models_get_photographs_to_click():
    samples = sample_images(imagenet_class_names())
    assert len(samples) == 6 and all(s.image.startswith("data:image/jpeg;base64,") for s in samples)
    cat = next(s for s in samples if s.label == 281)
    assert cat.class_name == "tabby, tabby cat"
    assert any(s.label is None for s in samples)  # a photograph no single class fits: no verdict on the page
    assert sample_images([str(i) for i in range(7)]) == []
