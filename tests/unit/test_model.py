"""The CF-ViT model: token counts, index mapping, early exit, batch invariance, gradients, ablations."""
import math

import pytest
import timm
import torch

import cfvit
from cfvit import coarse_to_fine as c2f
from cfvit.patch import full_attention_matrix


def small(**kw):
    torch.manual_seed(0)
    return cfvit.create_model("cfvit_tiny_fmnist", **kw).eval()


def images(n, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.in_chans, model.img_size, model.img_size, generator=g)


def test_fine_token_counts():
    assert c2f.num_fine_tokens(49, 0.5) == 124
    assert c2f.num_fine_tokens(81, 0.5) == 204
    assert c2f.num_fine_tokens(49, 0.0) == 49
    assert c2f.num_fine_tokens(49, 1.0) == 196
    for nc in (49, 81):
        for a in (0.1, 0.25, 0.3, 0.7, 0.9):  # Eq. (10) with floor((1-a)Nc)
            assert c2f.num_fine_tokens(nc, a) == 4 * math.ceil(a * nc - 1e-9) + math.floor((1 - a) * nc + 1e-9)
    assert cfvit.create_model("cfvit_deit_tiny_patch16_224").n_fine == 124
    assert cfvit.create_model("cfvit_deit_tiny_patch16_224", coarse_grid=9).n_fine == 204
    with pytest.raises(ValueError, match="alpha"):
        c2f.num_fine_tokens(49, 1.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):  # β = 1: the EMA stays 0, all patches tie
        cfvit.create_model("cfvit_tiny_fmnist", embed_dim=32, depth=2, num_heads=2, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        cfvit.create_model("cfvit_tiny_fmnist", embed_dim=32, depth=2, num_heads=2).set_inference(beta=1.0)


def test_coarse_to_fine_index_mapping():
    idx = torch.tensor([[0, 8, 48]])
    fine = c2f.coarse_to_fine_index(idx, 7)
    # (0,0) -> (0,0),(0,1),(1,0),(1,1); (1,1) -> (2,2),(2,3),(3,2),(3,3); (6,6) -> (12,12)...(13,13)
    assert fine.tolist() == [[[0, 1, 14, 15], [30, 31, 44, 45], [180, 181, 194, 195]]]
    # every fine patch is the child of exactly one coarse patch
    all_children = c2f.coarse_to_fine_index(torch.arange(81)[None], 9).flatten()
    assert sorted(all_children.tolist()) == list(range(324))
    # and the children lie inside the parent's region of the image
    for ci in range(49):
        r, c = divmod(ci, 7)
        for fi in c2f.coarse_to_fine_index(torch.tensor([ci]), 7)[0].tolist():
            fr, fc = divmod(fi, 14)
            assert (fr // 2, fc // 2) == (r, c)


def test_fine_sequence_keeps_unselected_coarse_tokens():
    b, gc, d = 2, 3, 4
    fine = torch.randn(b, 4 * gc * gc, d)
    coarse = torch.randn(b, gc * gc, d)
    reuse = torch.randn(b, gc * gc, d)
    sel = torch.tensor([[0, 4], [2, 8]])
    out = c2f.build_fine_tokens(fine, coarse, reuse, sel, gc)
    assert out.shape == (b, 4 * 2 + 7, d)
    children = c2f.coarse_to_fine_index(sel, gc)
    for i in range(b):
        for j in range(2):
            for q in range(4):
                expect = fine[i, children[i, j, q]] + reuse[i, sel[i, j]]
                torch.testing.assert_close(out[i, 4 * j + q], expect)
        kept = [n for n in range(gc * gc) if n not in sel[i].tolist()]
        torch.testing.assert_close(out[i, 8:], coarse[i, kept])


def test_eta_zero_exits_everything_and_above_one_exits_nothing():
    m = small()
    x = images(6, m)
    out0 = m.infer(x, 0.0, return_indices=True)
    assert out0.exit_stage.tolist() == [0] * 6
    torch.testing.assert_close(out0.logits, out0.coarse_logits)
    assert (out0.selected == -1).all()
    out1 = m.infer(x, 1.01, return_indices=True)
    assert out1.exit_stage.tolist() == [1] * 6
    assert (out1.selected >= 0).all() and out1.selected.shape == (6, m.k_selected)
    assert not torch.allclose(out1.logits, out1.coarse_logits)


def _eta_in_widest_gap(conf):
    s = conf.sort().values
    gaps = s[1:] - s[:-1]
    i = int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


def test_batch_invariance_and_batch_of_one():
    m = small()
    x = images(7, m)
    conf = m.infer(x, 0.0).coarse_logits.softmax(-1).amax(-1)
    eta = _eta_in_widest_gap(conf)
    full = m.infer(x, eta, return_indices=True)
    assert 0 < int(full.exit_stage.sum()) < 7, "the test needs a batch where part exits"
    for i in range(7):
        one = m.infer(x[i:i + 1], eta, return_indices=True)
        assert one.logits.shape == (1, 10)
        assert one.exit_stage.item() == full.exit_stage[i].item()
        assert one.selected[0].tolist() == full.selected[i].tolist()
        torch.testing.assert_close(one.logits[0], full.logits[i], atol=1e-4, rtol=1e-4)
    # a different batch composition (reversed, with duplicates) gives the same answers too
    perm = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0])
    other = m.infer(x[perm], eta)
    assert other.exit_stage.tolist() == full.exit_stage[perm].tolist()
    torch.testing.assert_close(other.logits, full.logits[perm], atol=1e-4, rtol=1e-4)


def test_nine_by_nine_grid_and_bf16_autocast():
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_deit_tiny_patch16_224", coarse_grid=9, num_classes=5).eval()
    assert (m.img_size, m.coarse_img_size, m.fine_grid) == (288, 144, 18)
    x = images(2, m)
    out = m.infer(x, 1.01, return_indices=True)
    assert out.logits.shape == (2, 5) and out.selected.shape == (2, 41)
    one = m.infer(x[:1], 1.01)
    assert one.logits.shape == (1, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = m.infer(x, 1.01)
    assert bf.logits.dtype == torch.float32 and torch.isfinite(bf.logits).all()
    assert bf.logits.argmax(-1).tolist() == out.logits.argmax(-1).tolist() or \
        torch.allclose(bf.logits, out.logits, atol=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_bf16_infer_matches_cpu():
    m = small()
    x = images(4, m)
    cpu = m.infer(x, 1.01)
    mc = m.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = mc.infer(x.cuda(), 1.01)
    assert gpu.logits.argmax(-1).cpu().tolist() == cpu.logits.argmax(-1).tolist()


def test_wrong_input_shape_is_a_clear_error():
    m = small()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 56, 56\)"):
        m.infer(torch.randn(2, 3, 56, 56), 0.5)
    with pytest.raises(ValueError, match="fine resolution"):
        m(torch.randn(2, 1, 28, 28))


def test_gradients_reach_reuse_and_both_stages():
    m = small()
    m.train()
    x = images(4, m)
    y = torch.tensor([0, 1, 2, 3])
    for split_all in (True, False):
        m.zero_grad()
        out = m(x, split_all=split_all)
        loss, parts = cfvit.losses.cfvit_loss(out.coarse_logits, out.fine_logits, y)
        loss.backward()
        assert set(parts) == {"ce", "kl"}
        for name in ("coarse_pos_embed", "vit.pos_embed", "vit.patch_embed.proj.weight", "vit.cls_token",
                     "vit.blocks.0.attn.qkv.weight", "vit.head.weight", "reuse.1.fc1.weight"):
            grad = dict(m.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_kl_term_does_not_push_the_fine_stage():
    """KL(coarse ‖ fine.detach()): the coarse-distillation term gives the fine logits no gradient."""
    coarse = torch.randn(3, 5, requires_grad=True)
    fine = torch.randn(3, 5, requires_grad=True)
    cfvit.losses.coarse_distillation(coarse, fine).backward()
    assert fine.grad is None and coarse.grad.abs().sum() > 0
    soft = torch.softmax(torch.randn(3, 5), -1)  # mixup targets
    loss, _ = cfvit.losses.cfvit_loss(coarse, fine, soft)
    assert torch.isfinite(loss)
    y = torch.tensor([0, 1, 2])
    loss, parts = cfvit.losses.cfvit_loss(coarse, fine, y, coarse_loss="ce")  # the CE+CE ablation
    ce = torch.nn.functional.cross_entropy
    assert parts == pytest.approx({"ce": float(ce(fine, y)), "coarse_ce": float(ce(coarse, y))})
    assert float(loss) == pytest.approx(parts["ce"] + parts["coarse_ce"])


def test_selection_ablations_change_the_selected_patches():
    m = small()
    x = images(3, m)
    state = m.coarse_stage(x)
    chosen = {}
    for mode in ("gca", "last", "negative", "random"):
        m.selection = mode
        chosen[mode] = m.select(m.coarse_stage(x)).tolist()
    k = m.k_selected
    scores = state.scores
    top = scores.topk(k, dim=-1).indices.sort(-1).values.tolist()
    assert chosen["gca"] == top
    bottom = (-scores).topk(k, dim=-1).indices.sort(-1).values.tolist()
    assert chosen["negative"] == bottom
    assert chosen["last"] != chosen["gca"]  # last block's attention alone ranks differently
    assert chosen["random"] != chosen["gca"]
    # gca with beta=0 keeps only the last block: the same as `last`
    m.selection, m.beta = "gca", 0.0
    assert m.select(m.coarse_stage(x)).tolist() == chosen["last"]


def test_reuse_ablations():
    x = images(2, small())
    outs = {}
    for kind in ("mlp", "linear", "none"):
        m = small(reuse=kind)
        n_reuse = sum(p.numel() for n, p in m.named_parameters() if n.startswith("reuse"))
        outs[kind] = (n_reuse, m.infer(x, 1.01).logits, m.stage_gflops()["fine"])
    d = 96
    assert outs["mlp"][0] == 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert outs["linear"][0] == 2 * d + d * d + d
    assert outs["none"][0] == 0
    assert outs["mlp"][2] > outs["linear"][2] > outs["none"][2]
    # the same backbone weights (same seed) give other logits once the reuse path changes
    assert not torch.allclose(outs["mlp"][1], outs["none"][1])


def test_reuse_reaches_only_the_split_patches():
    m = small()
    x = images(2, m)
    state = m.coarse_stage(x)
    sel = m.select(state)
    fine = m.vit.patch_embed(x) + m.vit.pos_embed[:, 1:]
    with torch.no_grad():
        with_reuse = c2f.build_fine_tokens(fine, state.embed, m.reuse(state.tokens), sel, 7)
        without = c2f.build_fine_tokens(fine, state.embed, None, sel, 7)
    n_split = 4 * m.k_selected
    assert not torch.allclose(with_reuse[:, :n_split], without[:, :n_split])
    torch.testing.assert_close(with_reuse[:, n_split:], without[:, n_split:])


def test_class_attention_row_matches_full_attention_matrix():
    m = small()
    x = images(3, m)
    fast = m.coarse_stage(x)
    with full_attention_matrix(True):
        naive = m.coarse_stage(x)
    torch.testing.assert_close(fast.scores, naive.scores, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fast.logits, naive.logits, atol=1e-5, rtol=1e-4)
    assert fast.scores.shape == (3, 49)
    # EMA from g = 0 of rows that sum to at most 1 (the class column is dropped): <= 1 - beta**n_blocks
    n = len(m.vit.blocks) - m.gca_start_block
    assert (fast.scores >= 0).all() and (fast.scores.sum(-1) <= 1 - m.beta ** n + 1e-6).all()


def test_class_attention_row_stays_float32_under_bf16_autocast():
    from cfvit.patch import cls_attention_row

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 50, 16).bfloat16(), torch.randn(2, 3, 50, 16).bfloat16()
    exact = cls_attention_row(q, k, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = cls_attention_row(q, k, 0.25)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, atol=0, rtol=0)  # not rounded through bf16


def test_from_timm_wraps_timm_models_with_their_own_modules():
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3)
    blocks = list(vit.blocks)
    m = cfvit.from_timm(vit)
    assert m.vit is vit and list(m.vit.blocks) == blocks  # same module objects, patched in place
    assert isinstance(m.vit.blocks[0], timm.models.vision_transformer.Block)
    assert m.coarse_grid == 7 and m.infer(torch.randn(1, 3, 224, 224), 1.01).logits.shape == (1, 3)
    with pytest.raises(ValueError, match="class token"):
        cfvit.from_timm("vit_tiny_patch16_224", global_pool="avg", class_token=False)
    with pytest.raises(ValueError, match="register tokens"):
        cfvit.from_timm("vit_tiny_patch16_224", reg_tokens=4)
    with pytest.raises(ValueError, match="coarse_grid=9"):
        cfvit.from_timm("deit_tiny_patch16_224", coarse_grid=9)


def test_lvvit_small_runs_both_stages():
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_lvvit_small", num_classes=4, depth=4).eval()
    out = m.infer(torch.randn(2, 3, 224, 224), 1.01, return_indices=True)
    assert out.logits.shape == (2, 4) and out.selected.shape == (2, 25)


def test_lvvit_is_built_as_its_authors_run_it():
    torch.manual_seed(0)
    m = cfvit.create_model("cfvit_lvvit_small", num_classes=5, depth=4, embed_dim=48).eval()
    blk = m.vit.blocks[0]
    assert blk.ls1.skip_lam == blk.ls2.skip_lam == 2.0  # a constant: no residual-scale weights to learn or load
    assert not any(".ls1." in k or ".ls2." in k for k in m.state_dict())
    assert blk.norm1.eps == m.vit.norm.eps == m.reuse[0].eps == 1e-5
    assert m.reuse[1].fc1.out_features == blk.mlp.fc1.out_features == 144  # the reuse MLP as wide as the blocks'
    assert m.aux_head.weight.shape == (5, 48) and blk.attn.qkv.bias is None
    x = torch.randn(3, 3, 224, 224)
    normed = []
    m.vit.norm.register_forward_hook(lambda mod, inp, out: normed.append(out))
    with torch.no_grad():
        paper = m.coarse_stage(x)
        fine_paper, _ = m.fine_stage(x, paper)
        # class logits + 0.25 × the per-class maximum of the token-labelling head over the patch tokens
        for tokens, logits in zip(normed, (paper.logits, fine_paper)):
            expected = m.vit.head(tokens[:, 0]) + 0.25 * m.aux_head(tokens[:, 1:]).amax(dim=1)
            torch.testing.assert_close(logits, expected)
        m.logit_scaling = "official"
        official = m.coarse_stage(x)
        fine_official, _ = m.fine_stage(x, official)
    torch.testing.assert_close(official.logits, paper.logits / 1.25)  # the authors' coarse LV-ViT logits
    torch.testing.assert_close(fine_official, fine_paper)  # their fine logits are not divided
    with pytest.raises(ValueError, match="logit_scaling"):
        cfvit.create_model("cfvit_lvvit_small", depth=4, logit_scaling="halved")


def test_registering_a_name_twice_warns():
    from cfvit.registry import _model_entrypoints

    def cfvit_test_duplicate(**kwargs):
        return None

    try:
        cfvit.register_model(cfvit_test_duplicate)
        with pytest.warns(UserWarning, match="Overwriting cfvit_test_duplicate"):
            cfvit.register_model(cfvit_test_duplicate)
    finally:
        _model_entrypoints.pop("cfvit_test_duplicate", None)


def test_streaming_pooled_fine_stage_matches_per_batch_inference():
    from cfvit.streaming import infer_stream

    m = small()
    batches = [images(5, m, seed=s) for s in range(4)]
    conf = torch.cat([m.infer(b, 0.0).coarse_logits.softmax(-1).amax(-1) for b in batches])
    eta = float(conf.median())
    refs = [m.infer(b, eta, return_indices=True) for b in batches]
    for lookahead, fine_bs in ((0, 4), (1, 4), (3, 64)):
        outs = list(infer_stream(m, batches, eta, fine_batch_size=fine_bs, return_indices=True, lookahead=lookahead))
        assert len(outs) == 4
        for ref, o in zip(refs, outs):
            assert o.exit_stage.tolist() == ref.exit_stage.tolist()
            assert o.selected.tolist() == ref.selected.tolist()
            torch.testing.assert_close(o.logits, ref.logits, atol=1e-4, rtol=1e-4)


def test_empty_batches_in_a_stream_and_alone():
    from cfvit.streaming import infer_stream

    m = small()
    empty = images(1, m)[:0]
    batches = [empty, images(3, m, seed=1), empty, images(2, m, seed=2)]
    # the first batch is empty: the pooled fine batch size comes from the first non-empty one
    outs = list(infer_stream(m, batches, 1.01, return_indices=True))
    assert [len(o.logits) for o in outs] == [0, 3, 0, 2]
    for b, o in zip(batches, outs):
        if len(b):
            torch.testing.assert_close(o.logits, m.infer(b, 1.01).logits, atol=1e-4, rtol=1e-4)
    assert m.infer(empty, 0.5).logits.shape == (0, m.num_classes)
    with pytest.raises(ValueError, match="fine_batch_size"):
        list(infer_stream(m, batches, 0.5, fine_batch_size=0))


def test_draw_regions_makes_a_figure(tmp_path):
    from cfvit.visualize import draw_regions

    m = small()
    x = images(3, m)
    out = m.infer(x, 1.01, return_indices=True)
    fig = draw_regions(x, out.selected, m.coarse_grid, titles=["a", "b", "c"], mean=(0.286,), std=(0.353,))
    path = tmp_path / "regions.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    # one highlighted rectangle per selected patch
    assert sum(len(ax.patches) for ax in fig.axes) == 3 * m.k_selected
