"""Reference outputs of the CF-ViT authors' own code, for comparing `cfvit.from_official` against it.

Runs *their* model classes (deit/models_deit.py `CFVisionTransformer`, lvvit/models/lvvit.py `CF_LV_ViT`)
from a checkout of github.com/ChenMnZ/CF-ViT given with --repo (nothing of theirs is copied into this
project), on the CPU: `.cuda()` is made a no-op in this process. Their repository vendors an old timm,
which shadows the installed one here, so this script imports nothing from cfvit; `compare.py` runs ours.

For each variant (DeiT-S and LV-ViT-S, 7x7 and 9x9 coarse grids) it seeds weights (Linear and conv
weights N(0, 1/fan_in); position tables, class token, norms and BatchNorm statistics all randomised so that
a mis-mapped tensor shows), runs their `forward` with informative selection on and their
`forward_early_exit` at two η (between the sorted coarse confidences, so the batch splits), and writes:
  inputs.safetensors              images_224, images_288: uint8 (B, 3, S, S) (normalise: /255, ImageNet mean/std)
  <variant>.model.safetensors     their state dict, their key names
  <variant>.outputs.safetensors   coarse_logits, fine_logits, selected (B, k; coarse indices in their order),
                                  gca_scores (B, Nc; their global class attention), etas, early_exit_logits
                                  (n_eta, B, C), early_exit_fine (n_eta, B)

Their DeiT `forward_early_exit` hard-codes the 14x14 grid and fails for 9x9: there the early-exit answers
are composed from their `forward` logits (coarse where the top softmax probability >= η, fine elsewhere),
noted in the file's metadata.

    python -m benchmarks.official.make_reference --repo /tmp/cfvit-official --out tests/data/official
    python -m benchmarks.official.make_reference --repo /tmp/cfvit-official --out /tmp/official-full --full-size
"""
import argparse
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
BATCH = 4
VARIANTS = {"deit_s_7": ("deit", 7), "deit_s_9": ("deit", 9), "lvvit_s_7": ("lvvit", 7), "lvvit_s_9": ("lvvit", 9)}
REDUCED = dict(embed_dim=24, depth=5, num_classes=10)  # 6 heads of 4 dims; the EMA still spans blocks 3 and 4


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → what their eval transform feeds the model (ToTensor, ImageNet Normalize)."""
    return (images.float() / 255 - MEAN[:, None, None]) / STD[:, None, None]


def import_theirs(repo: Path):
    sys.path.insert(0, str(repo))  # their vendored timm, utils, deit and lvvit packages
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # their code calls .cuda() on fresh tensors
    # their packages, importable only once their checkout is on the path (given on the command line)
    import deit.models_deit as deit_models
    import lvvit.models.lvvit as lvvit_models  # noqa: E402 (see above)

    return deit_models, lvvit_models


def build_theirs(modules, family: str, grid: int, full_size: bool) -> nn.Module:
    deit_models, lvvit_models = modules
    sizes = [16 * grid, 32 * grid]
    if family == "deit":
        if full_size:
            return deit_models.cf_deit_small(img_size_list=sizes)
        # cf_deit_small's arguments, narrower and shallower
        return deit_models.CFVisionTransformer(img_size_list=sizes, patch_size=16, num_heads=6, mlp_ratio=4,
                                               qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **REDUCED)
    if full_size:
        return lvvit_models.cf_lvvit_small(img_size_list=sizes)
    # cf_lvvit_small's arguments, narrower and shallower
    return lvvit_models.CF_LV_ViT(img_size_list=sizes, patch_size=16, num_heads=6, mlp_ratio=3.0, p_emb="4_2",
                                  skip_lam=2.0, return_dense=True, mix_token=True, **REDUCED)


@torch.no_grad()
def randomise(model: nn.Module, gen: torch.Generator) -> None:
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("running_var"):
            t.copy_(0.5 + torch.rand(t.shape, generator=gen))
        elif t.dim() == 1 and name.endswith("weight"):  # LayerNorm / BatchNorm scale
            t.copy_(1 + 0.2 * noise)
        elif t.dim() == 1:  # biases, running means
            t.copy_(0.1 * noise)
        elif "pos_embed" in name or "cls_token" in name:
            t.copy_(0.5 * noise)
        else:  # Linear and conv weights
            t.copy_(noise / math.sqrt(t[0].numel()))


class Spy:
    """Records what their forward passes to `get_index` (the selected coarse indices) and to torch.argsort
    (the global class attention it ranks)."""

    def __init__(self, modules):
        self.modules, self.selected, self.scores = modules, [], []
        self._argsort = torch.argsort
        self._get_index = {m: m.get_index for m in modules}

    def __enter__(self):
        def argsort(x, *args, **kwargs):
            self.scores.append(x.detach().clone())
            return self._argsort(x, *args, **kwargs)

        for m, original in self._get_index.items():
            def get_index(idx, *args, _original=original, **kwargs):
                self.selected.append(idx.detach().clone())
                return _original(idx, *args, **kwargs)

            m.get_index = get_index
        torch.argsort = argsort
        return self

    def __exit__(self, *exc):
        torch.argsort = self._argsort
        for m, original in self._get_index.items():
            m.get_index = original


def run_variant(modules, family: str, grid: int, images: torch.Tensor, full_size: bool, seed: int) -> dict:
    torch.manual_seed(seed)  # their constructors initialise from the global generator
    model = build_theirs(modules, family, grid, full_size)
    randomise(model, torch.Generator().manual_seed(seed))
    model.eval()
    model.apply(lambda m: setattr(m, "informative_selection", True))  # as their dynamic_inference.py
    fine = normalise(images)
    views = [F.interpolate(fine, size=(16 * grid,) * 2, mode="bilinear", align_corners=True), fine]
    with torch.no_grad(), Spy(modules) as spy:
        coarse_logits, fine_logits = model(views)
    conf = coarse_logits.softmax(-1).amax(-1).sort().values
    etas = [float((conf[0] + conf[1]) / 2), float((conf[-2] + conf[-1]) / 2)]  # 3 exit / 1 exits
    early, source = [], "forward_early_exit"
    for eta in etas:
        if family == "deit" and grid != 7:  # their DeiT early exit hard-codes 14x14
            source = "forward (their DeiT forward_early_exit fails for 9x9)"
            exits = coarse_logits.softmax(-1).amax(-1) >= eta
            early.append(torch.where(exits[:, None], coarse_logits, fine_logits))
        else:
            with torch.no_grad():
                early.append(model.forward_early_exit(views, eta))
    outputs = {
        "coarse_logits": coarse_logits, "fine_logits": fine_logits,
        "selected": spy.selected[0], "gca_scores": spy.scores[0],
        "etas": torch.tensor(etas, dtype=torch.float64),
        "early_exit_logits": torch.stack(early),
        "early_exit_fine": torch.stack([coarse_logits.softmax(-1).amax(-1) < eta for eta in etas]).to(torch.uint8),
    }
    return {"state": model.state_dict(), "outputs": outputs, "early_exit_source": source}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of github.com/ChenMnZ/CF-ViT")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full-size", action="store_true", help="their full DeiT-S / LV-ViT-S, 1000 classes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    modules = import_theirs(args.repo.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {f"images_{s}": torch.randint(0, 256, (BATCH, 3, s, s), generator=gen, dtype=torch.uint8)
              for s in (224, 288)}
    save_file(inputs, str(args.out / "inputs.safetensors"), metadata={"commit": commit})
    for i, (name, (family, grid)) in enumerate(VARIANTS.items()):
        result = run_variant(modules, family, grid, inputs[f"images_{32 * grid}"], args.full_size, args.seed + i)
        meta = {"commit": commit, "family": family, "coarse_grid": str(grid), "full_size": str(args.full_size),
                "images": f"images_{32 * grid}", "early_exit_source": result["early_exit_source"]}
        save_file({k: v.contiguous() for k, v in result["state"].items()},
                  str(args.out / f"{name}.model.safetensors"), metadata=meta)
        save_file({k: v.contiguous() for k, v in result["outputs"].items()},
                  str(args.out / f"{name}.outputs.safetensors"), metadata=meta)
        print(f"{name}: {sum(v.numel() for v in result['state'].values())} weights, "
              f"early exit via {result['early_exit_source']}")


if __name__ == "__main__":
    main()
