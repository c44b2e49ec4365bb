"""`cfvit calibrate` on an `s3://` checkpoint (the S3 server, moto): the calibrated copy goes to a new prefix
beside it; the original's objects stay byte for byte."""
import json

import torch
from safetensors.torch import load

import cfvit
from cfvit_common.checkpoints import upload_checkpoint
from jobs.calibrate.run import calibrate

BUCKET = "cfvit-calibrate-s3"


def _objects(s3, prefix: str) -> dict:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def test_calibrating_an_s3_checkpoint_writes_a_new_prefix_and_leaves_the_old_one(s3_server, fmnist_checkpoint):
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    origin = f"s3://{BUCKET}/models/fmnist"
    upload_checkpoint(fmnist_checkpoint, origin)
    before = _objects(s3, "models/fmnist/")
    g = cfvit.load(fmnist_checkpoint).stage_gflops()

    cal = calibrate(origin, [f"{g['coarse'] + 0.5 * g['fine']:.6f}"], limit=128)
    assert cal.written_to.startswith(origin + "-calibrated-") and cal.written_to != origin
    assert _objects(s3, "models/fmnist/") == before  # the original, untouched
    new = _objects(s3, cal.written_to[len(f"s3://{BUCKET}/"):] + "/")
    assert set(new) == set(before)
    assert json.loads(new["config.json"])["eta_table"] == cal.table and cal.table
    old_w, new_w = load(before["model.safetensors"]), load(new["model.safetensors"])
    assert old_w.keys() == new_w.keys() and all(torch.equal(old_w[k], new_w[k]) for k in old_w)  # same weights
    again = calibrate(origin, [f"{g['coarse'] + 0.5 * g['fine']:.6f}"], limit=128)
    assert again.written_to != cal.written_to  # each run its own prefix
