"""Bounds on what one app instance spends: API requests in flight, concurrent image decodes,
requests per token, and the range of every id a client may send.

Requests in flight are bounded by ``Settings.max_concurrent``: one more waits at most
``QUEUE_WAIT_S`` for a slot and is then answered 503 with Retry-After. The database pool holds a
connection for each slot (and a few for the worker and the front door), and waits no longer
than that either, so a burst is answered within seconds (some of it "busy"), never frozen on
the pool's default 30 s wait and never a 500.

A decoded image costs width x height x 4 bytes or so, whatever its file size: eight 6300 x 6300
PNGs of 116 KB each take over a gigabyte at once. Decodes therefore take a slot from a
semaphore sized by ``Settings.max_concurrent_decodes``; a request that waits longer than
``DECODE_WAIT_S`` for one gets 503 (busy) instead of piling up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager

import anyio
from PIL import Image

from .errors import busy

MAX_ID = 2**63 - 1  # ids and versions are 64-bit integers in every database
DECODE_WAIT_S = 30.0
QUEUE_WAIT_S = 3.0  # then time is left to serve a late slot: an answer within ~5 s

_decodes = threading.BoundedSemaphore(2)


def configure(max_concurrent_decodes: int) -> None:
    """Size the decode semaphore (the app does this at start, from its settings).

    Also makes Pillow allocate large images in 64 MB blocks: glibc serves blocks that big with
    mmap and returns them to the system when freed, whereas Pillow's default 16 MB blocks end up
    in per-thread heaps after the first free, where they stay resident: eight threads decoding
    in turn then hold eight images' worth of memory although only two decode at once.
    """
    global _decodes
    _decodes = threading.BoundedSemaphore(max_concurrent_decodes)
    Image.core.set_block_size(64 * 2**20)


@contextmanager
def decode_slot(wait: float = DECODE_WAIT_S):
    from .uploads import UploadError

    slots = _decodes
    if not slots.acquire(timeout=wait):
        raise UploadError(503, "the server is busy decoding other images; try again shortly")
    try:
        yield
    finally:
        slots.release()


class RateLimiter:
    """At most ``per_minute`` requests per key in any sliding 60-second window (0: no limit)."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: str) -> float:
        """0 if a request with ``key`` may go now (and count it), else seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            seen = self._seen.setdefault(key, deque())
            while seen and seen[0] <= now - 60:
                seen.popleft()
            if len(seen) >= self.per_minute:
                return max(seen[0] + 60 - now, 0.001)
            seen.append(now)
            if len(self._seen) > 10_000:  # forget idle keys; never grows without bound
                for k in [k for k, q in self._seen.items() if not q or q[-1] <= now - 60]:
                    del self._seen[k]
            return 0.0


class Concurrency:
    """ASGI middleware: at most ``limit`` API requests in flight; a request that finds no slot
    within ``wait`` seconds is answered 503 with Retry-After (the page and static files are not
    counted)."""

    def __init__(self, app, limit: int, wait: float = QUEUE_WAIT_S) -> None:
        self.app, self.limit, self.wait = app, limit, wait
        self.slots = anyio.Semaphore(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        acquired = False
        with anyio.move_on_after(self.wait):  # bounds the wait for a slot, not the request
            await self.slots.acquire()
            acquired = True
        if not acquired:
            return await busy(f"{self.limit} requests are in progress")(scope, receive, send)
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()
