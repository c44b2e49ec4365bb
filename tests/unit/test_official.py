"""`cfvit.from_official` against the authors' own code, and the import of their checkpoints.

tests/data/official holds outputs of their model classes on seeded, reduced configurations (its README
says how they were made); ours must give the same coarse and fine logits, selections and early-exit
answers, in fp32, for batches and single images.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import cfvit
from benchmarks.official.compare import compare, load_reference, variants
from cfvit.official import import_official, published_results
from cfvit.transforms import build_transform

DATA = Path(__file__).parents[1] / "data" / "official"
LOGIT_TOL = 1e-5  # fp32; measured differences are ~1e-6 (attention kernels and token order differ)


@pytest.fixture(scope="module", params=["deit_s_7", "deit_s_9", "lvvit_s_7", "lvvit_s_9"])
def reference(request):
    return load_reference(DATA, request.param)


def test_the_reference_data_is_all_there():
    assert variants(DATA) == ["deit_s_7", "deit_s_9", "lvvit_s_7", "lvvit_s_9"]


def test_answers_as_the_authors_code(reference):
    model = cfvit.from_official(reference.state, reference.model_name)
    assert model.coarse_grid == reference.coarse_grid and not model.training
    fine = reference.outputs["early_exit_fine"].sum(1)
    assert ((fine > 0) & (fine < len(reference.images))).all()  # each η splits the batch: both paths are checked
    f = compare(model, reference)
    assert f["coarse_logits"] < LOGIT_TOL and f["fine_logits"] < LOGIT_TOL
    assert f["gca_scores"] < 1e-8  # the global class attention itself, not only its ranking
    assert f["selected_equal"]
    assert f["exits_equal"] and f["top1_equal"]
    assert f["early_exit_logits"] < LOGIT_TOL and f["early_exit_batch_of_one"] < LOGIT_TOL


def test_the_paper_scaling_does_not_answer_as_their_lvvit():
    """The comparison can fail: a model with the paper's scaling has other coarse logits than their LV-ViT."""
    ref = load_reference(DATA, "lvvit_s_7")
    model = cfvit.from_official(ref.state, "cf_lvvit_small")
    assert model.logit_scaling == "official"
    model.logit_scaling = "paper"
    f = compare(model, ref)
    assert f["coarse_logits"] > 0.01 and f["fine_logits"] < LOGIT_TOL


def test_wrong_family_grid_or_keys_are_refused():
    deit, lvvit = load_reference(DATA, "deit_s_7").state, load_reference(DATA, "lvvit_s_9").state
    with pytest.raises(cfvit.CheckpointError, match="DeiT-S checkpoint .* not LV-ViT-S: import it as cfvit_deit_small"):
        cfvit.from_official(deit, "cfvit_lvvit_small")
    with pytest.raises(cfvit.CheckpointError, match="LV-ViT-S checkpoint .* not DeiT-S"):
        cfvit.from_official(lvvit, "cf_deit_small")
    with pytest.raises(cfvit.CheckpointError, match="has a 7x7 coarse grid .* not 9x9"):
        cfvit.from_official(deit, "cf_deit_small", coarse_grid=9)
    assert cfvit.from_official(lvvit, "cf_lvvit_small", coarse_grid=9).coarse_grid == 9
    with pytest.raises(cfvit.CheckpointError, match=r"unknown keys \['blocks.0.attn.rel_pos', 'extra'\]"):
        cfvit.from_official({**deit, "extra": torch.zeros(1), "blocks.0.attn.rel_pos": torch.zeros(1)}, "cf_deit_small")
    missing = {k: v for k, v in deit.items() if k != "blocks.2.attn.proj.bias"}
    with pytest.raises(cfvit.CheckpointError, match=r"missing \['vit.blocks.2.attn.proj.bias'\]"):
        cfvit.from_official(missing, "cf_deit_small")
    wrong = {**lvvit, "reuse_block.1.fc1.weight": torch.zeros(7, 24)}
    with pytest.raises(cfvit.CheckpointError, match=r"shape mismatch reuse.1.fc1.weight: checkpoint \(7, 24\)"):
        cfvit.from_official(wrong, "cf_lvvit_small")
    with pytest.raises(cfvit.CheckpointError, match="neither a DeiT patch embedding"):
        cfvit.from_official({"cls_token": torch.zeros(1, 1, 8)}, "cf_deit_small")
    with pytest.raises(cfvit.CheckpointError, match="not tensors"):
        cfvit.from_official({"model": {"cls_token": [0.0]}}, "cf_deit_small")
    with pytest.raises(ValueError, match="DeiT-S and LV-ViT-S only"):
        cfvit.from_official(deit, "cfvit_deit_tiny_patch16_224")


def test_pth_files_are_read_weights_only(tmp_path):
    deit = load_reference(DATA, "deit_s_7").state
    torch.save({"model": {f"module.{k}": v for k, v in deit.items()}}, tmp_path / "ddp.pth")
    model = cfvit.from_official(tmp_path / "ddp.pth", "cf_deit_small")  # a DistributedDataParallel prefix is fine
    torch.testing.assert_close(model.vit.blocks[4].mlp.fc2.weight, deit["blocks.4.mlp.fc2.weight"], rtol=0, atol=0)
    torch.save({"model": deit, "evil": cfvit.create_model}, tmp_path / "evil.pth")
    with pytest.raises(cfvit.CheckpointError, match="weights_only"):
        cfvit.from_official(tmp_path / "evil.pth", "cf_deit_small")


def _release_file(path: Path, state: dict) -> Path:
    """A file as the authors release them: weights plus their own figures."""
    curve = [[1.1 + 0.03 * i for i in range(100)], [75.5 + 0.05 * i for i in range(100)]]
    torch.save({"model": state, "flop": [1.1, 4.02], "anytime_classification": [75.5, 80.8],
                "budgeted_batch_classification": curve}, path)
    return path


def test_import_writes_a_checkpoint_that_answers_the_same(tmp_path):
    ref = load_reference(DATA, "lvvit_s_9")
    src = _release_file(tmp_path / "cf_lvvit_s_9.pth", ref.state)
    summary = import_official(src, "cf_lvvit_small", tmp_path / "imported")
    sha256 = hashlib.sha256(src.read_bytes()).hexdigest()
    assert summary["sha256"] == sha256 and summary["model_name"] == "cfvit_lvvit_small"
    loaded = cfvit.load(tmp_path / "imported")
    direct = cfvit.from_official(src, "cfvit_lvvit_small", coarse_grid=9)
    for eta in (*ref.outputs["etas"].tolist(), 0.0, 1.01):
        a, b = loaded.infer(ref.images, eta, return_indices=True), direct.infer(ref.images, eta, return_indices=True)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.selected, b.selected)
    cfg = json.loads((tmp_path / "imported" / "config.json").read_text())
    prov = cfg["provenance"]
    assert prov["sha256"] == sha256 and prov["file"] == "cf_lvvit_s_9.pth"
    assert prov["official_model"] == "cf_lvvit_small" and prov["repository"] == "https://github.com/ChenMnZ/CF-ViT"
    assert prov["flop"] == [1.1, 4.02] and prov["anytime_classification"] == [75.5, 80.8]
    assert len(prov["budgeted_batch_classification"]["gflops"]) == 100
    assert prov["budgeted_batch_classification"]["top1"][0] == 75.5
    assert prov["published"] == []  # a reduced model: the paper's figures are not its own
    assert published_results("cf_lvvit_small", 9) == [{"source": "authors' README", "eta": 1.0, "gflops": None,
                                                       "top1": 84.4}]
    assert cfg["model_kwargs"]["logit_scaling"] == cfg["logit_scaling"] == "official" and cfg["aux_head"]
    assert cfg["coarse_grid"] == 9 and cfg["data_config"]["crop_pct"] == 0.9
    assert "class_names" not in cfg  # 10 classes: not ImageNet
    assert loaded.cfvit_config["provenance"] == prov


def test_imagenet_import_has_class_names_and_the_authors_eval_transform(tmp_path):
    state = dict(load_reference(DATA, "deit_s_7").state)
    g = torch.Generator().manual_seed(0)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 24, generator=g), torch.zeros(1000)
    import_official(_release_file(tmp_path / "deit.pth", state), "cf_deit_small", tmp_path / "out")
    model = cfvit.load(tmp_path / "out")
    names = model.cfvit_config["class_names"]
    assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet tissue")
    assert model.cfvit_config["provenance"]["published"] == []  # reduced: 24 dims, 5 blocks
    assert published_results("cf_deit_small", 7)[-1] == {"source": "paper, Table 2", "eta": 1.0, "gflops": 4.0,
                                                         "top1": 80.8}
    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), generator=g, dtype=torch.uint8).numpy())
    for name, ref_name, crop in (("cfvit_deit_small_patch16_224", "deit_s_9", 0.875),
                                 ("cfvit_lvvit_small", "lvvit_s_9", 0.9)):
        data_config = cfvit.from_official(load_reference(DATA, ref_name).state, name).data_config
        size = data_config["input_size"][-1]
        theirs = T.Compose([T.Resize(int(size / crop), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                            T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        assert size == 288 and data_config["crop_pct"] == crop
        assert torch.equal(build_transform(data_config)(image), theirs(image))
