"""FLOPs against torch's FlopCounterMode, the η budget maths, checkpoints."""
import json

import numpy as np
import pytest
import timm
import torch

import cfvit
from cfvit import budget
from cfvit.flops import measure_macs


@pytest.fixture(scope="module")
def deit_s():
    torch.manual_seed(0)
    return cfvit.create_model("cfvit_deit_small_patch16_224").eval()


def test_deit_s_figures_match_the_paper(deit_s):
    g = deit_s.stage_gflops()
    assert g["coarse"] == pytest.approx(1.10, abs=0.01)
    assert g["fine"] == pytest.approx(2.92, abs=0.01)
    assert deit_s.backbone_gflops() == pytest.approx(4.61, abs=0.01)
    assert g["coarse"] + g["fine"] == pytest.approx(4.02, abs=0.01)
    # every image pays the coarse stage; the ones that go on pay the fine stage too
    assert deit_s.expected_gflops(1.0) == pytest.approx(g["coarse"])
    assert deit_s.expected_gflops(0.0) == pytest.approx(g["coarse"] + g["fine"])
    assert deit_s.expected_gflops(0.25) == pytest.approx(g["coarse"] + 0.75 * g["fine"])


def test_stage_flops_match_flop_counter(deit_s):
    x = torch.randn(2, 3, 224, 224)
    g = deit_s.stage_gflops()
    with torch.no_grad():
        coarse_macs, state = measure_macs(deit_s.coarse_stage, x)
        fine_macs, _ = measure_macs(deit_s.fine_stage, x, state)
    # FlopCounterMode leaves out LayerNorms (fvcore counts them): within 2 %
    assert coarse_macs / 2 / 1e9 == pytest.approx(g["coarse"], rel=0.02)
    assert fine_macs / 2 / 1e9 == pytest.approx(g["fine"], rel=0.02)
    with torch.no_grad():
        backbone_macs, _ = measure_macs(deit_s.vit, x)
    assert backbone_macs / 2 / 1e9 == pytest.approx(deit_s.backbone_gflops(), rel=0.02)


def test_lvvit_s_counts_its_conv_stem_and_token_labelling_head():
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_lvvit_small").eval()
    g = m.stage_gflops()
    # the paper (Table 2): LV-ViT-S 6.6 GFLOPs, CF-ViT on it 6.1 with every image through both stages
    assert g["coarse"] + g["fine"] == pytest.approx(6.1, abs=0.1)
    assert m.backbone_gflops() == pytest.approx(6.6, abs=0.1)
    aux_fine = m.n_fine * 384 * 1000 / 1e9  # the head over every fine-stage patch token
    assert aux_fine == pytest.approx(0.048, abs=0.001)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        coarse_macs, state = measure_macs(m.coarse_stage, x)
        fine_macs, _ = measure_macs(m.fine_stage, x, state)
    assert coarse_macs / 1e9 == pytest.approx(g["coarse"], rel=0.02)  # one image
    assert fine_macs / 1e9 == pytest.approx(g["fine"], rel=0.02)
    m.aux_head = None  # without the head the count drops by exactly its share
    assert g["fine"] - m.stage_gflops()["fine"] == pytest.approx(aux_fine, rel=1e-9)


def test_fused_cpu_attention_is_counted(deit_s):
    """Without the custom formula FlopCounterMode skips the CPU flash-attention op (DeiT-S: ~4.25 G)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        deit_s.vit(x)
    with torch.no_grad():
        ours, _ = measure_macs(deit_s.vit, x)
    assert plain.get_total_flops() / 2 / 1e9 < 4.35
    assert ours / 1e9 == pytest.approx(4.61, rel=0.02)


def test_infer_with_partial_exit_counts_coarse_for_all_and_fine_for_the_rest():
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_tiny_fmnist").eval()
    x = torch.randn(8, 1, 56, 56)
    conf = m.infer(x, 0.0).coarse_logits.softmax(-1).amax(-1)
    eta = float(conf.sort().values[4])  # the 4 most confident exit
    macs, out = measure_macs(m.infer, x, eta)
    n_fine = int(out.exit_stage.sum())
    assert n_fine == 4
    g = m.stage_gflops()
    expected = 8 * g["coarse"] + n_fine * g["fine"]
    assert macs / 1e9 == pytest.approx(expected, rel=0.02)


def brute_force_curve(cp, fp, y, cg, fg):
    conf = cp.max(1).astype(np.float32)
    pts = []
    for eta in np.concatenate([np.unique(conf), [np.nextafter(conf.max(), np.float32(2))]]):
        ex = conf >= eta
        pred = np.where(ex, cp.argmax(1), fp.argmax(1))
        pts.append((float(eta), float((pred == y).mean()), cg + (1 - ex.mean()) * fg))
    return sorted(pts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eta_curve_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    cp = rng.dirichlet(np.ones(c) * 0.5, n).astype(np.float32)
    fp = rng.dirichlet(np.ones(c) * 0.5, n).astype(np.float32)
    cp[:40] = cp[0]  # ties in confidence
    y = rng.integers(0, c, n)
    curve = budget.eta_curve(cp, fp, y, coarse_gflops=1.1, fine_gflops=2.92)
    bf = brute_force_curve(cp, fp, y, 1.1, 2.92)
    assert len(curve) == len(bf)
    np.testing.assert_allclose(curve.eta, [p[0] for p in bf], rtol=0, atol=0)
    np.testing.assert_allclose(curve.accuracy, [p[1] for p in bf], atol=1e-12)
    np.testing.assert_allclose(curve.gflops, [p[2] for p in bf], atol=1e-9)
    # tensors work as well as arrays
    curve_t = budget.eta_curve(torch.from_numpy(cp), torch.from_numpy(fp), torch.from_numpy(y),
                               coarse_gflops=1.1, fine_gflops=2.92)
    np.testing.assert_array_equal(curve_t.accuracy, curve.accuracy)
    # best point within each budget equals the brute-force maximum
    for b in (1.1, 1.5, 2.0, 3.0, 4.02):
        p = budget.eta_for_budget(curve, b)
        feasible = [q for q in bf if q[2] <= b + 1e-9]
        assert p.accuracy == pytest.approx(max(q[1] for q in feasible))
        assert p.gflops <= b + 1e-9


def test_eta_from_curve_reproduces_the_accuracy_at_inference():
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_tiny_fmnist").eval()
    x = torch.randn(16, 1, 56, 56)
    y = torch.randint(0, 10, (16,))
    full = m.infer(x, 1.01)
    curve = budget.eta_curve(full.coarse_logits.softmax(-1), full.logits.softmax(-1), y,
                             **{f"{k}_gflops": v for k, v in m.stage_gflops().items()})
    for i in range(0, len(curve), 3):
        out = m.infer(x, float(curve.eta[i]))
        assert float((out.logits.argmax(-1) == y).float().mean()) == pytest.approx(curve.accuracy[i])
        assert 1 - float(out.exit_stage.float().mean()) == pytest.approx(curve.exit_fraction[i])


def test_infeasible_budget_says_what_is_reachable():
    rng = np.random.default_rng(0)
    cp = rng.dirichlet(np.ones(5), 50)
    fp = rng.dirichlet(np.ones(5), 50)
    curve = budget.eta_curve(cp, fp, rng.integers(0, 5, 50), coarse_gflops=1.1, fine_gflops=2.92)
    with pytest.raises(budget.BudgetError) as e:
        budget.eta_for_budget(curve, 1.0)
    assert isinstance(e.value, ValueError)
    assert "1.100" in str(e.value) and "4.020" in str(e.value)
    assert e.value.reachable == pytest.approx((1.1, 4.02))
    rows = budget.eta_table(curve, [1.0, 2.0, 5.0])
    assert [r["budget_gflops"] for r in rows] == [2.0, 5.0]
    with pytest.raises(ValueError, match="N x C"):
        budget.eta_curve(cp, fp[:10], np.zeros(50), coarse_gflops=1, fine_gflops=1)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_tiny_fmnist", alpha=0.3, embed_dim=48, depth=3, num_heads=2).eval()
    x = torch.randn(3, 1, 56, 56)
    ref = m.infer(x, 0.12, return_indices=True)
    cfvit.save(m, tmp_path / "ckpt", class_names=list("abcdefghij"), eta_table=[{"budget_gflops": 0.1, "eta": 0.5}])
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["alpha"] == 0.3 and cfg["coarse_grid"] == 7 and cfg["embed_dim"] == 48
    assert cfg["stage_gflops"] == m.stage_gflops()
    m2 = cfvit.load(tmp_path / "ckpt")
    assert m2.cfvit_config["class_names"][0] == "a" and m2.cfvit_config["eta_table"][0]["eta"] == 0.5
    out = m2.infer(x, 0.12, return_indices=True)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.selected, ref.selected)
    # saving a loaded model keeps its metadata, and α/β/selection changed after training
    m2.set_inference(alpha=0.5, beta=0.9, selection="last")
    cfvit.save(m2, tmp_path / "again")
    m3 = cfvit.load(tmp_path / "again")
    assert m3.cfvit_config["class_names"][0] == "a"
    assert (m3.alpha, m3.beta, m3.selection, m3.k_selected) == (0.5, 0.9, "last", 25)
    # ... but not an η table chosen for the old α/β: its accuracies and GFLOPs no longer hold
    assert "eta_table" not in m3.cfvit_config
    cfvit.save(m2, tmp_path / "fresh", eta_table=[{"budget_gflops": 0.2, "eta": 0.7}])
    assert cfvit.load(tmp_path / "fresh").cfvit_config["eta_table"][0]["eta"] == 0.7
    cfvit.save(cfvit.load(tmp_path / "ckpt"), tmp_path / "same")  # unchanged settings: the table stays
    assert cfvit.load(tmp_path / "same").cfvit_config["eta_table"][0]["eta"] == 0.5
    with pytest.raises(ValueError, match="alpha"):
        m3.set_inference(alpha=2.0)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    m = cfvit.create_model("cfvit_tiny_fmnist", embed_dim=48, depth=2, num_heads=2)
    ck = cfvit.save(m, tmp_path / "ok")
    with pytest.raises(cfvit.CheckpointError, match="config.json is missing"):
        cfvit.load(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((ck / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(cfvit.CheckpointError, match="corrupt or unreadable"):
        cfvit.load(bad)
    # weights of another size under the same config
    other = cfvit.create_model("cfvit_tiny_fmnist", embed_dim=64, depth=2, num_heads=2)
    cfvit.save(other, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((ck / "config.json").read_text())
    with pytest.raises(cfvit.CheckpointError, match="shape mismatch"):
        cfvit.load(tmp_path / "other")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(cfvit.CheckpointError, match="not valid JSON"):
        cfvit.load(bad)


def test_backbone_from_local_timm_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    torch.save({"model": vit.state_dict()}, tmp_path / "deit_tiny.pth")  # DeiT's release format
    m = cfvit.create_model("cfvit_deit_tiny_patch16_224", num_classes=10,
                           checkpoint_path=str(tmp_path / "deit_tiny.pth"))
    torch.testing.assert_close(m.vit.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(m.vit.pos_embed, vit.pos_embed)
    assert m.vit.head.weight.shape == (10, 192)  # 1000-class head left out
    assert m.coarse_pos_embed.shape == (1, 50, 192)
    # a pickle with code in it is refused (weights_only)
    torch.save({"model": vit.state_dict(), "evil": timm.create_model}, tmp_path / "evil.pth")
    with pytest.raises(cfvit.CheckpointError, match="weights_only"):
        cfvit.create_model("cfvit_deit_tiny_patch16_224", checkpoint_path=str(tmp_path / "evil.pth"))
    # weights under other names (another stem, another family) are an error, not a silently random layer
    renamed = {k.replace("patch_embed.proj", "patch_embed.conv1"): v for k, v in vit.state_dict().items()}
    torch.save(renamed, tmp_path / "other.pth")
    with pytest.raises(cfvit.CheckpointError, match=r"2 weights missing, e.g. patch_embed.proj"):
        cfvit.create_model("cfvit_deit_tiny_patch16_224", checkpoint_path=str(tmp_path / "other.pth"))
