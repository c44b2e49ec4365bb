"""Compare `cfvit.from_official` against reference outputs of the authors' code (make_reference.py).

For each variant: the authors' state dict through `cfvit.from_official`, then on the same inputs the
largest absolute difference of coarse and fine logits, whether the selected patches are the same sets,
and the early-exit answers at the recorded η (ours on the whole batch and one image at a time).

    python -m benchmarks.official.compare tests/data/official       # the reduced references the tests use
    python -m benchmarks.official.compare /tmp/official-full         # full-size, made with --full-size
"""
import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cfvit

MODEL_NAMES = {"deit": "cfvit_deit_small_patch16_224", "lvvit": "cfvit_lvvit_small"}
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → model input, the same float32 operations as make_reference.py (ToTensor, Normalize)."""
    return (images.float() / 255 - MEAN[:, None, None]) / STD[:, None, None]


@dataclass
class Reference:
    name: str
    model_name: str
    coarse_grid: int
    state: dict
    outputs: dict
    images: torch.Tensor
    metadata: dict


def load_reference(folder: Path, name: str) -> Reference:
    folder = Path(folder)
    with safe_open(str(folder / f"{name}.outputs.safetensors"), "pt") as f:
        meta = f.metadata()
    return Reference(name=name, model_name=MODEL_NAMES[meta["family"]], coarse_grid=int(meta["coarse_grid"]),
                     state=load_file(str(folder / f"{name}.model.safetensors")),
                     outputs=load_file(str(folder / f"{name}.outputs.safetensors")),
                     images=normalise(load_file(str(folder / "inputs.safetensors"))[meta["images"]]), metadata=meta)


def variants(folder: Path) -> list[str]:
    return sorted(p.name.removesuffix(".outputs.safetensors") for p in Path(folder).glob("*.outputs.safetensors"))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def ours(model, ref: Reference) -> dict:
    """Our coarse and fine logits, selections and early-exit answers on the reference inputs."""
    state = model.coarse_stage(ref.images)
    fine_logits, selected = model.fine_stage(ref.images, state)
    early = [model.infer(ref.images, float(eta)) for eta in ref.outputs["etas"]]
    one_by_one = [[model.infer(ref.images[i:i + 1], float(eta)) for i in range(len(ref.images))]
                  for eta in ref.outputs["etas"]]
    return {"coarse_logits": state.logits, "fine_logits": fine_logits, "selected": selected,
            "gca_scores": state.scores, "early": early, "one_by_one": one_by_one}


def compare(model, ref: Reference) -> dict:
    """Figures of ours against theirs: max |Δ| of logits and scores, selections and exits equal or not."""
    o, r = ours(model, ref), ref.outputs
    early_logits = torch.stack([e.logits for e in o["early"]])
    single_logits = torch.stack([torch.cat([e.logits for e in row]) for row in o["one_by_one"]])
    early_fine = torch.stack([e.exit_stage for e in o["early"]]).bool()
    single_fine = torch.stack([torch.cat([e.exit_stage for e in row]) for row in o["one_by_one"]]).bool()
    return {
        "coarse_logits": max_abs(o["coarse_logits"], r["coarse_logits"]),
        "fine_logits": max_abs(o["fine_logits"], r["fine_logits"]),
        "gca_scores": max_abs(o["gca_scores"], r["gca_scores"]),
        "selected_equal": torch.equal(o["selected"].sort(-1).values, r["selected"].sort(-1).values),
        "early_exit_logits": max_abs(early_logits, r["early_exit_logits"]),
        "early_exit_batch_of_one": max_abs(single_logits, r["early_exit_logits"]),
        "exits_equal": torch.equal(early_fine, r["early_exit_fine"].bool())
        and torch.equal(single_fine, r["early_exit_fine"].bool()),
        "top1_equal": torch.equal(early_logits.argmax(-1), r["early_exit_logits"].argmax(-1)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    print(f"{'variant':<10} {'coarse':>9} {'fine':>9} {'scores':>9} {'early':>9} {'B=1':>9}  selections exits top-1")
    for name in variants(args.folder):
        ref = load_reference(args.folder, name)
        model = cfvit.from_official(ref.state, ref.model_name, coarse_grid=ref.coarse_grid)
        f = compare(model, ref)
        print(f"{name:<10} {f['coarse_logits']:9.2e} {f['fine_logits']:9.2e} {f['gca_scores']:9.2e} "
              f"{f['early_exit_logits']:9.2e} {f['early_exit_batch_of_one']:9.2e}  "
              f"{'same' if f['selected_equal'] else 'DIFFER':<10} {'same' if f['exits_equal'] else 'DIFFER':<5} "
              f"{'same' if f['top1_equal'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
