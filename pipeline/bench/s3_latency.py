"""An S3 server with latency, for tests and ``bench feed``: moto behind a WSGI wrapper.

    with LatencyS3(latency_ms=30) as s3:          # 127.0.0.1, a free port, one thread per request
        os.environ.update(s3.env)                 # AWS_ENDPOINT_URL and test credentials
        ...                                       # any S3 client (pyarrow, DALI, boto3)
        s3.counts()                               # {"GET": 12, "HEAD": 3, "PUT": 0, "LIST": 1, ...}

Each GET of an object (a whole object or a ``Range``) waits ``latency_ms`` before moto answers,
as S3 Standard's time to first byte does for small objects; other requests are answered at
once. This machine's kernel has no ``netem``, so the delay is put in the server. Requests are
counted by kind: ``GET`` (object reads), ``HEAD``, ``PUT`` (object writes and multipart parts),
``LIST`` (bucket listings), ``OTHER``; GETs again by the key's extension (``GET.tar``,
``GET.JPEG``, ``GET.gz``: data GETs apart from the manifest's); and the bytes the GETs
returned (``get_bytes``).

    python -m pipeline.bench.s3_latency --latency-ms 30 --port 5123    # the same, as its own process

``LatencyS3(..., own_process=True)`` runs it so (what ``bench feed`` does: moto answering in
the measured process would compete with it for the GIL); the counters are then read over HTTP
at ``/__latency/counts`` (and zeroed at ``/__latency/reset``), paths no S3 client uses.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

BUCKET_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


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


class LatencyApp:
    """A WSGI app that sleeps before each object GET, counts requests, then calls ``inner``."""

    def __init__(self, inner: Any, latency_ms: float):
        self.inner, self.latency_s = inner, latency_ms / 1000.0
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.get_bytes = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/__latency/"):
            if path == "/__latency/reset":
                self.reset()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(self.counts()).encode()]
        kind = request_kind(
            environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        )
        with self._lock:
            self._counts[kind] += 1
            if kind == "GET":
                self._counts["GET" + os.path.splitext(environ.get("PATH_INFO", ""))[1]] += 1
        if kind == "GET" and self.latency_s > 0:
            time.sleep(self.latency_s)
        body = self.inner(environ, start_response)
        if kind != "GET":
            return body
        chunks = list(body)
        with self._lock:
            self.get_bytes += sum(len(c) for c in chunks)
        return chunks

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "GET": 0,
                "HEAD": 0,
                "PUT": 0,
                "LIST": 0,
                "OTHER": 0,
                **self._counts,
                "get_bytes": self.get_bytes,
            }

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self.get_bytes = 0


class LatencyS3:
    """moto's S3 on 127.0.0.1 behind ``LatencyApp``, served by werkzeug's threaded server.

    Args:
        latency_ms: the wait before each object GET is answered.
        port: 0 picks a free port.
        own_process: serve from a child process (counters read over HTTP).
    """

    def __init__(self, latency_ms: float = 30.0, port: int = 0, own_process: bool = False):
        self.latency_ms, self.own_process = latency_ms, own_process
        self._proc: subprocess.Popen | None = None
        if own_process:
            port = port or _free_port()
            self.app = None
            self.endpoint = f"http://127.0.0.1:{port}"
        else:
            self.app, self._server = _make_server(latency_ms, port)
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
               "--port", str(self.port)]  # fmt: skip
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

    def _http(self, what: str) -> dict[str, int]:
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


def _make_server(latency_ms: float, port: int) -> tuple[LatencyApp, Any]:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    app = LatencyApp(DomainDispatcherApplication(create_backend_app), latency_ms)
    return app, make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench.s3_latency", description=__doc__.split("\n")[0]
    )
    p.add_argument("--latency-ms", type=float, default=30.0)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    _, server = _make_server(args.latency_ms, args.port)
    print(f"S3 with {args.latency_ms:g} ms per GET at http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
