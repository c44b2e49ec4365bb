"""Resuming reads DeepSpeed checkpoints with weights_only=True: a real ZeRO-2 round trip, and a planted
pickle refused. In a subprocess, since it initialises torch.distributed (gloo, one rank)."""
import sys
import textwrap

import pytest

from tests.fixtures.procs import run
from tests.fixtures.services import free_port

SCRIPT = textwrap.dedent('''
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist
    dist.init_process_group("gloo")
    import deepspeed
    from timm.optim import create_optimizer_v2
    from jobs.train.deepspeed import use_weights_only_loading

    root = sys.argv[1]

    def engine(stage):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05)
        cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0}
        eng, *_ = deepspeed.initialize(model=m, optimizer=opt, config=cfg, dist_init_required=False)
        use_weights_only_loading(eng)
        return eng

    for stage in (0, 1, 2):
        a = engine(stage)
        for _ in range(2):
            a.backward(a(torch.randn(4, 8)).sum()); a.step()
        a.save_checkpoint(f"{root}/z{stage}", tag="t")
        b = engine(stage)
        b.load_checkpoint(f"{root}/z{stage}", tag="t")
        assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
        x = torch.randn(4, 8)  # the optimizer state came back too: one more step stays identical
        for e in (a, b):
            e.backward(e(x).sum()); e.step()
        assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters())), stage
        print("round trip", stage, flush=True)

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {root}/pwned",))

    f = f"{root}/z2/t/mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    state["extra"] = Planted()
    torch.save(state, f)
    try:
        engine(2).load_checkpoint(f"{root}/z2", tag="t")
    except Exception as e:
        print("refused", type(e).__name__, flush=True)
    assert not os.path.exists(f"{root}/pwned")
''')


@pytest.mark.e2e
def test_deepspeed_resume_is_weights_only(tmp_path):
    proc = run([sys.executable, "-c", SCRIPT, str(tmp_path), str(free_port())], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("round trip", "refused"))]
    assert lines == ["round trip 0", "round trip 1", "round trip 2", "refused UnpicklingError"], proc.stdout[-2000:]
