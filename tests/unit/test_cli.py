"""The `cfvit` command as a user first meets it: fast help, readable tables, and the library kept free of Ray."""
import json
import os
import sys

import pytest

from jobs.ops.outputs import check_entrypoint, is_local_tracking, job_config_of, output_problems
from jobs.train.config import load_config
from tests.fixtures.procs import run


def _python(code: str, **env) -> str:
    out = run([sys.executable, "-c", code], timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.e2e  # a subprocess
def test_import_cfvit_leaves_ray_out():
    loaded = json.loads(_python("import sys, json, cfvit, cfvit.calibration, cfvit.budget, cfvit.streaming; "
                                "print(json.dumps(sorted(sys.modules)))"))
    assert not [m for m in loaded if m == "ray" or m.startswith("ray.")]
    assert "jobs" not in loaded and "serve" not in loaded


@pytest.mark.e2e
def test_cfvit_help_imports_no_torch():
    code = ("import sys, json\nfrom cfvit_cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('\\n' + json.dumps([m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'timm', 'mlflow')]))")
    out = _python(code)
    assert "train" in out and "tune" in out and "serve" in out  # the verbs are listed
    assert json.loads(out.strip().splitlines()[-1]) == []


@pytest.mark.e2e
def test_models_names_are_never_cut_at_80_columns():
    out = _python("from cfvit_cli import main; main(['models'])", COLUMNS="80", TERM="dumb")
    import cfvit

    for name in cfvit.list_models():
        assert name in out, f"{name} cut in:\n{out}"
    assert max(len(line) for line in out.splitlines()) <= 80


@pytest.mark.parametrize("entrypoint, expected", [
    (["python", "-m", "jobs.train", "--config", "jobs/configs/fmnist_tiny.yaml", "--set", "a.b=1"],
     ("train", "jobs/configs/fmnist_tiny.yaml", ["a.b=1"])),
    (["python -m jobs.tune --config=fmnist_tiny --budgets 40%"], ("tune", "fmnist_tiny", [])),
    (["bash", "-c", "cd x && cfvit pipeline --quick --set=schedule.epochs=1"], ("pipeline", None, ["schedule.epochs=1"])),
    (["python", "-m", "cfvit_cli", "train", "-c", "c.yaml"], ("train", "c.yaml", [])),
    (["python", "-c", "import greet"], None),
    (["cfvit", "serve", "--checkpoint", "x"], None),
])
def test_job_entrypoints_are_recognised(entrypoint, expected):
    assert job_config_of(entrypoint) == expected


def test_outputs_that_vanish_with_the_working_dir_are_named_with_the_fix():
    cfg = load_config("fmnist_tiny", check_uris=False)  # ./outputs/ray_results and sqlite:///mlflow.db
    problems = output_problems(cfg, {})
    assert len(problems) == 2
    assert "checkpoint.storage_path './outputs/ray_results' is relative" in problems[0]
    assert "--set checkpoint.storage_path=s3://" in problems[0]
    assert "sqlite:///mlflow.db" in problems[1] and "MLFLOW_TRACKING_URI=http" in problems[1]
    ok = load_config("fmnist_tiny", ["checkpoint.storage_path=s3://b/p"], check_uris=False)
    assert output_problems(ok, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == []
    assert output_problems(load_config("fmnist_tiny", ["checkpoint.storage_path=s3://b/p", "mlflow.enabled=false"],
                                       check_uris=False), {}) == []
    assert is_local_tracking("sqlite:////abs/mlflow.db") and is_local_tracking("./mlruns")
    assert not is_local_tracking("http://127.0.0.1:5000")
    ep = ["python", "-m", "jobs.train", "--config", "jobs/configs/fmnist_tiny.yaml"]
    assert len(check_entrypoint(ep, {}, None)) == 2
    assert check_entrypoint(ep, {"CFVIT_ALLOW_LOCAL_OUTPUTS": "1"}, None) == []
    assert check_entrypoint(["python", "-c", "pass"], {}, None) == []


def test_bench_tables_fit_80_columns_without_cutting_a_cell():
    """`cfvit bench throughput` / `train` / `calibrate` tables at 80 columns: no cell wrapped or cut."""
    from types import SimpleNamespace

    from rich.console import Console

    from benchmarks.cli import throughput_table
    from cfvit_common.tables import compact_table

    def row(name, exit_fraction):
        return SimpleNamespace(name=name, exit_fraction=exit_fraction, eta=None if exit_fraction is None else 0.126512,
                               images_per_s=12345.6, gflops=4.61, speedup=12.34, flops_ratio=10.5,
                               ideal_speedup=None if exit_fraction is None else 11.11, of_ideal=0.97)

    res = {"settings": {"device_name": "NVIDIA H100 80GB HBM3"},
           "rows": [row("backbone", None)] + [row("cf-vit exit", f) for f in (0, 0.25, 0.5, 0.76, 1.0)]}
    train = compact_table("variant", "step ms", "images/s", "÷ backbone", "peak GPU MiB", title="training step")
    train.add_row("cfvit split-all zero2", "1234.5", "12345.6", "1.234x", "11123")
    cal = compact_table("samples", "classes", "budgets", "operating points", "best s", "median s", "goal")
    cal.add_row("50,000", "1000", "3", "12,345", "0.598", "0.658", "< 1 s ✓")
    texts = []
    for table in (throughput_table(res, "cfvit_deit_small_patch16_224", 1024, 50, True, True), train, cal):
        console = Console(width=80, record=True)
        console.print(table)
        texts.append(console.export_text())
        assert "…" not in texts[-1] and max(map(len, texts[-1].splitlines())) <= 80, texts[-1]
    assert sum(line.lstrip().startswith("CF-ViT ") for line in texts[0].splitlines()) == 5
