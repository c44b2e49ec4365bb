"""Training input at cluster scale: `data.preprocess_resources` places Ray Data's read/decode/augment tasks
on CPU-only nodes (shown on a 2-node local Ray cluster), and `cfvit bench data` prints an 80-column table."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from jobs.train.config import ConfigError, JobConfig, load_config
from jobs.train.data import remote_args
from tests.fixtures.procs import run

ROOT = Path(__file__).resolve().parents[2]


def test_preprocess_resources_config_and_remote_args(tmp_path):
    cfg = JobConfig.model_validate({"data": {"preprocess_resources": {"CPU": 2, "cpu_node": 1}}})
    assert remote_args(cfg.data.preprocess_resources) == {"num_cpus": 2.0, "resources": {"cpu_node": 1.0}}
    assert remote_args({"cpu_node": 0.5}) == {"num_cpus": 1.0, "resources": {"cpu_node": 0.5}}
    assert remote_args({}) == {} and remote_args({"CPU": 1}) == {"num_cpus": 1.0}
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: fashion-mnist, check_uris: false}\n")
    for bad, says in (("data.preprocess_resources={GPU: 1}", "'GPU' cannot be"),
                      ("data.preprocess_resources={cpu_node: 0}", "must be > 0"),
                      ("data.preprocess_resourcez={cpu_node: 1}", "preprocess_resourcez")):
        with pytest.raises(ConfigError, match=says):
            load_config(path, [bad], check_uris=False)


# Run in a fresh interpreter: a test session may already hold a local Ray, and this needs its own cluster.
CLUSTER_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    import ray
    from PIL import Image
    from ray.cluster_utils import Cluster

    from jobs.train import data
    from jobs.train.config import JobConfig

    root = sys.argv[1]
    for c in ("a", "b"):
        os.makedirs(f"{root}/{c}")
        for i in range(24):
            Image.new("RGB", (20, 16), (100 * (c == "b"), 9, i)).save(f"{root}/{c}/{i}.jpg")

    def recording_preprocess(batch, **kw):  # pickled by value: the wrapper runs where Ray places the task
        from jobs.train.data import preprocess
        out = preprocess(batch, **kw)
        out["node"] = np.array([ray.get_runtime_context().get_node_id()] * len(out["label"]))
        return out

    mb = 1024 ** 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 100 * mb})
    cpu_node = cluster.add_node(num_cpus=2, resources={"cpu_node": 2}, object_store_memory=100 * mb)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg = JobConfig.model_validate({"data": {"train": root, "val": root, "check_uris": False,
                                                 "preprocess_resources": {"CPU": 1, "cpu_node": 1}}})
        src = data.describe(root)
        dc = {"input_size": (3, 16, 16), "mean": (0, 0, 0), "std": (1, 1, 1)}
        data.preprocess = recording_preprocess
        ds = data.build_datasets(cfg, dc, src, src)["train"]
        rows = ds.take_all()  # the consumer: this driver, on the head node
        head = ray.get_runtime_context().get_node_id()
        print(json.dumps({"nodes": sorted({str(r["node"]) for r in rows}), "rows": len(rows),
                          "valid": int(sum(bool(r["valid"]) for r in rows)),
                          "cpu_node": cpu_node.node_id, "head": head}))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


@pytest.mark.e2e
def test_preprocessing_runs_on_the_cpu_node(tmp_path):
    """Head (2 CPUs, where the consumer runs) + a node with the custom `cpu_node` resource: with
    `data.preprocess_resources: {CPU: 1, cpu_node: 1}` every preprocess task ran on the CPU node."""
    proc = run([sys.executable, "-c", CLUSTER_SCRIPT, str(tmp_path)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == 48 and out["valid"] == 48
    assert out["cpu_node"] != out["head"]
    assert out["nodes"] == [out["cpu_node"]], out  # none on the head, although it had free CPUs


def test_bench_data_report_fits_80_columns():
    from benchmarks.data import GPU_STEP_RATE, make_images, per_core, print_report

    images = make_images(2)
    assert all(b[:3] == b"\xff\xd8\xff" and 60_000 < len(b) < 200_000 for b in images.values())  # ImageNet-like
    cores = per_core(list(images.values()))
    assert set(cores) == {"decode", "decode+augment"} and all(t["cpu_ms"] > 0 for t in cores.values())
    lines = []
    fake = {"images": 2, "mean_bytes": {"original": 113e3, "max-side 256": 21e3},
            "per_core": {"original": cores, "max-side 256": cores}, "num_cpus": 2, "store": "S3 at http://x",
            "gpu_step_rate": GPU_STEP_RATE, "max_side": 256, "load_avg": [1.0, 2.0], "cpu_count": 2,
            "pipeline": {"webdataset max-side 256": {"images": 2, "total_s": 1.0, "first_batch_s": 0.5,
                                                     "steady_img_s": 80.0},
                         # every image in the first batch: no rate, never a 0.0 img/s
                         "imagefolder": {"images": 2, "total_s": 0.3, "first_batch_s": 0.3, "steady_img_s": None}}}
    print_report(fake, lines.append)
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert any("cores/GPU" in line for line in lines)
    assert any(line.strip().startswith("webdataset max-side 256") and line.split()[-1] == "82.5" for line in lines)
    assert any(line.split()[:2] == ["imagefolder", "-"] and line.split()[-2:] == ["-", "-"] for line in lines)
