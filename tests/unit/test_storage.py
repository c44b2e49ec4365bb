"""cfvit_common/storage.py: what Ray's remote processes get when the S3 filesystem is pickled to them."""
import pickle

from cfvit_common import storage


def test_s3_filesystem_rides_out_a_stall_in_every_process(monkeypatch):
    """The filesystem is pickled into Ray Data's read tasks, the train workers and the Train controller.
    pyarrow drops the retry strategy when pickling, so its request timeout must carry a 20-s outage there:
    with the SDK's default (3 s) the controller's checkpoint bookkeeping failed the whole job."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    remote = pickle.loads(pickle.dumps(storage.s3_filesystem()))
    options = remote.__reduce__()[1][0]
    assert options["request_timeout"] >= 30 and options["connect_timeout"] >= 5
    assert options["endpoint_override"] == "127.0.0.1:9" and options["scheme"] == "http"
    assert options["access_key"] == "k"
