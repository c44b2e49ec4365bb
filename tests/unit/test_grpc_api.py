"""The gRPC face without Ray: the committed generated modules match serve/proto/cfvit.proto, refusals reach a
real gRPC client as the documented status codes with the HTTP answer's JSON and headers, the messages carry
exactly the HTTP API's answers, and the guard's checks answer the same for both transports."""
import json
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from serve import grpc_api
from serve.grpc_client import Classifier, ClassifyError
from serve.guard import Guard, KeyStore, RateLimiter, admit
from serve.proto import cfvit_pb2 as pb
from serve.proto import cfvit_pb2_grpc as pb_grpc
from serve.schemas import Prediction, TopClass

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789abcdef"


def test_committed_modules_are_what_protoc_makes_of_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the modules")
    shutil.copytree(ROOT / "serve" / "proto", tmp_path / "serve" / "proto", ignore=shutil.ignore_patterns("*_pb2*"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "serve/proto/cfvit.proto"], cwd=tmp_path, check=True,
                   start_new_session=True)
    for name in ("cfvit_pb2.py", "cfvit_pb2.pyi", "cfvit_pb2_grpc.py"):
        assert (tmp_path / "serve/proto" / name).read_text() == (ROOT / "serve/proto" / name).read_text(), (
            f"serve/proto/{name} is stale: regenerate it (docs/API.md, 'gRPC')")


class _Refusing(pb_grpc.ClassifierServicer):
    """Answers every call with the refusal its `eta` names (an HTTP status), as the ingress does."""

    def Classify(self, request, context):  # noqa: N802 - the gRPC method
        status = int(request.eta)
        headers = ((b"retry-after", b"3"),) if status == 429 else ()
        return grpc_api.refuse(context, status, f"refused {status}", {"value": float("nan")}, headers)


@pytest.fixture(scope="module")
def refusing_stub():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClassifierServicer_to_server(_Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.ClassifierStub(channel)
    channel.close()
    server.stop(0)


@pytest.mark.parametrize("status,code", [(400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"),
                                         (408, "DEADLINE_EXCEEDED"), (413, "RESOURCE_EXHAUSTED"),
                                         (415, "INVALID_ARGUMENT"), (422, "INVALID_ARGUMENT"),
                                         (429, "RESOURCE_EXHAUSTED"), (500, "INTERNAL"), (503, "UNAVAILABLE")])
def test_each_http_answer_reaches_a_grpc_client_as_its_status_code(refusing_stub, status, code):
    with pytest.raises(grpc.RpcError) as err:
        refusing_stub.Classify(pb.ClassifyRequest(images=[b"x"], eta=status), timeout=10)
    e = err.value
    assert e.code() == getattr(grpc.StatusCode, code)
    details = json.loads(e.details())
    assert details == {"error": f"refused {status}", "detail": {"value": "nan"}, "http_status": status}
    trailing = dict(e.trailing_metadata() or ())
    assert (trailing.get("retry-after") == "3") == (status == 429)


def test_messages_carry_the_http_answers_exactly():
    preds = [Prediction(label=3, class_name="Dress", confidence=0.75, top5=[TopClass(label=3, class_name="Dress",
                        probability=0.75), TopClass(label=0, class_name="T-shirt", probability=0.25)],
                        stage="fine", gflops=0.0132, eta=0.5, coarse_confidence=0.4, regions=[1, 5],
                        model_version="7"),
             Prediction(label=1, class_name="Trouser", confidence=1.0, top5=[], stage="backbone", gflops=0.0152,
                        eta=0.5, coarse_confidence=None, model_version="sha256:0123456789ab")]
    reply = pb.ClassifyReply.FromString(grpc_api.reply(preds).SerializeToString())  # as it crosses the wire
    assert [grpc_api.as_dict(m) for m in reply.predictions] == [p.model_dump() for p in preds]
    assert reply.gflops == pytest.approx(0.0132 + 0.0152)
    files, eta, budget = grpc_api.request_options(pb.ClassifyRequest(images=[b"a", b"b"], budget_gflops=0.01))
    assert files == [b"a", b"b"] and eta is None and budget == 0.01
    assert grpc_api.peer_address(None) == "unknown"


def test_the_guard_answers_both_transports_alike(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    g = Guard(KeyStore(str(keys), 5.0), RateLimiter(rate=1.0, burst=1), 30.0)
    missing = admit(g, {}, "10.0.0.1")
    assert missing.status == 401 and missing.error == "missing API key"
    assert admit(g, {b"authorization": b"Bearer wrong-key-0123456789"}, "10.0.0.1").error == "unknown API key"
    ok = {b"authorization": f"Bearer {KEY}".encode()}
    assert admit(g, ok, "10.0.0.1") is None
    limited = admit(g, ok, "10.0.0.2")  # the same key from elsewhere: one bucket per key
    assert limited.status == 429 and dict(limited.headers)[b"retry-after"] == b"1"
    assert grpc_api.status_code(limited.status) == grpc.StatusCode.RESOURCE_EXHAUSTED
    open_door = Guard(None, RateLimiter(rate=1.0, burst=1), 30.0)  # without keys: one bucket per address
    assert admit(open_door, {}, "10.0.0.1") is None and admit(open_door, {}, "10.0.0.2") is None
    assert admit(open_door, {}, "10.0.0.1").status == 429


class _Answering(pb_grpc.ClassifierServicer):
    """Answers with one prediction per image, its label the image's length; refuses eta = 0.429 as 429."""

    def Classify(self, request, context):  # noqa: N802 - the gRPC method
        if request.HasField("eta") and request.eta == 0.429:
            return grpc_api.refuse(context, 429, "rate limit", {"rate_per_s": 1.0}, ((b"retry-after", b"2"),))
        key = dict(context.invocation_metadata()).get("authorization")
        preds = [Prediction(label=len(f), class_name=key or "", confidence=1.0, top5=[], stage="coarse", gflops=0.5,
                            eta=request.eta, coarse_confidence=1.0, model_version="3") for f in request.images]
        return grpc_api.reply(preds)


def test_the_python_client_gives_the_http_json_and_raises_refusals_with_their_answer():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ClassifierServicer_to_server(_Answering(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Classifier(f"127.0.0.1:{port}", api_key=KEY) as c:
            answers = c.classify([b"ab", b"abcd"], eta=0.5)
            assert [a["label"] for a in answers] == [2, 4] and answers[0]["class_name"] == f"Bearer {KEY}"
            assert answers[0]["model_version"] == "3" and answers[0]["regions"] is None
            with pytest.raises(ClassifyError) as err:
                c.classify([b"x"], eta=0.429)
        e = err.value
        assert (e.code, e.http_status, e.error, e.retry_after_s) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 429,
                                                                     "rate limit", 2.0)
        assert e.detail == {"rate_per_s": 1.0}
    finally:
        server.stop(0)
