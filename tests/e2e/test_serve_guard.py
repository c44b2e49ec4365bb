"""The endpoint as it faces an open network, over real HTTP on one deployment with keys, a rate limit, a
short request timeout and a small pixel budget: 401s, 429s, 408s for trickling bodies, 413/415 for the
input budget, 400 for nested JSON, the security headers, the page with a key, schemathesis with a key."""
import base64
import hashlib
import io
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.guard import proxy_host
from tests.fixtures.browser import chromium, needs_chromium
from tests.fixtures.procs import run
from tests.fixtures.serve_app import TEST_ARGS, serving
from tests.fixtures.services import png_bytes as png

pytestmark = pytest.mark.e2e

APP = "cfvit-guard"
KEY = "tests-key-a-0123456789abcdef"  # in the file as it is
HASHED_KEY = "tests-key-b-0123456789abcdef"  # in the file as its sha256 only
TIMEOUT_S = 4.0
RELOAD_S = 0.5
RATE, BURST = 20.0, 20
GUARD_ARGS = {"keys_reload_s": RELOAD_S, "rate_limit_per_s": RATE, "rate_limit_burst": BURST,
              "request_timeout_s": TIMEOUT_S, "max_request_pixels": 1_500_000}  # max_pixels: 1 MP per image


def _keys_text(*extra: str) -> str:
    return "\n".join(["# test keys", KEY, f"sha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}", *extra]) + "\n"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(_keys_text())
    return path


@pytest.fixture(scope="module")
def guarded(ray_session, fmnist_checkpoint, keys_file):
    args = {**TEST_ARGS, **GUARD_ARGS, "checkpoint": str(fmnist_checkpoint), "api_keys_file": str(keys_file)}
    with serving(args, name=APP) as url:
        yield url


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _ingress_ongoing_requests() -> int:
    """Requests the ingress replica holds now, as its Serve replica actor counts them (the replica actors'
    names are Ray Serve's own convention)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP}#CFViTIngress#")]
    assert len(names) == 1, names
    return ray.get(ray.get_actor(names[0], namespace="serve").get_num_ongoing_requests.remote())


def _image(fmt: str, size=(28, 28)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- keys
def test_v1_routes_need_a_key_and_the_rest_stays_open(guarded):
    for path in ("/v1/model", "/v1/samples"):
        r = httpx.get(guarded + path)
        assert r.status_code == 401 and r.json() == {"error": "missing API key",
                                                     "detail": "send the header Authorization: Bearer KEY"}
        assert r.headers["www-authenticate"] == 'Bearer realm="cfvit"'
    for headers in (auth("tests-key-x-0123456789abcdef"), {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY},
                    auth(hashlib.sha256(HASHED_KEY.encode()).hexdigest())):  # the digest is not the key
        r = httpx.post(guarded + "/v1/classify", content=png(np.zeros((28, 28), np.uint8)), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Bearer realm="cfvit"'), headers
    for key in (KEY, HASHED_KEY):
        assert httpx.get(guarded + "/v1/model", headers=auth(key)).status_code == 200
        r = httpx.post(guarded + "/v1/classify", content=png(np.zeros((28, 28), np.uint8)),
                       headers={**auth(key), "content-type": "image/png"})
        assert r.status_code == 200 and "label" in r.json()
    for path in ("/", "/healthz", "/docs", "/openapi.json"):
        assert httpx.get(guarded + path).status_code == 200, path
    spec = httpx.get(guarded + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKey"] == {
        "type": "http", "scheme": "bearer", "description": "an API key from the server's api_keys_file"}
    assert spec["paths"]["/v1/classify"]["post"]["security"] == [{"APIKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert proxy_host() == "127.0.0.1"  # what the ingress reads to decide whether to warn of an open endpoint


def test_a_key_added_or_revoked_in_the_file_takes_effect_within_the_reload_interval(guarded, keys_file):
    added = "tests-key-c-0123456789abcdef"
    try:
        keys_file.write_text(_keys_text(added).replace(KEY + "\n", ""))  # add c, revoke a
        t0 = time.monotonic()
        while httpx.get(guarded + "/v1/model", headers=auth(added)).status_code != 200:
            assert time.monotonic() - t0 < RELOAD_S + 2, "the added key was not taken"
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert httpx.get(guarded + "/v1/model", headers=auth(KEY)).status_code == 401  # revoked with the same read
        assert took <= RELOAD_S + 1.0, took
    finally:
        keys_file.write_text(_keys_text())
        time.sleep(RELOAD_S + 0.2)
        t0 = time.monotonic()
        while httpx.get(guarded + "/v1/model", headers=auth(KEY)).status_code != 200:
            assert time.monotonic() - t0 < 5
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- rate limit
def test_over_the_rate_limit_a_key_gets_429_with_retry_after_and_other_keys_do_not(guarded):
    time.sleep(BURST / RATE)  # earlier tests' requests refilled
    codes, last_429 = [], None
    t0 = time.monotonic()
    with httpx.Client(base_url=guarded, headers=auth(HASHED_KEY), timeout=30) as c:
        while len(codes) < 400 and 429 not in codes[-5:]:
            r = c.get("/v1/samples")
            codes.append(r.status_code)
            last_429 = r if r.status_code == 429 else last_429
    elapsed = time.monotonic() - t0
    assert set(codes) == {200, 429}, codes
    ok = codes.count(200)
    assert BURST <= ok <= BURST + RATE * elapsed + 1, (ok, elapsed)  # the bucket: a burst, then the rate
    body = last_429.json()
    assert body["error"] == "rate limit exceeded" and body["detail"]["limit_per_s"] == RATE
    retry = int(last_429.headers["retry-after"])
    assert retry >= 1 and last_429.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(guarded + "/v1/model", headers=auth(KEY)).status_code == 200  # a bucket per key
    assert httpx.get(guarded + "/healthz").status_code == 200  # probes are never limited
    time.sleep(retry)
    assert httpx.get(guarded + "/v1/samples", headers=auth(HASHED_KEY)).status_code == 200


# ---------------------------------------------------------------------------------------------- timeouts
def _trickle(url: str, extra_headers: bytes = b"") -> dict:
    """POST a 1000-byte body one byte a second until an answer comes; the answer, when it came (s), and
    when the server closed the connection (None: still open 1.5 s after the answer)."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n"
              + f"Authorization: Bearer {KEY}\r\n".encode() + extra_headers + b"\r\n")
    s.settimeout(0.25)
    t0, got, answered, closed = time.monotonic(), b"", None, None
    try:
        while closed is None and time.monotonic() - t0 < (TIMEOUT_S + 6 if answered is None else answered + 1.5):
            if answered is None:
                s.sendall(b"x")
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                chunk = None
            if chunk == b"":
                closed = time.monotonic() - t0
            elif chunk:
                got += chunk
                if answered is None and b"\r\n\r\n" in got:
                    answered = time.monotonic() - t0
            if closed is None and answered is None:
                time.sleep(0.75)
    except OSError:  # reset while still sending: closed by the server
        closed = time.monotonic() - t0
    finally:
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head else None
    return {"status": status, "answered": answered, "closed": closed, "body": body}


def test_a_trickling_body_gets_408_within_the_timeout_and_holds_no_replica(guarded):
    """Three clients trickle 1 byte/s: one plain, one asking for no timeout (Ray's header, 0), one for 600 s.
    All three get the server's 408 within its timeout, the connections are closed, and the ingress replica
    holds none of them afterwards; a client asking for 1 s gets its 408 after about 1 s."""
    headers = [b"", b"x-request-timeout-seconds: 0\r\n", b"x-request-timeout-seconds: 600\r\n"]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_trickle, guarded, h) for h in headers]
        time.sleep(TIMEOUT_S / 2)
        during = _ingress_ongoing_requests()
        results = [f.result() for f in futures]
    assert during == 3, during
    for h, r in zip(headers, results):
        assert r["status"] == 408, (h, r)
        assert TIMEOUT_S - 0.5 <= r["answered"] <= TIMEOUT_S + 1.5, (h, r)
        assert b'"error": "request timeout"' in r["body"] and r["closed"] is not None, (h, r)
    assert _ingress_ongoing_requests() == 0
    shorter = _trickle(guarded, b"x-request-timeout-seconds: 1\r\n")
    assert shorter["status"] == 408 and shorter["answered"] <= 2.0, shorter
    assert _ingress_ongoing_requests() == 0
    assert httpx.get(guarded + "/v1/model", headers=auth()).status_code == 200


# ---------------------------------------------------------------------------------------------- input budget
def _post(url: str, key: str = KEY, **kwargs) -> httpx.Response:
    headers = {**auth(key), **kwargs.pop("headers", {})}
    return httpx.post(url + "/v1/classify", headers=headers, timeout=60, **kwargs)


def test_pixel_budget_per_request_is_checked_from_the_headers_before_any_decode(guarded):
    big = png(np.zeros((800, 800), np.uint8))  # 0.64 MP: under the 1 MP per image; 3 of them pass 1.5 MP
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    r = _post(guarded, json={"images": [b64(big)] * 2})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    r = _post(guarded, json={"images": [b64(big)] * 3})
    assert r.status_code == 413 and r.json() == {"error": "too many pixels in the request", "detail": {
        "index": 2, "pixels_so_far": 3 * 640_000, "max_request_pixels": 1_500_000}}
    r = _post(guarded, files=[("file", ("a.png", big, "image/png"))] * 3)
    assert r.status_code == 413 and r.json()["error"] == "too many pixels in the request"
    # Only the files' headers: decoding them would be a 400 (truncated), yet the budget answers first.
    head = big[:100]
    assert _post(guarded, json={"images": [b64(head)] * 3}).status_code == 413
    r = _post(guarded, json={"images": [b64(head)] * 2})
    assert r.status_code == 400 and r.json()["error"] == "invalid image"


def test_only_png_jpeg_and_webp_are_decoded(guarded):
    for fmt in ("PNG", "JPEG", "WEBP"):
        r = _post(guarded, content=_image(fmt), headers={"content-type": f"image/{fmt.lower()}"})
        assert r.status_code == 200, (fmt, r.text)
    for fmt in ("GIF", "BMP", "TIFF", "ICO", "PPM"):
        for kwargs in (dict(content=_image(fmt), headers={"content-type": "image/png"}),
                       dict(json={"images": [base64.b64encode(_image(fmt)).decode()]})):
            r = _post(guarded, **kwargs)
            assert r.status_code == 415 and r.json()["error"] == "unsupported image format", (fmt, r.text)
            assert r.json()["detail"]["format"] == fmt and "WEBP" in r.json()["detail"]["accepted"]


NESTED_JSON = {
    "100,000-deep list": b"[" * 100_000,
    "100,000-deep list, closed": b"[" * 100_000 + b"]" * 100_000,
    "100,000-deep object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "images nested 100,000 deep": b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "eta of 5,000 digits": b'{"images": ["AA=="], "eta": ' + b"9" * 5000 + b"}",
}


def test_nested_or_oversized_json_is_a_400(guarded):
    for name, body in NESTED_JSON.items():
        r = _post(guarded, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "malformed JSON", (name, r.status_code, r.text[:200])


# ---------------------------------------------------------------------------------------------- headers, page
def test_every_answer_has_nosniff_and_the_page_a_strict_csp(guarded):
    page = httpx.get(guarded + "/")
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert csp["img-src"] == "'self' data: blob:" and csp["connect-src"] == "'self'"
    assert "unsafe" not in page.headers["content-security-policy"]
    for r in (page, httpx.get(guarded + "/healthz"), httpx.get(guarded + "/v1/model"),
              httpx.get(guarded + "/v1/model", headers=auth()), httpx.get(guarded + "/nothing")):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", r.url


@needs_chromium
def test_page_asks_for_the_key_then_classifies_with_it(guarded):
    """Without a key the page says it needs one; with the key handed over in the address's fragment it
    lists the samples and classifies one, and the CSP blocks nothing the page does."""
    out = chromium(guarded + "/", "--dump-dom", "--enable-logging=stderr", "--v=0")
    assert 'data-state="error"' in out.stdout and "this server needs an API key" in out.stdout, out.stdout[-2000:]
    out = chromium(guarded + f"/?sample=1&eta=1.0001#key={KEY}", "--dump-dom", "--enable-logging=stderr", "--v=0")
    assert 'data-state="done"' in out.stdout, (out.stderr[-2000:], out.stdout[-3000:])
    assert '<span id="stage" class="badge fine">fine</span>' in out.stdout
    assert out.stdout.count("<button data-index=") == 10  # the samples, fetched with the key
    assert "Content Security Policy" not in out.stderr, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- contract
def test_openapi_contract_with_a_key_holds_under_schemathesis(guarded, tmp_path):
    """`schemathesis run --checks all` with the key against the authenticated API finds nothing: the
    documented schemas, bounds, examples, `Allow` on 405s, and (`ignored_auth`) that every `/v1` operation
    refuses requests without a valid key. It sends at most 15 requests a second, under the server's limit."""
    cli = Path(sys.executable).with_name("schemathesis")
    config = Path(__file__).with_name("schemathesis.toml")
    proc = run([str(cli), "--config-file", str(config), "run", guarded + "/openapi.json", "--checks", "all",
                "-H", f"Authorization: Bearer {KEY}", "--rate-limit", f"{int(RATE * 0.75)}/s",
                "--max-examples", "40", "--seed", "7", "--no-color", "--generation-database", "none"],
               timeout=300, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "No issues found" in proc.stdout and "4 selected / 4 total" in proc.stdout


# ---------------------------------------------------------------------------------------------- nothing crashed
def _ingress_log() -> str:
    import ray

    # Ray keeps each replica's log under its session's logs folder; the path has no public getter.
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    files = sorted(logs.glob(f"replica_{APP}_CFViTIngress_*.log"))
    assert files, sorted(p.name for p in logs.iterdir())
    return "".join(p.read_text(errors="replace") for p in files)


def test_no_client_mistake_left_a_traceback_and_the_service_is_up(guarded):
    from ray import serve

    log = _ingress_log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    app = serve.status().applications[APP]
    assert app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())
    assert httpx.get(guarded + "/v1/model", headers=auth()).status_code == 200
