"""Dynamic batching: requests submitted concurrently by worker threads share one ``generate`` call.

Decoding is bound by reading the weights, so a step for 8 rows costs little more than a step for one:
requests that arrive within a few milliseconds of each other are worth grouping. One background thread
calls the runtime; callers block until their batch is done.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from typing import cast

from worker.runtime import GenerationRequest
from worker.runtime import GenerationResult
from worker.runtime import ModelRuntime


@dataclass
class _Pending:
    request: GenerationRequest
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    error: BaseException | None = None


class DynamicBatcher:
    """Groups concurrent ``submit`` calls into batched ``runtime.generate`` calls on one background thread.

    A batch starts with the first waiting request and takes up to ``max_batch_size``, waiting at most
    ``max_wait_ms`` after that first request for more to arrive.
    """

    def __init__(self, runtime: ModelRuntime, max_batch_size: int, max_wait_ms: int) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        self._runtime = runtime
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        # Guards `_closed` together with the put, so no request can land behind the stop marker.
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> GenerationResult:
        """Return the result of ``request``, blocking until the batch it joined has run.

        Raises what ``runtime.generate`` raised for this request, and ``RuntimeError`` once closed.
        """
        pending = _Pending(request)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return cast(GenerationResult, pending.result)

    def close(self) -> None:
        """Refuse new requests, finish the ones already submitted, and stop the background thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self._max_wait_s
            while len(batch) < self._max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    # Past the deadline, still take what is already queued: it costs no waiting.
                    pending = (
                        self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if pending is None:
                    stopping = True
                    break
                batch.append(pending)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        try:
            results = self._runtime.generate([pending.request for pending in batch])
        except Exception as failure:
            if len(batch) == 1:
                batch[0].error = failure
                batch[0].done.set()
                return
            # One bad request (an image for a text-only model, say) must not fail its neighbours: rerun alone.
            for pending in batch:
                self._run([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.done.set()
