"""The one thread that owns every MLX call.

MLX is not thread-safe (the Swift demo of this model crashed when two threads touched it), so every
piece of model work - loading, prompts, steps, Mimi - runs on a single `ModelWorker` thread. Other
threads (callers, asyncio loops, the CLI) hand it work through a queue and get back futures or
iterators of plain Python / numpy values. No MLX array ever crosses threads.

A live DuplexSession runs its 12.5 Hz loop *as one long task* on this thread; turn-based requests
submitted meanwhile wait until the session stops.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterator

from .errors import EngineError

_STOP = object()
_END = object()


class WorkerClosed(EngineError):
    """Work was submitted to a ModelWorker that has been shut down."""


class ModelWorker:
    """A daemon thread that runs submitted callables one at a time, in order."""

    def __init__(self, name: str = "personaplex-mlx"):
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._closed = False
        self._parked = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- thread body -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                # Park instead of returning. With mlx 0.32.4, a thread that freed unevaluated arrays
                # (e.g. nn.Linear's random init replaced by loaded weights) and then ended makes the
                # process abort at exit ("terminate called without an active exception"). A parked
                # daemon thread costs a stack and ends with the process.
                self._parked.set()
                threading.Event().wait()
            fn, args, kwargs, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(exc)

    # -- API ---------------------------------------------------------------------------------
    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def on_worker(self) -> bool:
        """True when called from the worker thread itself."""
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)`; returns a Future. From the worker thread it runs inline."""
        fut: Future = Future()
        if self.on_worker():
            fut.set_running_or_notify_cancel()
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)
            return fut
        with self._lock:
            if self._closed:
                raise WorkerClosed("the model worker was shut down; load the model again")
            self._queue.put((fn, args, kwargs, fut))
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run on the worker and wait for the result (exceptions are re-raised here)."""
        return self.submit(fn, *args, **kwargs).result()

    def stream(self, gen_fn: Callable[..., Iterator[Any]], *args: Any, maxsize: int = 0,
               **kwargs: Any) -> Iterator[Any]:
        """Run a generator function on the worker; iterate its items on the calling thread.

        Items are passed through a queue as soon as they are produced. Closing the returned
        iterator early asks the producer to stop after its current item.
        """
        if self.on_worker():  # nested use from the worker: just run it
            yield from gen_fn(*args, **kwargs)
            return
        q: "queue.Queue[Any]" = queue.Queue(maxsize=maxsize)
        cancel = threading.Event()

        def put(msg) -> bool:
            # Bounded queue: never block the worker forever on a consumer that went away.
            while not cancel.is_set():
                try:
                    q.put(msg, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        self.submit(_pump, gen_fn, args, kwargs, put, cancel)
        try:
            while True:
                kind, value = q.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            cancel.set()

    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Awaitable variant of call() for asyncio code."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def astream(self, gen_fn: Callable[..., Iterator[Any]], *args: Any,
                      **kwargs: Any) -> AsyncIterator[Any]:
        """Async iterator over a generator function run on the worker."""
        loop = asyncio.get_running_loop()
        q: "asyncio.Queue[Any]" = asyncio.Queue()
        cancel = threading.Event()

        def put(msg) -> bool:
            try:
                loop.call_soon_threadsafe(q.put_nowait, msg)
                return True
            except RuntimeError:      # the event loop is closed: nobody is listening
                return False

        self.submit(_pump, gen_fn, args, kwargs, put, cancel)
        try:
            while True:
                kind, value = await q.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            cancel.set()

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting work; waits (if `wait`) until the queued work is done. The thread then
        parks until the process ends (see _run)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if wait and not self.on_worker():
            self._parked.wait()


def _pump(gen_fn, args, kwargs, put: Callable[[tuple], bool], cancel: threading.Event) -> None:
    """Worker side of stream()/astream(): run the generator, hand over ("item" | "error" | "end", value)
    messages; stop early when the consumer cancelled or `put` reports it is gone."""
    try:
        for item in gen_fn(*args, **kwargs):
            if not put(("item", item)) or cancel.is_set():
                return
    except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer's side
        put(("error", exc))
        return
    put(("end", None))
