"""An S3 server with latency and faults, for tests and ``bench feed``: moto behind a WSGI wrapper.

    with LatencyS3(latency_ms=30) as s3:          # 127.0.0.1, a free port, one thread per request
        os.environ.update(s3.env)                 # AWS_ENDPOINT_URL and test credentials
        ...                                       # any S3 client (pyarrow, DALI, boto3)
        s3.counts()                               # {"GET": 12, "HEAD": 3, "PUT": 0, "LIST": 1, ...}
        s3.set_faults(Faults(slowdown_every=5, cut_every=7, suffix=".tar"))

Each GET of an object (a whole object or a ``Range``) waits ``latency_ms`` before moto answers,
as S3 Standard's time to first byte does for small objects; other requests are answered at
once. This machine's kernel has no ``netem``, so the delay is put in the server. Requests are
counted by kind: ``GET`` (object reads), ``HEAD``, ``PUT`` (object writes and multipart parts),
``LIST`` (bucket listings), ``OTHER``; GETs again by the key's extension (``GET.tar``,
``GET.JPEG``, ``GET.gz``: data GETs apart from the manifest's); the bytes the GETs
returned (``get_bytes``); and the most object GETs answered at once (``most_gets_at_once``,
from a GET's arrival until its body is sent).

Faults (``Faults``; none by default) make the server behave as S3 does under load, on the
object GETs whose key ends with ``suffix``, numbered 1, 2, ... in the order they arrive: every
Nth answered ``503 SlowDown`` (S3's XML error body), every Nth cut mid-body (half the body
sent, then the connection closed), every Nth stalled (no byte for ``stall_s``, then answered;
a cut or a stall that falls on a refused GET goes to the next one, so each keeps its rate),
a storm (every GET refused with 503 SlowDown for ``storm_s`` seconds from the ``storm_from``-th
on: a prefix that S3 is scaling), keys answered ``403 AccessDenied``, and bandwidth caps, per
connection and over all connections together (a node's link, or what the bucket gives a
cluster). Each fault is counted: ``refused``, ``cut``, ``stalled``, ``denied``.

    python -m pipeline.bench.s3_latency --latency-ms 30 --port 5123 [--slowdown-every 10 ...]

``LatencyS3(..., own_process=True)`` runs it so (what ``bench feed`` does: moto answering in
the measured process would compete with it for the GIL); the counters are then read over HTTP
at ``/__latency/counts`` (and zeroed at ``/__latency/reset``), and ``set_faults`` goes to
``/__latency/faults?slowdown_every=10&...`` (Faults' fields): paths no S3 client uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

BUCKET_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
SEND_CHUNK = 64 * 1024  # what a capped connection sends between its pauses


@dataclasses.dataclass(frozen=True)
class Faults:
    """What goes wrong with the object GETs whose key ends with ``suffix`` (0: never)."""

    slowdown_every: int = 0  # every Nth GET answered 503 SlowDown
    cut_every: int = 0  # every Nth GET cut after half its body
    stall_every: int = 0  # every Nth GET sends nothing for stall_s, then answers
    stall_s: float = 5.0
    storm_from: int = 1  # the storm starts at this GET...
    storm_s: float = 0.0  # ...and refuses every GET for this many seconds
    deny: str = ""  # keys ending with this are answered 403 AccessDenied
    bandwidth_mbps: float = 0.0  # megabits per second per connection
    total_bandwidth_mbps: float = 0.0  # megabits per second over every connection together
    suffix: str = ""  # "" : every object GET

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their defaults."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        }

    def to_args(self) -> list[str]:
        """The command-line flags of ``main`` that give these faults."""
        return [
            a for name, value in self.changed().items() for a in (f"--{name.replace('_', '-')}", str(value))
        ]

    @classmethod
    def from_query(cls, query: str) -> Faults:
        """Faults from a query string of their fields (``set_faults`` over HTTP)."""
        from urllib.parse import parse_qsl

        types = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        return cls(**{name: types[name](value) for name, value in parse_qsl(query)})


def request_kind(method: str, path: str, query: str) -> str:
    """The kind of an S3 request from its method, path and query string (path-style addressing)."""
    is_object = "/" in path.strip("/")  # /bucket/key... (a bucket alone is /bucket)
    if method == "GET":
        return "GET" if is_object else "LIST"
    if method == "HEAD":
        return "HEAD"
    if method in ("PUT", "POST"):
        return "PUT" if is_object else "OTHER"
    return "OTHER"


def _s3_error(start_response: Any, status: str, code: str, message: str, key: str) -> list[bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{key}</Resource>"
        "<RequestId>faulty-latency-s3</RequestId></Error>"
    ).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class LatencyApp:
    """A WSGI app that sleeps before each object GET, counts requests, then calls ``inner``;
    the GETs that ``faults`` name are refused, cut, stalled or slowed instead."""

    def __init__(self, inner: Any, latency_ms: float, faults: Faults | None = None):
        self.inner, self.latency_s = inner, latency_ms / 1000.0
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.get_bytes = 0
        self._gets_now = self._most_gets = 0  # object GETs being answered; the most at once
        self._link_free = 0.0  # when the shared link (total_bandwidth_mbps) has sent what it was given
        self.set_faults(faults or Faults())

    def set_faults(self, faults: Faults) -> None:
        """Use ``faults`` from now on, numbering the GETs from 1 again (a storm starts anew)."""
        with self._lock:
            self.faults, self._numbered, self._storm_until = faults, 0, None
            self._due: list[str] = []  # cuts and stalls whose GET was refused: the next ones get them

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__latency/"):
            if path == "/__latency/reset":
                self.reset()
            elif path == "/__latency/faults":
                self.set_faults(Faults.from_query(environ.get("QUERY_STRING", "")))
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(self.counts()).encode()]
        kind = request_kind(environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""))
        with self._lock:
            self._counts[kind] += 1
            if kind == "GET":
                self._counts["GET" + os.path.splitext(path)[1]] += 1
                self._gets_now += 1
                self._most_gets = max(self._most_gets, self._gets_now)
            fault = self._fault(path) if kind == "GET" else None
        if kind != "GET":
            return self._answer(environ, start_response, kind, path, fault)
        try:
            body = self._answer(environ, start_response, kind, path, fault)
        except BaseException:
            self._get_done()
            raise
        return self._until_sent(body)

    def _get_done(self) -> None:
        with self._lock:
            self._gets_now -= 1

    def _until_sent(self, body: Any) -> Iterator[bytes]:
        """``body``, the GET counted in flight until it is sent or the client hung up."""
        try:
            yield from body
        finally:
            self._get_done()

    def _answer(
        self, environ: dict[str, Any], start_response: Any, kind: str, path: str, fault: str | None
    ) -> Any:
        if kind == "GET" and self.latency_s > 0:
            time.sleep(self.latency_s)
        if fault == "refused":
            return _s3_error(
                start_response, "503 Slow Down", "SlowDown", "Please reduce your request rate.", path
            )
        if fault == "denied":
            return _s3_error(start_response, "403 Forbidden", "AccessDenied", "Access Denied", path)
        if fault == "stalled":
            time.sleep(self.faults.stall_s)  # the client has given up by now; what follows goes nowhere
        body = self.inner(environ, start_response)
        if kind != "GET":
            return body
        chunks = list(body)
        if hasattr(body, "close"):
            body.close()
        return self._send(b"".join(chunks), cut=fault == "cut")

    def _fault(self, path: str) -> str | None:
        """What happens to this GET (the caller holds the lock): a fault's name, counted, or None."""
        f = self.faults
        if not path.endswith(f.suffix):
            return None
        self._numbered += 1
        n, now = self._numbered, time.monotonic()
        if f.storm_s > 0 and self._storm_until is None and n >= f.storm_from:
            self._storm_until = now + f.storm_s
        fault = None
        if f.deny and path.endswith(f.deny):
            fault = "denied"
        elif (self._storm_until is not None and now < self._storm_until) or (
            f.slowdown_every and n % f.slowdown_every == 0
        ):
            fault = "refused"
        self._due += [
            name
            for name, every in (("cut", f.cut_every), ("stalled", f.stall_every))
            if every and n % every == 0
        ]
        if fault is None and self._due:
            fault = self._due.pop(0)
        if fault:
            self._counts[fault] += 1
        return fault

    def _send(self, data: bytes, cut: bool) -> Iterator[bytes]:
        """The body, paced to the bandwidth caps; a cut one stops at half (werkzeug then closes the
        connection: it sends ``Connection: close`` on every response)."""
        end = len(data) // 2 if cut else len(data)
        rate = self.faults.bandwidth_mbps * 1e6 / 8  # bytes per second, this connection
        total = self.faults.total_bandwidth_mbps * 1e6 / 8  # bytes per second, all of them
        step = SEND_CHUNK if rate or total else max(end, 1)
        start = time.monotonic()
        for at in range(0, end, step):
            piece = data[at : min(at + step, end)]
            if rate:
                time.sleep(max(0.0, start + at / rate - time.monotonic()))
            if total:
                # The shared link sends one piece after another: this one goes out when the link
                # is free, and the connection waits until it has been sent.
                with self._lock:
                    self._link_free = max(self._link_free, time.monotonic()) + len(piece) / total
                    done = self._link_free
                time.sleep(max(0.0, done - time.monotonic()))
            with self._lock:
                self.get_bytes += len(piece)
            yield piece

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "GET": 0,
                "HEAD": 0,
                "PUT": 0,
                "LIST": 0,
                "OTHER": 0,
                "refused": 0,
                "cut": 0,
                "stalled": 0,
                "denied": 0,
                **self._counts,
                "get_bytes": self.get_bytes,
                "most_gets_at_once": self._most_gets,
            }

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self.get_bytes = 0
            self._most_gets = self._gets_now


class LatencyS3:
    """moto's S3 on 127.0.0.1 behind ``LatencyApp``, served by werkzeug's threaded server.

    Args:
        latency_ms: the wait before each object GET is answered.
        port: 0 picks a free port.
        own_process: serve from a child process (counters read over HTTP).
        faults: what goes wrong (``Faults``); ``set_faults`` changes it in this process.
    """

    def __init__(
        self, latency_ms: float = 30.0, port: int = 0, own_process: bool = False, faults: Faults | None = None
    ):
        self.latency_ms, self.own_process, self.faults = latency_ms, own_process, faults or Faults()
        self._proc: subprocess.Popen | None = None
        if own_process:
            port = port or _free_port()
            self.app = None
            self.endpoint = f"http://127.0.0.1:{port}"
        else:
            self.app, self._server = _make_server(latency_ms, port, self.faults)
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            host, port = self._server.server_address[:2]
            self.endpoint = f"http://{host}:{port}"
        self.port = port
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, **BUCKET_ENV}

    def start(self) -> LatencyS3:
        if not self.own_process:
            self._thread.start()
            return self
        cmd = [sys.executable, "-m", "pipeline.bench.s3_latency", "--latency-ms", str(self.latency_ms),
               "--port", str(self.port), *self.faults.to_args()]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self._http("counts")
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the S3 latency server did not start ({' '.join(cmd)})") from None
                time.sleep(0.2)

    def _http(self, what: str) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/__latency/{what}", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
            self._proc = None
            return
        if not self.own_process:
            self._server.shutdown()
            self._thread.join()
            self._server.server_close()

    def __enter__(self) -> LatencyS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def counts(self) -> dict[str, int]:
        """Requests by kind since the start or the last ``reset``, and ``get_bytes``."""
        return self._http("counts") if self.own_process else self.app.counts()

    def reset(self) -> None:
        if self.own_process:
            self._http("reset")
        else:
            self.app.reset()

    def set_faults(self, faults: Faults) -> None:
        """Serve with ``faults`` from now on, numbering the GETs from 1 again."""
        self.faults = faults
        if self.own_process:
            from urllib.parse import urlencode

            self._http(f"faults?{urlencode(faults.changed())}")
        else:
            self.app.set_faults(faults)

    def create_bucket(self, bucket: str) -> str:
        """Make ``bucket`` (through pyarrow, as the pipeline itself would) and return ``s3://bucket``."""
        import pyarrow.fs

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            fs, _ = pyarrow.fs.FileSystem.from_uri(
                f"s3://{bucket}?allow_bucket_creation=true&endpoint_override={self.endpoint}"
            )
            fs.create_dir(bucket)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return f"s3://{bucket}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_server(latency_ms: float, port: int, faults: Faults) -> tuple[LatencyApp, Any]:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    app = LatencyApp(DomainDispatcherApplication(create_backend_app), latency_ms, faults)
    return app, make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench.s3_latency", description=__doc__.split("\n")[0]
    )
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--port", type=int, required=True)
    for f in dataclasses.fields(Faults):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    faults = Faults(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)})
    _, server = _make_server(args.latency_ms, args.port, faults)
    print(f"S3 with {args.latency_ms:g} ms per GET at http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
