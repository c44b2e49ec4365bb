"""The ingress's front door, an ASGI middleware in front of every route: API keys, a rate limit per key,
a deadline on every request, and the security headers of the page at `/`.

- **Keys** (`api_keys_file`): every `/v1/…` route needs `Authorization: Bearer KEY` (401 with
  `WWW-Authenticate` otherwise); `/`, `/healthz` and the API docs stay open. The file holds one key per
  line, or `sha256:HEX` (the key's SHA-256), so it need hold no secret; `#` starts a comment. It is
  re-read when it changes (checked at most every `keys_reload_s`, on the next request): a key added or
  revoked takes effect within that many seconds of the file changing. Presented keys are hashed and
  compared with every stored digest in constant time.
- **Rate limit** (`rate_limit_per_s`, `rate_limit_burst`): a token bucket per key (per client address
  when keys are off) on `/v1/…`; over it → 429 with `Retry-After`. The buckets live in each ingress
  replica: with N ingress replicas a client can get up to N × the rate (docs/SECURITY.md).
- **Deadline** (`request_timeout_s`): a request that has not been answered within it (a body trickling
  in, a queue) gets 408 and its work is cancelled. Ray's proxy lets a client set its own timeout with the
  `x-request-timeout-seconds` header (0 turning it off); here that header can shorten the deadline, never
  lengthen it.

One ingress replica is one process, so the middleware finds its settings in this module (`install`,
called from the ingress's constructor): the FastAPI app Serve runs is a frozen copy made when the
ingress class is defined, before any settings exist.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ray.serve.context import _get_global_client

from .request_path import LOOPBACK_HOSTS
from .settings import AppArgs

logger = logging.getLogger("ray.serve")

PROTECTED_PREFIX = "/v1/"
CLIENT_TIMEOUT_HEADER = b"x-request-timeout-seconds"  # Ray Serve's per-request timeout header
MIN_KEY_CHARS = 16  # a key shorter than this is refused when the file is read
MAX_BUCKETS = 100_000  # rate-limit buckets kept (least recently used dropped: it refills to full)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
REALM = 'Bearer realm="cfvit"'
COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                  (b"referrer-policy", b"no-referrer")]


class KeyFileError(ValueError):
    """An API keys file that cannot be used; the message names the line, never the key."""


# ---------------------------------------------------------------------------------------------- API keys
def parse_keys(text: str, source: str = "the API keys file") -> List[bytes]:
    """SHA-256 digests of the keys in a keys file: `sha256:HEX` lines as given, other lines hashed."""
    digests = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("sha256:"):
            hexdigest = line[len("sha256:"):].strip().lower()
            if not _HEX64.fullmatch(hexdigest):
                raise KeyFileError(f"{source}, line {n}: `sha256:` must be followed by 64 hex digits")
            digests.append(bytes.fromhex(hexdigest))
        elif not _KEY_CHARS.fullmatch(line):
            raise KeyFileError(f"{source}, line {n}: a key is printable ASCII without spaces")
        elif len(line) < MIN_KEY_CHARS:
            raise KeyFileError(f"{source}, line {n}: a key needs at least {MIN_KEY_CHARS} characters "
                               f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        else:
            digests.append(hashlib.sha256(line.encode()).digest())
    return digests


def read_keys(path: str) -> List[bytes]:
    try:
        with open(path, encoding="utf-8") as f:
            return parse_keys(f.read(), path)
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the API keys file {path}: {e}") from None


class KeyStore:
    """The keys of `path`, re-read when the file changes (checked at most every `reload_s`)."""

    def __init__(self, path: str, reload_s: float):
        self.path, self.reload_s = path, reload_s
        self._stamp = self._file_stamp()
        self.digests = read_keys(path)  # a bad or missing file stops the replica from starting
        self._checked = time.monotonic()

    def _file_stamp(self) -> Optional[Tuple[int, int, int]]:
        try:
            st = os.stat(self.path)  # follows symlinks: a Kubernetes Secret swaps a `..data` link
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            digests = read_keys(self.path)
        except KeyFileError as e:  # keep serving the last good keys; say why the new file was not taken
            logger.warning("API keys not reloaded, the previous %d key(s) stay in force: %s", len(self.digests), e)
            self._stamp = stamp
            return
        self._stamp, self.digests = stamp, digests
        logger.info("API keys reloaded from %s: %d key(s)", self.path, len(digests))

    def match(self, key: str) -> Optional[str]:
        """The key's id (a prefix of its digest: for rate limits, never logged with the key) or None."""
        self.refresh()
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = False
        for d in self.digests:  # every digest compared: the time does not depend on which one matched
            found |= hmac.compare_digest(presented, d)
        return presented.hex()[:16] if found else None


def bearer_token(headers: Dict[bytes, bytes]) -> Optional[str]:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


# ---------------------------------------------------------------------------------------------- rate limit
class RateLimiter:
    """Token buckets: `burst` requests at once, refilled at `rate` per second, one bucket per client."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, Tuple[float, float]] = OrderedDict()  # client → (tokens, at)

    def take(self, client: str, now: Optional[float] = None) -> float:
        """0 when the request may go ahead (a token taken), else the seconds until a token is back."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return wait


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Guard:
    keys: Optional[KeyStore]
    limiter: Optional[RateLimiter]
    timeout_s: float

    @classmethod
    def from_args(cls, args: AppArgs) -> "Guard":
        keys = KeyStore(args.api_keys_file, args.keys_reload_s) if args.api_keys_file else None
        limiter = None
        if args.rate_limit_per_s:
            burst = args.rate_limit_burst or max(1, math.ceil(args.rate_limit_per_s))  # default: one second's worth
            limiter = RateLimiter(args.rate_limit_per_s, burst)
        return cls(keys, limiter, args.request_timeout_s)

    def deadline(self, headers: Dict[bytes, bytes]) -> float:
        """The server's deadline, or the client's own when it is shorter (never longer)."""
        try:
            asked = float(headers.get(CLIENT_TIMEOUT_HEADER, b"").decode("latin-1"))
        except ValueError:
            return self.timeout_s
        return asked if 0 < asked < self.timeout_s else self.timeout_s


_ACTIVE: Optional[Guard] = None


def install(args: AppArgs) -> Guard:
    """Configure this process's guard from the application's arguments (the ingress constructor calls it)."""
    global _ACTIVE
    _ACTIVE = Guard.from_args(args)
    return _ACTIVE


def proxy_host() -> Optional[str]:
    """The host Serve's HTTP proxies listen on, or None when it cannot be read."""
    try:  # Ray has no public getter of a running instance's HTTP options: its controller client has them
        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - only for a warning; None says "unknown"
        return None


def open_endpoint_warning(host: Optional[str], args: AppArgs, haproxy_ports_open: bool = False) -> Optional[str]:
    """What to say when the endpoint answers anyone: no keys and an HTTP host other than loopback, or
    HAProxy's stats and metrics ports open on every interface (`haproxy_ports_open`: the haproxy request path)."""
    if args.api_keys_file:
        return None
    if haproxy_ports_open:
        return ("the haproxy request path opens HAProxy's stats and metrics ports on every interface (Ray's "
                "template), whatever --host says, and no api_keys_file is set: on a shared machine prefer "
                "--request-path default, or set api_keys_file (cfvit serve --api-keys-file).")
    if host in LOOPBACK_HOSTS:
        return None
    where = f"HTTP host {host}" if host else "an HTTP host this replica cannot read"
    return (f"the endpoint is OPEN: no api_keys_file and {where}; anyone who reaches the port can call "
            f"/v1/classify. Set api_keys_file (cfvit serve --api-keys-file) to require keys.")


# ---------------------------------------------------------------------------------------------- the page
def page_headers(html: str) -> Dict[str, str]:
    """The page's Content-Security-Policy: only its own inline script and style (by hash), images from
    itself, `data:` and `blob:`, requests to itself, and no framing."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    csp = (f"default-src 'self'; script-src 'self' {hashes('script')}; style-src 'self' {hashes('style')}; "
           "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
           "form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp}


# ---------------------------------------------------------------------------------------------- OpenAPI
def _document(schema: Dict[str, Any], guard: Guard) -> None:
    """Declare in the served OpenAPI document what the guard answers: 408 everywhere; on `/v1/…` the
    bearer scheme and 401 when keys are on, 429 when a rate limit is."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    if guard.keys is not None:
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["APIKey"] = {
            "type": "http", "scheme": "bearer", "description": "an API key from the server's api_keys_file"}
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.setdefault("408", {"description": "not answered within the request timeout", "content": error})
            if not path.startswith(PROTECTED_PREFIX):
                continue
            if guard.keys is not None:
                op["security"] = [{"APIKey": []}]
                responses.setdefault("401", {"description": "missing or unknown API key", "content": error,
                                             "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}})
            if guard.limiter is not None:
                responses.setdefault("429", {"description": "over the rate limit", "content": error,
                                             "headers": {"Retry-After": {"schema": {"type": "integer"}}}})


# ---------------------------------------------------------------------------------------------- admission
@dataclass(frozen=True)
class Refusal:
    """Why a request may not go on: the HTTP status, error, detail and headers of the answer (the gRPC
    ingress maps them to a status code, serve/grpc_api.py)."""

    status: int
    error: str
    detail: Any = None
    headers: Tuple[Tuple[bytes, bytes], ...] = ()


def admit(guard: Guard, headers: Dict[bytes, bytes], client_address: str) -> Optional[Refusal]:
    """The key and rate-limit checks of a `/v1/` request, whatever its transport: None when it may go on.
    `headers`: lower-case names (HTTP headers or gRPC metadata); `client_address`: the rate-limit bucket
    when keys are off."""
    client = None
    if guard.keys is not None:
        token = bearer_token(headers)
        client = guard.keys.match(token) if token else None
        if client is None:
            error = "missing API key" if token is None else "unknown API key"
            challenge = REALM if token is None else REALM + ', error="invalid_token"'
            return Refusal(401, error, "send the header Authorization: Bearer KEY",
                           ((b"www-authenticate", challenge.encode()),))
    if guard.limiter is not None:
        wait = guard.limiter.take(client or "addr:" + client_address)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            return Refusal(429, "rate limit exceeded",
                           {"limit_per_s": guard.limiter.rate, "burst": guard.limiter.burst, "retry_after_s": retry},
                           ((b"retry-after", str(retry).encode()),))
    return None


def active_guard() -> Optional[Guard]:
    """This process's guard (None before the ingress installed it)."""
    return _ACTIVE


# ---------------------------------------------------------------------------------------------- middleware
async def _answer(send, status: int, error: str, detail: Any = None, headers: Tuple = ()) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Keys, rate limit and deadline before the app; the common security headers on every answer."""

    def __init__(self, app):
        self.app = app
        self._documented = False

    async def __call__(self, scope, receive, send):
        guard = _ACTIVE
        if scope["type"] != "http" or guard is None:
            await self.app(scope, receive, send)
            return
        if not self._documented:
            self._document(scope, guard)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *COMMON_HEADERS]}
            await send(message)

        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path.startswith(PROTECTED_PREFIX) and not await self._admit(guard, scope, headers, send_with_headers):
            return
        timeout = guard.deadline(headers)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await self.app(scope, receive, send_with_headers)
        except TimeoutError:
            if not deadline.expired():
                raise  # the app's own TimeoutError: not ours to answer
            if not started:  # the work is cancelled; the client learns why
                await _answer(send_with_headers, 408, "request timeout",
                              {"timeout_s": timeout, "message": "not answered (or the body not received) in time"},
                              ((b"connection", b"close"),))

    async def _admit(self, guard: Guard, scope, headers, send) -> bool:
        """Answer 401 / 429 and return False when the request may not go on."""
        refusal = admit(guard, headers, str((scope.get("client") or ("unknown",))[0]))
        if refusal is None:
            return True
        await _answer(send, refusal.status, refusal.error, refusal.detail, refusal.headers)
        return False

    def _document(self, scope, guard: Guard) -> None:
        app = scope.get("app")
        if app is not None and hasattr(app, "openapi"):
            _document(app.openapi(), guard)  # FastAPI caches the document: amended once, in place
        self._documented = True
