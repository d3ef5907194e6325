"""Host-side help for the 12.5 Hz loops: scheduling priority and a frozen heap.

`frozen_heap()`: while a live loop runs (DuplexSession, respond_realtime, the server's step loop),
everything alive at its start (weights, caches, compiled graphs, prompt state) sits in the
collector's permanent generation, so the collections during the loop scan only what the loop
allocates (shorter pauses). Entered once per loop start; when the last loop ends the heap is
collectable again, so garbage made of those objects is not kept forever.

`boost_current_thread()`: scheduling priority for the thread that runs the loop (opt-in).
A frame's work is ~10 ms of host time every 80 ms; on a busy machine the scheduler can stall that
thread for tens of milliseconds at a time, which is where the frame-time tail comes from once the
GPU work is short (docs/benchmarks.md). It asks Linux for the SCHED_FIFO real-time class for the
calling thread only (the loop sleeps between frames, so it cannot starve the machine); without
the privilege (CAP_SYS_NICE / an rtprio limit) it tries a lower nice value, and otherwise leaves
the thread as it is. It never raises.
"""
from __future__ import annotations

import gc
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_heap_lock = threading.Lock()
_heap_users = 0


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect once, then freeze the heap (gc.freeze) until the block ends. Nested or overlapping
    uses share one freeze: the first to enter freezes, the last to leave unfreezes."""
    global _heap_users
    with _heap_lock:
        if _heap_users == 0:
            gc.collect()
            gc.freeze()
        _heap_users += 1
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                gc.unfreeze()


def boost_current_thread(priority: int = 10) -> tuple[str, Callable[[], None]]:
    """Raise the calling thread's priority. Returns (what was done, undo function)."""
    if not hasattr(os, "sched_setscheduler"):
        return "unchanged (no POSIX scheduling API on this platform)", lambda: None
    try:
        old_policy, old_param = os.sched_getscheduler(0), os.sched_getparam(0)
    except OSError as e:
        return f"unchanged ({e.strerror})", lambda: None
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(priority)))

        def undo() -> None:
            try:
                os.sched_setscheduler(0, old_policy, old_param)
            except OSError:
                pass
        return f"SCHED_FIFO priority {priority}", undo
    except (PermissionError, OSError):
        pass
    tid = threading.get_native_id()
    try:
        old_nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, old_nice - 5)

        def undo_nice() -> None:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, old_nice)
            except OSError:
                pass
        return f"nice {old_nice - 5} (no permission for SCHED_FIFO)", undo_nice
    except (PermissionError, OSError):
        return "unchanged (no permission for SCHED_FIFO or a lower nice value)", lambda: None
