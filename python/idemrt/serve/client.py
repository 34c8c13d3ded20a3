"""A small HTTP client of the decode service (standard library only)."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional

from ..errors import IdemrtError


class ServiceError(IdemrtError):
    """The service answered with a problem+json body (``status``, ``kind``, ``detail``)."""

    def __init__(self, status: int, problem: dict, retry_after: Optional[str] = None):
        self.status, self.problem, self.retry_after = status, problem, retry_after
        self.kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
        super().__init__(f"HTTP {status} {problem.get('title', '')}: {problem.get('detail', problem)}")


@dataclass
class DecodeResult:
    image: bytes  # PNG or WEBP
    seconds: float
    steps: int
    distance: float
    replica: str
    symbols_equal: float = 0.0  # fraction of latent symbols the image re-encodes to (1: idempotent)


class Client:
    """``Client("http://127.0.0.1:8000").decode(data)`` -> :class:`DecodeResult`."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def decode(self, data: bytes, *, mode: str = "perceptual", seed: int = 0, steps: Optional[str] = None,
               format: str = "png", speed: Optional[str] = None, priority: Optional[int] = None,
               timeout: Optional[float] = None, prior: Optional[str] = None) -> DecodeResult:
        """One decode (the parameters of ``POST /v1/decode``; None: the server's default; ``prior``:
        a prior's id, on a server of a model store)."""
        query = _query(mode=mode, seed=seed, steps=steps, format=format, speed=speed, priority=priority,
                       timeout=timeout, prior=prior)
        with self._post("/v1/decode", data, query) as r:
            h = r.headers
            return DecodeResult(r.read(), float(h["X-Idemrt-Decode-Seconds"]), int(h["X-Idemrt-Steps"]),
                                float(h["X-Idemrt-Distance"]), h.get("X-Idemrt-Replica", ""),
                                float(h.get("X-Idemrt-Symbols-Equal", 0.0)))

    def decode_stream(self, data: bytes, *, mode: str = "perceptual", seed: int = 0, steps: Optional[str] = None,
                      format: str = "png", speed: Optional[str] = None, priority: Optional[int] = None,
                      timeout: Optional[float] = None) -> Iterator[dict]:
        """Server-sent events as dicts (progress, preview, result; images base64-decoded to bytes).
        An error event raises :class:`ServiceError`."""
        query = _query(mode=mode, seed=seed, steps=steps, format=format, speed=speed, priority=priority,
                       timeout=timeout, stream=1)
        with self._post("/v1/decode", data, query) as r:
            for line in r:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event["event"] == "error":
                    raise ServiceError(event["status"], event)
                if "image" in event:
                    event["image"] = base64.b64decode(event["image"])
                yield event

    def encode(self, image: bytes) -> bytes:
        with self._post("/v1/encode", image, "") as r:
            return r.read()

    def get(self, path: str):
        """GET a JSON (or, for /metrics, text) endpoint."""
        with self._open(urllib.request.Request(self.url + path)) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()

    def _post(self, path: str, body: bytes, query: str):
        return self._open(urllib.request.Request(f"{self.url}{path}{'?' + query if query else ''}", data=body,
                                                 method="POST", headers={"Content-Type": "application/octet-stream"}))

    def _open(self, request):
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                problem = json.loads(body)
            except ValueError:
                problem = {"detail": body.decode(errors="replace")}
            raise ServiceError(exc.code, problem, exc.headers.get("Retry-After")) from None


def _query(**params) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
