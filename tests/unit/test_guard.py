"""The endpoint's front door without Ray: keys files, token buckets, deadlines, the page's CSP, the input
budget and JSON limits; the middleware itself through a real ASGI app (httpx's ASGI transport)."""
import asyncio
import base64
import hashlib
import io
import os
import re
import time

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from serve import guard
from serve.guard import Guard, GuardMiddleware, KeyFileError, KeyStore, RateLimiter, open_endpoint_warning, parse_keys
from serve.inputs import APIError, image_sizes, parse_json_body
from serve.settings import AppArgs

KEY = "test-key-0123456789abcdef"


def _image(fmt: str, size=(8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, format=fmt)
    return out.getvalue()


def test_keys_file_takes_keys_and_their_digests_and_names_bad_lines_without_the_key():
    digest = hashlib.sha256(b"another-key-0123456789").hexdigest()
    keys = parse_keys(f"# comment\n\n  {KEY}  \nsha256:{digest.upper()}\n")
    assert keys == [hashlib.sha256(KEY.encode()).digest(), bytes.fromhex(digest)]
    for text, where in (("short-secret\n", "line 1"), (f"\n{KEY} x\n", "line 2"), ("sha256:abc\n", "line 1")):
        with pytest.raises(KeyFileError, match=where) as e:
            parse_keys(text)
        assert "short-secret" not in str(e.value) and KEY not in str(e.value)
    assert parse_keys("# nothing yet\n") == []  # keys on, none valid: every /v1 request refused


def test_key_store_rereads_a_changed_file_and_keeps_the_last_good_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    store = KeyStore(str(path), reload_s=0.2)
    assert store.match(KEY) == hashlib.sha256(KEY.encode()).hexdigest()[:16]
    assert store.match("x" * 30) is None and store.match("") is None
    new = "rotated-key-0123456789abc"
    tmp = tmp_path / "keys.new"  # replaced the way a Kubernetes Secret volume swaps its files
    tmp.write_text(f"sha256:{hashlib.sha256(new.encode()).hexdigest()}\n")
    os.replace(tmp, path)
    assert store.match(new) is None  # not before reload_s has passed
    time.sleep(0.25)
    assert store.match(new) and store.match(KEY) is None
    path.write_text("too-short\n")  # a broken file: the previous keys stay
    time.sleep(0.25)
    assert store.match(new)
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore(str(tmp_path / "missing"), 1.0)


def test_token_bucket_allows_a_burst_then_the_rate():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("a", now=10.0) for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a", now=10.0) == pytest.approx(0.5)
    assert limiter.take("b", now=10.0) == 0  # one bucket per client
    assert limiter.take("a", now=10.5) == 0 and limiter.take("a", now=10.5) > 0
    assert [limiter.take("a", now=100.0) for _ in range(4)].count(0) == 3  # refills to the burst, no more


def test_a_client_timeout_header_only_shortens_the_deadline():
    g = Guard(None, None, 30.0)
    header = guard.CLIENT_TIMEOUT_HEADER
    assert g.deadline({}) == 30.0
    assert g.deadline({header: b"5"}) == 5.0
    for value in (b"0", b"-1", b"600", b"inf", b"nan", b"abc"):
        assert g.deadline({header: value}) == 30.0, value


def test_open_endpoint_warning_only_off_loopback_without_keys():
    args = AppArgs(checkpoint="x")
    assert open_endpoint_warning("127.0.0.1", args) is None
    assert "OPEN" in open_endpoint_warning("0.0.0.0", args)
    assert open_endpoint_warning(None, args)  # unknown host: say so
    assert open_endpoint_warning("0.0.0.0", AppArgs(checkpoint="x", api_keys_file="/k")) is None
    # with HAProxy its stats and metrics ports listen on every interface, even for a loopback HTTP host
    assert "stats and metrics ports" in open_endpoint_warning("127.0.0.1", args, haproxy_ports_open=True)
    assert open_endpoint_warning("127.0.0.1", AppArgs(checkpoint="x", api_keys_file="/k"), haproxy_ports_open=True) is None


def test_page_csp_names_the_pages_own_inline_script_and_style():
    from serve.app import STATIC

    html = (STATIC / "index.html").read_text()
    csp = guard.page_headers(html)["Content-Security-Policy"]
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}'" in csp
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "img-src 'self' data: blob:" in csp
    assert "unsafe-inline" not in csp and " style=" not in html  # no inline style attributes for the CSP to block


def test_pixel_budget_and_format_allow_list_from_headers_alone():
    png = _image("PNG", (800, 800))
    head = png[:100]  # the header only: what decoding would refuse as truncated
    assert image_sizes([png, png], 1_000_000, 1_300_000) == [(800, 800)] * 2
    with pytest.raises(APIError) as e:
        image_sizes([head, head, head], 1_000_000, 1_300_000)
    assert e.value.status == 413 and e.value.detail["index"] == 2
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(APIError) as e:
            image_sizes([_image(fmt)], 10**6, 10**6)
        assert (e.value.status, e.value.detail["format"]) == (415, fmt)
    assert image_sizes([_image("WEBP"), _image("JPEG")], 10**6, 10**6) == [(8, 6)] * 2
    assert image_sizes([b"not an image"], 10**6, 10**6) == [(0, 0)]  # decoding answers 400 with the reason


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"images": ' + b"[" * 50_000, b'{"eta": ' + b"9" * 5000 + b"}"],
                         ids=["deep list", "deep images", "5000-digit number"])
def test_nested_or_oversized_json_is_a_400(body):
    with pytest.raises(APIError) as e:
        parse_json_body(body, 32)
    assert e.value.status == 400 and e.value.error == "malformed JSON"


def _guarded_app(tmp_path, **settings) -> httpx.AsyncClient:
    """A FastAPI app behind the middleware, with the process's guard installed from `settings`."""
    app = FastAPI()
    app.add_middleware(GuardMiddleware)

    @app.get("/v1/echo")
    async def echo():
        return {"ok": True}

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/slow")
    async def slow():
        await asyncio.sleep(5)

    guard.install(AppArgs(checkpoint="x", **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 1234)),
                             base_url="http://t")


def test_middleware_keys_rate_limit_per_address_deadline_and_openapi(tmp_path):
    (tmp_path / "keys").write_text(KEY + "\n")

    async def run():
        async with _guarded_app(tmp_path, api_keys_file=str(tmp_path / "keys"), rate_limit_per_s=1,
                                rate_limit_burst=2, request_timeout_s=0.3) as c:
            assert (await c.get("/healthz")).status_code == 200
            r = await c.get("/v1/echo")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["x-content-type-options"] == "nosniff"
            auth = {"Authorization": f"Bearer {KEY}"}
            codes = [(await c.get("/v1/echo", headers=auth)).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
            spec = (await c.get("/openapi.json")).json()
            assert spec["paths"]["/v1/echo"]["get"]["security"] == [{"APIKey": []}]
            assert {"401", "408", "429"} <= set(spec["paths"]["/v1/echo"]["get"]["responses"])
            assert "security" not in spec["paths"]["/healthz"]["get"]

        async with _guarded_app(tmp_path, rate_limit_per_s=1, rate_limit_burst=1, request_timeout_s=0.3) as c:
            assert [(await c.get("/v1/echo")).status_code for _ in range(2)] == [200, 429]  # keyed on the address
            await asyncio.sleep(1.0)
            t = time.perf_counter()
            r = await c.get("/v1/slow", headers={"x-request-timeout-seconds": "100"})
            assert r.status_code == 408 and r.json()["detail"]["timeout_s"] == 0.3
            assert time.perf_counter() - t < 1.0

    try:
        asyncio.run(run())
    finally:
        guard.install(AppArgs(checkpoint="x"))


def test_cfvit_serve_refuses_a_bad_keys_file_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from cfvit_cli import app

    (tmp_path / "keys").write_text("short\n")
    out = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path), "--api-keys-file", str(tmp_path / "keys")])
    assert out.exit_code == 2 and "line 1: a key needs at least 16 characters" in out.output
    out = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path), "--api-keys-file", str(tmp_path / "none")])
    assert out.exit_code == 2 and "cannot read the API keys file" in out.output
