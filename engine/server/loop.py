"""The one 80 ms step loop that advances every session, running as a long task on the model worker.

Threads: the asyncio thread decodes incoming Opus into each connection's inbox (a bounded buffer,
oldest audio dropped and counted when a client sends faster than real time) and encodes outgoing
audio; the worker thread runs this loop: admit joining sessions (prompt phases, B=1, from the
model's prompt cache), drop leaving ones, then one batched step per tick for all active slots.
Results go back to the asyncio thread with `call_soon_threadsafe`; nothing here ever waits on a
client. A session whose inbox is short this tick gets silence for it (counted as an underrun).
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from ..rt import frozen_heap
from .batch import DEFAULT_FUSED_PARTS, BatchEngine, SlotParams

try:
    from .. import _blas
except ImportError:  # pragma: no cover - the package always has it
    _blas = None

FRAME = 1920
FRAME_SECONDS = 0.08
log = logging.getLogger("engine.serve")


def host_counters() -> dict:
    """Machine-wide CPU steal time (VM hosts) and this cgroup's CPU throttling, where readable
    (Linux): slow steps that line up with either come from the host, not from the step. Used by
    bench/serve.py and the zero-miss test to say where a miss came from."""
    out = {}
    try:
        with open("/proc/stat") as fh:              # cpu user nice system idle iowait irq softirq steal
            f = fh.readline().split()
        out["steal_s"] = int(f[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    for path in ("/sys/fs/cgroup/cpu.stat", "/sys/fs/cgroup/cpu/cpu.stat"):
        try:
            with open(path) as fh:
                for line in fh:
                    k, v = line.split()
                    if k in ("nr_throttled", "throttled_usec", "throttled_time"):
                        out[k] = int(v)
            break
        except (OSError, ValueError):
            continue
    return out


class Metrics:
    """Counters and step-time window shared by the loop and the app (plain ints under the GIL)."""

    def __init__(self, window: int = 2000):
        self.steps = 0
        self.misses = 0
        self.sessions_active = 0
        self.sessions_total = 0
        self.refused = 0                  # every refusal; the reasons below are parts of it
        self.refused_busy = 0             # server full
        self.refused_auth = 0             # missing or wrong token (websocket and HTTP routes)
        self.refused_origin = 0           # websocket from a foreign Origin
        self.refused_client_limit = 0     # per-client-address limit
        self.closed_idle = 0
        self.closed_error = 0
        self.in_dropped_frames = 0
        self.out_dropped_frames = 0
        self.in_underrun_frames = 0
        self.reanchors = 0
        self.join_ms: deque = deque(maxlen=200)
        self.miss_steps: deque = deque(maxlen=1000)   # indices of the steps that missed
        self.miss_spans: deque = deque(maxlen=1000)   # (start, end) perf_counter of each missed step
        self.step_ms: deque = deque(maxlen=window)
        # CPU time the loop's thread got during each step: well under step_ms means the thread
        # waited (descheduled, or blocked on the GPU where the driver does not spin)
        self.step_cpu_ms: deque = deque(maxlen=window)
        self.batch_sizes: deque = deque(maxlen=window)
        self.gc_ms: deque = deque(maxlen=window)      # the loop's own collections, between steps
        self.prep_ms: deque = deque(maxlen=window)    # prompt-phase work done in a tick's slack
        self.prompts_prepared = 0
        self.asr_utterances = 0       # --asr: utterances cut from the clients that asked (user_text=1)
        self.asr_dropped = 0          # not transcribed (recognizer behind) or not sent (client too slow)
        self.asr_failed = 0

    def percentile(self, q: float) -> float:
        vals = list(self.step_ms)
        return float(np.percentile(vals, q)) if vals else 0.0

    def prometheus(self, max_sessions: int) -> str:
        rows = [
            ("personaplex_sessions_active", "gauge", "sessions in the batch or joining", self.sessions_active),
            ("personaplex_sessions_max", "gauge", "configured --max-sessions", max_sessions),
            ("personaplex_sessions_total", "counter", "sessions accepted", self.sessions_total),
            ("personaplex_sessions_refused_total", "counter", "connections refused (limit or bad query)",
             self.refused),
            ("personaplex_sessions_refused_busy_total", "counter", "connections refused: server full",
             self.refused_busy),
            ("personaplex_refused_auth_total", "counter", "requests refused: missing or wrong auth token",
             self.refused_auth),
            ("personaplex_sessions_refused_origin_total", "counter",
             "websocket upgrades refused: Origin not allowed", self.refused_origin),
            ("personaplex_sessions_refused_client_limit_total", "counter",
             "connections refused: per-client-address session limit", self.refused_client_limit),
            ("personaplex_sessions_closed_idle_total", "counter", "sessions closed for idleness/silence",
             self.closed_idle),
            ("personaplex_sessions_closed_error_total", "counter", "sessions closed for bad messages",
             self.closed_error),
            ("personaplex_steps_total", "counter", "batched 80 ms steps run", self.steps),
            ("personaplex_step_misses_total", "counter", "steps that ended after their 80 ms deadline",
             self.misses),
            ("personaplex_step_ms_p50", "gauge", "median step time (recent window), ms", self.percentile(50)),
            ("personaplex_step_ms_p99", "gauge", "99th percentile step time (recent window), ms",
             self.percentile(99)),
            ("personaplex_gc_ms_max", "gauge", "longest garbage collection between steps (recent window), ms",
             max(self.gc_ms) if self.gc_ms else 0.0),
            ("personaplex_prompt_prep_ms_max", "gauge",
             "most prompt-phase work done between two steps (recent window), ms",
             max(self.prep_ms) if self.prep_ms else 0.0),
            ("personaplex_prompts_prepared_total", "counter",
             "new (voice, prompt) states computed in the loop's slack", self.prompts_prepared),
            ("personaplex_loop_reanchors_total", "counter",
             "times the loop fell > 4 frames behind and skipped ahead", self.reanchors),
            ("personaplex_input_dropped_frames_total", "counter", "input frames dropped (client too fast)",
             self.in_dropped_frames),
            ("personaplex_output_dropped_frames_total", "counter", "output frames dropped (client too slow)",
             self.out_dropped_frames),
            ("personaplex_input_underrun_frames_total", "counter", "frames stepped with silence (no input)",
             self.in_underrun_frames),
            ("personaplex_asr_utterances_total", "counter", "user utterances cut for the transcript (--asr)",
             self.asr_utterances),
            ("personaplex_asr_dropped_total", "counter",
             "user utterances not transcribed or not sent (recognizer or client behind)", self.asr_dropped),
            ("personaplex_asr_failed_total", "counter", "user utterances whose recognition failed",
             self.asr_failed),
        ]
        out = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


class Inbox:
    """Bounded mono float32 buffer: the asyncio thread pushes decoded audio, the loop takes frames."""

    def __init__(self, max_frames: int, metrics: Metrics):
        self._buf = np.zeros(max_frames * FRAME, np.float32)
        self._n = 0
        self._lock = threading.Lock()
        self._metrics = metrics
        self.dropped_frames = 0
        self.underruns = 0

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        cap = len(self._buf)
        with self._lock:
            over = self._n + len(pcm) - cap
            if over > 0:
                drop = -(-over // FRAME) * FRAME            # whole frames, oldest first
                old = min(drop, self._n)
                self._buf[:self._n - old] = self._buf[old:self._n]
                self._n -= old
                pcm = pcm[drop - old:]
                self.dropped_frames += drop // FRAME
                self._metrics.in_dropped_frames += drop // FRAME
            self._buf[self._n:self._n + len(pcm)] = pcm
            self._n += len(pcm)

    def take(self, out: np.ndarray) -> bool:
        """Fill `out` (1920) with the next frame; zeros (and False) when less than a frame waits."""
        with self._lock:
            if self._n < FRAME:
                out[:] = 0.0
                self.underruns += 1
                self._metrics.in_underrun_frames += 1
                return False
            out[:] = self._buf[:FRAME]
            self._buf[:self._n - FRAME] = self._buf[FRAME:self._n]
            self._n -= FRAME
            return True

    @property
    def frames(self) -> int:
        return self._n // FRAME


class Slot:
    """One session as the loop sees it. `on_joined(error | None)` and `on_frame(pcm, text_id)` are
    called on the worker thread; they must only hand work over (call_soon_threadsafe)."""

    _ids = itertools.count(1)

    def __init__(self, voice: str, text_prompt: str | None, params: SlotParams, inbox: Inbox,
                 on_joined: Callable, on_frame: Callable):
        self.id = next(self._ids)
        self.voice, self.text_prompt, self.params = voice, text_prompt, params
        self.inbox, self.on_joined, self.on_frame = inbox, on_joined, on_frame
        self.steps = 0
        self.left = False


class blas_threads:
    """Context: OpenBLAS (when MLX's CPU backend uses it) on `n` threads, restored on exit.

    The CPU step is hundreds of small matrix products; OpenBLAS's worker threads spin-wait
    between them and, on a busy machine, fight the server's own threads (Opus, asyncio): the
    tiny model's 8-row step measured 193 ms p50 with 2 BLAS threads under load vs 40 ms with 1."""

    def __init__(self, n: int):
        self.n, self.prev = n, None
        lib = getattr(_blas, "_handle", None)
        self._get = getattr(lib, "openblas_get_num_threads", None)
        self._set = getattr(lib, "openblas_set_num_threads", None)

    def __enter__(self):
        if self._get is not None and self._set is not None:
            self.prev = int(self._get())
            self._set(int(self.n))
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            self._set(self.prev)
        return False


class StepLoop:
    """The batched loop. `start()` submits it to the model's worker; `stop()` ends it."""

    def __init__(self, model, metrics: Metrics | None = None, frame_seconds: float = FRAME_SECONDS,
                 compiled: bool = False, capacity: int | None = None, warm=()):
        self.model = model
        self.warm = list(warm)
        self.compiled = compiled
        self.capacity = capacity
        self.max_behind = 4
        # New sessions admitted per tick. A join copies the session's prompted state into the
        # batch (~3 ms each for the tiny model on this CPU) and, for a (voice, prompt) not in the
        # cache, runs its prompt phases first, all inside the tick. The others wait in the queue
        # for the next ticks (80 ms each), so a burst of connections cannot cost one step a deadline.
        self.max_joins_per_step = 2
        # ... and only in a tick's slack (see _admit); a join waits at most this many ticks for it.
        self.join_max_wait_ticks = 6
        # A (voice, prompt) not in the model's cache is prepared in the slack after each step, in
        # prefill chunks of at most `prep_max_chunk` positions, as long as the next one is expected
        # to end `prep_margin_s` before the next tick; it always advances at least once every
        # `prep_max_wait_ticks` ticks (a loop with no slack at all would never admit it otherwise).
        self.prep_max_chunk = 16
        self.prep_margin_s = 0.002
        self.prep_max_wait_ticks = 25
        self._prep_unit_s = 0.005          # running estimate of one unit of prompt work
        self._prep_wait = 0
        self._preparing: list = []         # [(Slot, generator)] in arrival order
        # (slot, its prompted state) taken from the queue, waiting for slack to join
        self._join_next: tuple | None = None
        self._join_unit_s = 0.005          # running estimate of one join (max of the last and the mean)
        self._join_wait = 0
        # OpenBLAS threads while the loop runs on the CPU (None: leave as is); see blas_threads.
        self.cpu_blas_threads: int | None = 1
        # Seconds before each tick that the loop polls instead of sleeping (0: sleep); see
        # _wait_until. On an H200 with 16 sessions, polling 2 or 15 ms changed nothing
        # (docs/gpu/2026-12-04c-h200-soak-order.txt).
        self.spin_s = 0.0
        self.metrics = metrics or Metrics()
        self.frame_seconds = frame_seconds
        self._joins: "queue.SimpleQueue[Slot]" = queue.SimpleQueue()
        self._leaves: "queue.SimpleQueue[Slot]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._future = None
        self.batch: BatchEngine | None = None
        self.startup: dict = {}            # seconds spent in reserve() and rehearse() at start
        # on_progress(stage, done, total, seconds): called on the worker thread during startup (per
        # batch size of reserve() and rehearse(); on a GPU without MLX's kernel cache, minutes)
        self.on_progress: Callable | None = None
        self.ready = threading.Event()     # set once the loop serves (after warm-up, reserve, rehearsal)

    def _progress(self, stage: str, done: int, total: int, t0: float) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, done, total, time.perf_counter() - t0)

    # -- control (any thread)
    def start(self) -> None:
        self.ready.clear()
        self._future = self.model.worker.submit(self._run)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._future is not None:
            self._future.result(timeout=timeout)

    def join(self, slot: Slot) -> None:
        self._joins.put(slot)
        self._wake.set()

    def leave(self, slot: Slot) -> None:
        self._leaves.put(slot)
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    @property
    def failure(self) -> BaseException | None:
        """The exception that ended the loop (at startup or later), or None while it runs."""
        if self._future is None or not self._future.done():
            return None
        return self._future.exception()

    # -- worker thread
    def _admit(self, be: BatchEngine, active: dict, until: float | None = None) -> None:
        """Leaves, then joins (at most `max_joins_per_step`). With live sessions, `until` is when
        the next tick must start: a join (a copy of the session's KV rows into the batch) is only
        made while it is expected to end before then, or after `join_max_wait_ticks` ticks of
        waiting, so a burst of arrivals delays those sessions by a few ticks, not everyone's step.
        A session whose prompt is not cached goes to `_prepare` first (it joins from there)."""
        while True:
            try:
                slot = self._leaves.get_nowait()
            except queue.Empty:
                break
            if active.pop(slot.id, None) is not None:
                be.leave(slot.id)
            slot.left = True
        if self._preparing:
            self._preparing = [(s, job) for s, job in self._preparing if not s.left]
        admitted = 0
        while admitted < self.max_joins_per_step:
            if self._join_next is None:
                try:
                    slot = self._joins.get_nowait()
                except queue.Empty:
                    break
                if slot.left:
                    continue
                job = self._prompt_job(slot)
                if job is not None:
                    self._preparing.append((slot, job))     # a new prompt: prepared in the slack
                    continue
                # Cached: take the state now (a copy: no model work), so that the cache dropping
                # this prompt while the slot waits for slack cannot put a whole prefill in a tick.
                try:
                    state = self._prompted(slot.voice, slot.text_prompt, slot.params.seed)
                except Exception as e:  # noqa: BLE001 - reported to that client only
                    slot.on_joined(e)
                    continue
                self._join_next = (slot, state)
            slot, state = self._join_next
            if slot.left:
                self._join_next = None
                continue
            if until is not None and time.perf_counter() + self._join_unit_s > until:
                if admitted or self._join_wait < self.join_max_wait_ticks:
                    self._join_wait += 0 if admitted else 1
                    return
            self._join_next, self._join_wait = None, 0
            admitted += 1
            self._join(be, active, slot, state, time.perf_counter())

    def _prompted(self, voice, prompt, seed):
        """The model's prompted state, without the solo-step warm-up (the batch never runs the
        B=1 live step)."""
        return self.model.prompts.state(voice, prompt, seed, warm=False)

    def _prompt_job(self, slot: Slot):
        """A generator preparing `slot`'s prompt state, or None when the model has it cached."""
        prompts = self.model.prompts
        if prompts.ready(slot.voice, slot.text_prompt):
            return None
        return prompts.job(slot.voice, slot.text_prompt, slot.params.seed, warm=False,
                           max_chunk=self.prep_max_chunk)

    def _join(self, be: BatchEngine, active: dict, slot: Slot, state, t0: float) -> None:
        try:
            be.join(slot.id, state, slot.params)
        except Exception as e:  # noqa: BLE001 - reported to that client only
            slot.on_joined(e)
            return
        dt = time.perf_counter() - t0
        self._join_unit_s = max(0.5 * self._join_unit_s + 0.5 * dt, dt, 0.001)
        self.metrics.join_ms.append(dt * 1e3)
        active[slot.id] = slot
        slot.on_joined(None)

    def _prepare(self, be: BatchEngine, active: dict, until: float | None) -> float:
        """Advance the prompt jobs (oldest first) until `until` (perf_counter; None: to the end, no
        session is waiting on a deadline); a finished one joins the batch. Returns the ms spent."""
        t_start = time.perf_counter()
        done = 0
        while self._preparing:
            if until is not None and time.perf_counter() + self._prep_unit_s > until:
                if done or self._prep_wait < self.prep_max_wait_ticks:
                    break
            slot, job = self._preparing[0]
            t0 = time.perf_counter()
            try:
                next(job)
                state = None
            except StopIteration as finished:
                state = finished.value
            except Exception as e:  # noqa: BLE001 - a bad voice file etc.: that client only
                self._preparing.pop(0)
                slot.on_joined(e)
                continue
            dt = time.perf_counter() - t0
            self._prep_unit_s = max(0.5 * self._prep_unit_s + 0.5 * dt, 0.001)
            done += 1
            if state is not None:
                self._preparing.pop(0)
                self.metrics.prompts_prepared += 1
                self._join(be, active, slot, state, t0)
        self._prep_wait = 0 if done or not self._preparing else self._prep_wait + 1
        return (time.perf_counter() - t_start) * 1e3

    def _collect(self, step: int, slack_s: float) -> float:
        """Young-generation collection after a step (a full one every `gc_full_every` steps,
        when there is at least 10 ms of slack). Returns the time it took in ms."""
        t0 = time.perf_counter()
        if step % self.gc_full_every == 0 and slack_s > 0.010:
            gc.collect()
        else:
            gc.collect(0)
        return (time.perf_counter() - t0) * 1e3

    def _run(self) -> None:
        import mlx.core as mx

        threads = self.cpu_blas_threads if mx.default_device() == mx.cpu else None
        if threads is None:
            return self._serve()
        with blas_threads(threads):
            return self._serve()

    def _serve(self) -> None:
        # A (voice, prompt) pair seen for the first time is prepared in the slack between steps
        # (`_prepare`), so its session waits a few ticks longer for the handshake; warm the
        # common ones before serving.
        for voice, prompt in self.warm:
            try:
                self._prompted(voice, prompt, 0)
            except Exception as e:  # noqa: BLE001 - a missing voice only matters when asked for
                log.warning("could not warm the prompt cache for %s / %r: %s", voice, prompt, e)
        be = self.batch = BatchEngine(self.model, compiled=self.compiled, capacity=self.capacity,
                                      fused=self.fused, fused_parts=self.fused_parts, kv_dtype=self.kv_dtype)
        if self.capacity:
            t0 = time.perf_counter()
            # every session's KV rows and GPU kernels now, not mid-call
            be.reserve(progress=lambda d, n: self._progress("compiling the step graphs", d, n, t0))
            self.startup["reserve_s"] = round(time.perf_counter() - t0, 2)
            if self.compiled:
                voice, prompt = self.warm[0] if self.warm else (None, None)
                t0 = time.perf_counter()
                n = be.rehearse(lambda: self._prompted(voice, prompt, 0),
                                progress=lambda d, n: self._progress("rehearsing live steps", d, n, t0))
                self.startup["rehearse_s"] = round(time.perf_counter() - t0, 2)
                log.info("rehearsed %d steps of 1..%d sessions in %.1f s", n, be.cap, self.startup["rehearse_s"])
        # The weights, engine and compiled graphs live as long as the loop: frozen (engine.rt),
        # so collections during the 12.5 Hz loop scan only what the sessions allocate (shorter
        # pauses). Once only: session objects stay collectable.
        # No automatic collections inside a step: the loop collects the young generations itself
        # in the slack after each step (and everything every `gc_full_every` steps).
        gc_was_enabled = gc.isenabled()
        with frozen_heap():
            gc.disable()
            try:
                self._tick_loop(be)
            finally:
                if gc_was_enabled:
                    gc.enable()

    gc_full_every = 750                  # steps (one minute of audio)
    fused: bool | str = "auto"           # BatchEngine(fused=...): the batched CUDA kernels where MLX runs on CUDA
    fused_parts = DEFAULT_FUSED_PARTS    # which of them (BatchEngine(fused_parts=...); see batch.fused_choice)
    kv_dtype = "model"                   # BatchEngine(kv_dtype=...): "model" or "fp8"

    def _wait_until(self, start: float, now: float) -> None:
        """Sleep until `start` (perf_counter); the last `spin_s` of it polls instead, yielding
        the GIL each round, so the loop's core is awake and at speed when the step begins."""
        spin = self.spin_s
        if start - now > spin:
            time.sleep(start - now - spin)
        while spin > 0 and time.perf_counter() < start:
            time.sleep(0)

    def _tick_loop(self, be: BatchEngine) -> None:
        self.ready.set()
        active: dict[int, Slot] = {}
        m, period = self.metrics, self.frame_seconds
        deadline = None
        while not self._stop.is_set():
            # joins in the slack before the next tick (the whole wait when nobody is live)
            self._admit(be, active, None if deadline is None or be.size == 0
                        else deadline - period - self.prep_margin_s)
            if be.size == 0 and self._preparing:
                self.metrics.prep_ms.append(self._prepare(be, active, None))   # nobody is waiting
            if be.size == 0:
                deadline = None
                self._wake.wait(0.1)
                self._wake.clear()
                gc.collect(1)            # automatic collection is off while the loop runs
                continue
            now = time.perf_counter()
            if deadline is None:
                deadline = now + period
            elif now < deadline - period:                # the tick starts one period before its deadline
                self._wait_until(deadline - period, now)
            frames = np.empty((be.size, FRAME), np.float32)
            slots = [active[s] for s in be.slots]
            for r, slot in enumerate(slots):
                slot.inbox.take(frames[r])
            t0, c0 = time.perf_counter(), time.thread_time()
            pcm, text = be.step(frames)
            t1 = time.perf_counter()
            m.step_cpu_ms.append((time.thread_time() - c0) * 1e3)
            m.steps += 1
            m.step_ms.append((t1 - t0) * 1e3)
            m.batch_sizes.append(be.size)
            if t1 > deadline:
                m.misses += 1
                m.miss_steps.append(m.steps - 1)
                m.miss_spans.append((t0, t1))
            for r, slot in enumerate(slots):
                slot.steps += 1
                slot.on_frame(pcm[r], int(text[r]))
            deadline += period
            # Collect in the slack before the next tick, never inside a step; then new prompts.
            m.gc_ms.append(self._collect(m.steps, deadline - period - time.perf_counter()))
            if self._preparing:
                m.prep_ms.append(self._prepare(be, active, deadline - period - self.prep_margin_s))
            # Behind schedule: the next steps run back to back (no sleep) and catch up, as the
            # inboxes hold the frames meanwhile; beyond `max_behind` frames, give up and re-anchor.
            if time.perf_counter() > deadline + self.max_behind * period:
                deadline = time.perf_counter() + period
                m.reanchors += 1
        for sid in list(active):
            be.leave(sid)
