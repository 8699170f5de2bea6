"""The fetch engine: objects read from a bucket as object storage really behaves, for every reader.

    fetcher = Fetcher(FetchPolicy(retry_s=600), gets_in_flight=16)
    with open(tmp, "wb") as out:
        sha256 = fetcher.fetch("s3://bucket/shards/train-000003.tar", size, out)   # hex digest
    sha256 = fetcher.fetch(location, size)          # no sink: hash only (``data shard``'s read-back)
    fetcher.stats.snapshot()    # {"gets": 40, "retries": 6, "throttled": 5, "wait_s": 3.1, "bytes": ...}

An object is opened with one HEAD (its size must be the one expected: the manifest's, or what
was just written) and read as ranged GETs of ``part_bytes`` (8 MiB, the unit S3 serves at full
speed), ``parts_in_flight`` of them at once, written to the sink in order and hashed (SHA-256)
as they come: a fetch holds at most ``parts_in_flight`` parts in memory, never a whole shard.

S3 misbehaves as a matter of course: ``503 SlowDown`` in bursts while it scales a prefix
(seconds to minutes), 500s, connections reset mid-body, bodies cut short, GETs that stall. Each
failed GET is retried after a wait drawn uniformly from [0, min(backoff_max_s, backoff_s x
2^attempt)] ("full jitter": the node's fetchers do not come back in step), for as long as
``retry_s`` seconds from the object's first failure (``data.fetch_retry_s``). A stalled GET is
abandoned by the client after ``request_timeout_s`` seconds with no byte (curl's low-speed
limit, which pyarrow's ``request_timeout`` sets) and retried. Only a 403 (credentials), a 404
(the object is not there), an object of another size and a spent budget are errors, each
naming the object, the last answer and what to do (``FetchError``).

The client is pyarrow's S3 filesystem, built with ``FileSystem.from_uri`` (it follows
``AWS_ENDPOINT_URL``, the region and the credentials chain, as the rest of the pipeline) and
rebuilt from its own options with the AWS SDK's retries off (``max_attempts=1``) and the
request timeout set. pyarrow's default strategy spends about 30 quick GETs in 6 s on a 503
and then reports ``SERVICE_UNAVAILABLE`` with no message (measured against the test server):
it neither rides out a storm of minutes nor says what happened. boto3 is not a runtime
dependency (only moto, in the tests, brings it).
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from pipeline.store import locations

MIB = 1024 * 1024
T = TypeVar("T")
DEFAULT_RETRY_S = 600.0  # S3 scales a prefix in minutes; a run should ride that out, not die


@dataclass(frozen=True)
class FetchPolicy:
    """How objects are fetched.

    Args:
        retry_s: seconds of failures one object may see before it is an error.
        part_bytes: bytes per ranged GET.
        parts_in_flight: GETs of one object at once.
        request_timeout_s: a GET that receives no byte for this long is abandoned and retried.
        backoff_s: the first retry's longest wait; doubled each retry...
        backoff_max_s: ...up to this.
    """

    retry_s: float = DEFAULT_RETRY_S
    part_bytes: int = 8 * MIB
    parts_in_flight: int = 4
    request_timeout_s: float = 20.0
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0


class FetchError(OSError):
    """An object that could not be read; the message names it, the last answer and the fix.

    ``status``: the last answer's HTTP status (403, 404, 503, ...), or 0 (a network failure).
    """

    def __init__(self, message: str, location: str, status: int):
        super().__init__(message)
        self.location, self.status = location, status

    def __reduce__(self) -> tuple[Any, ...]:  # `data shard` raises it in a worker process
        return FetchError, (str(self), self.location, self.status)


class FetchStats:
    """This process's fetch counters (thread-safe): what a feed reports about object storage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gets = self.retries = self.throttled = self.bytes = 0
        self.wait_s = 0.0

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, float]:
        """GETs made, GETs retried (and of those, refused with 503 SlowDown), seconds waited
        between retries, bytes received."""
        with self._lock:
            return {"gets": self.gets, "retries": self.retries, "throttled": self.throttled,
                    "wait_s": self.wait_s, "bytes": self.bytes}  # fmt: skip


# ---------------------------------------------------------------- what an error means

# pyarrow's S3 errors read "AWS Error <CODE> during GetObject operation: ..." (the SDK's code
# for S3's answer; an unknown one with "(HTTP status NNN)"); a network failure, a cut body or
# a stall is a "curlCode: N, ..." under NETWORK_CONNECTION.
_STATUS_OF_CODE = {"ACCESS_DENIED": 403, "INVALID_ACCESS_KEY_ID": 403, "SIGNATURE_DOES_NOT_MATCH": 403,
                   "NO_SUCH_KEY": 404, "NO_SUCH_BUCKET": 404, "RESOURCE_NOT_FOUND": 404,
                   "SLOW_DOWN": 503, "SERVICE_UNAVAILABLE": 503, "THROTTLING": 503,
                   "INVALID_RANGE": 416, "INTERNAL_FAILURE": 500}  # fmt: skip
FINAL_STATUSES = (403, 404, 416)  # another try cannot help


def status_of(error: BaseException) -> int:
    """The HTTP status an object store's error stands for (0: none, a network failure)."""
    if isinstance(error, FileNotFoundError):
        return 404
    if isinstance(error, PermissionError):
        return 403
    text = str(error)
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    if code and code.group(1) in _STATUS_OF_CODE:
        return _STATUS_OF_CODE[code.group(1)]
    http = re.search(r"HTTP (?:response code|status)\W*(\d{3})", text)
    if http:
        return int(http.group(1))
    if "SlowDown" in text or "reduce your request rate" in text.lower():
        return 503
    return 0


def final_message(location: str, status: int, last: str, tries: int, seconds: float) -> str:
    """What a spent budget, or a final answer, tells the user."""
    if status == 403:
        return f"{location}: access denied (403: {last}); {locations.access_hint(location)}"
    if status in (404, 416):
        what = "not found" if status == 404 else "not of the size expected"
        return (
            f"{location}: {what} ({status}: {last}); the object was deleted or replaced since it was written: "
            "re-run `python -m pipeline data shard SRC OUT`"
        )
    spent = f"{tries} tries in {seconds:.0f} s"
    if status == 503:
        return (
            f"{location}: throttled: S3 answered 503 SlowDown for {spent} (S3 is scaling the prefix); raise "
            "data.fetch_retry_s or lower data.cache_fetchers"
        )
    return (
        f"{location}: cannot be read ({spent}; last: {last}); check the network and the endpoint "
        "(AWS_ENDPOINT_URL), or raise data.fetch_retry_s"
    )


# ---------------------------------------------------------------- the engine


class _Budget:
    """One object's retry budget, shared by its parts: ``seconds`` from the object's first failure."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends: float | None = None
        self.abandoned = False  # a part failed for good: the others give up too
        self._lock = threading.Lock()

    def left(self) -> float:
        """Seconds left, the clock started by the first failure (this call's caller's)."""
        with self._lock:
            now = time.monotonic()
            if self.ends is None:
                self.ends = now + self.seconds
            return self.ends - now


class Fetcher:
    """Reads objects through one client per process, ``gets_in_flight`` GETs at once in all.

    Args:
        policy: part size, retries, timeouts.
        gets_in_flight: this process's GETs at once, over every object it fetches.
        stats: where to count (a new ``FetchStats`` when None).
    """

    def __init__(
        self, policy: FetchPolicy | None = None, gets_in_flight: int = 4, stats: FetchStats | None = None
    ):
        self.policy = policy or FetchPolicy()
        self.stats = stats or FetchStats()
        self._pool = ThreadPoolExecutor(max(1, gets_in_flight), thread_name_prefix="object-get")
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def _client(self, location: str) -> tuple[Any, str]:
        """(filesystem, path) for ``location``: one client per bucket (building one costs more than a GET)."""
        import pyarrow.fs

        scheme, path = location.split("://", 1)
        bucket = f"{scheme}://{path.split('/', 1)[0]}"
        with self._lock:
            if bucket not in self._clients:
                fs, _ = locations.filesystem(bucket)
                if isinstance(fs, pyarrow.fs.S3FileSystem):
                    _, (options,) = fs.__reduce__()  # from_uri's options: endpoint, region, credentials
                    fs = pyarrow.fs.S3FileSystem(**{
                        **options,
                        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1),
                        "request_timeout": self.policy.request_timeout_s,
                    })  # fmt: skip
                self._clients[bucket] = fs
            return self._clients[bucket], path

    def fetch(self, location: str, size: int, sink: BinaryIO | None = None) -> str:
        """Read the ``size`` bytes of ``location`` into ``sink`` (in order); return their SHA-256.

        Raises:
            FetchError: a 403, a 404, an object of another size (416), or failures for longer
                than ``policy.retry_s``.
        """
        fs, path = self._client(location)
        p = self.policy
        budget = _Budget(p.retry_s)
        # One HEAD (pyarrow's open): the object's size, and a handle whose ranged reads may run
        # from several threads at once.
        with self._retried(location, budget, fs.open_input_file, path) as handle:
            if handle.size() != size:
                raise FetchError(
                    final_message(location, 416, f"{handle.size()} bytes, {size} expected", 1, 0),
                    location,
                    416,
                )
            sha = hashlib.sha256()
            pending: deque[Future] = deque()

            def take_first() -> None:
                data = pending.popleft().result()
                sha.update(data)
                if sink is not None:
                    sink.write(data)

            try:
                for at in range(0, size, p.part_bytes):
                    length = min(p.part_bytes, size - at)
                    pending.append(
                        self._pool.submit(self._retried, location, budget, self._read, handle, at, length)
                    )
                    if len(pending) >= p.parts_in_flight:
                        take_first()
                while pending:
                    take_first()
            finally:
                if pending:  # an error above: the other parts stop instead of retrying on
                    budget.abandoned = True
                    for f in pending:
                        f.cancel()
                    wait(pending)  # none may read from the handle once it is closed
        return sha.hexdigest()

    def _read(self, handle: Any, offset: int, length: int) -> bytes:
        """One part: a ranged GET."""
        self.stats.add(gets=1)
        data = handle.read_at(length, offset)
        if len(data) != length:
            raise _Truncated(f"the body was cut at {len(data)} of {length} bytes")
        self.stats.add(bytes=length)
        return data

    def _retried(self, location: str, budget: _Budget, attempt: Callable[..., T], *args: Any) -> T:
        """``attempt(*args)``, tried again after each transient failure until ``budget`` is spent."""
        p, tries = self.policy, 0
        while True:
            if budget.abandoned or self._closed.is_set():
                raise FetchError(f"{location}: fetch abandoned", location, 0)
            tries += 1
            try:
                return attempt(*args)
            except _Truncated as e:
                status, last = 0, str(e)
            except OSError as e:
                status, last = status_of(e), str(e).strip()
            if status in FINAL_STATUSES:
                raise FetchError(final_message(location, status, last, tries, 0), location, status)
            left = budget.left()
            if left <= 0:
                seconds = budget.seconds - left
                raise FetchError(final_message(location, status, last, tries, seconds), location, status)
            wait = min(left, random.uniform(0, min(p.backoff_max_s, p.backoff_s * 2 ** (tries - 1))))
            self.stats.add(retries=1, throttled=int(status == 503), wait_s=wait)
            self._closed.wait(wait)  # a close() ends the wait

    def close(self) -> None:
        """Stop: GETs still retrying give up, queued ones never start."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Truncated(Exception):
    """A body shorter than asked: the connection closed mid-body."""


def stored_sha256(location: str, size: int, policy: FetchPolicy | None = None) -> str | None:
    """The SHA-256 of ``location`` when it holds ``size`` bytes; None when it is absent or of another size.

    ``data shard``'s read-back: through the engine, so a throttled store is waited out (or named
    as throttled by ``FetchError``), never taken for a shard that differs.
    """
    if not locations.is_uri(location):
        path = Path(location)
        if not path.is_file() or path.stat().st_size != size:
            return None
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(MIB):
                sha.update(chunk)
        return sha.hexdigest()
    with Fetcher(policy) as fetcher:
        try:
            return fetcher.fetch(location, size)
        except FetchError as e:
            if e.status in (404, 416):
                return None
            raise
