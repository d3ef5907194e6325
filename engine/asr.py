"""Optional transcript of what the user said: utterances cut by the VAD, recognized in another process.

The engine's model work owns one thread (engine/worker.py) and the 12.5 Hz loop must never wait,
so speech recognition runs in a separate process with its own MLX (`Recognizer`, `python -m
engine.asr`): utterance audio goes to it over a socket pair (written by a sender thread, so a busy
process never blocks the caller), text comes back the same way, and the loop only hands over and
polls. On a CPU the process runs at a lower priority (`nice`) with few BLAS threads, so the loop
keeps the cores it needs.

- `UtteranceCutter` (engine.audio.vad) turns the stream the model heard (after echo cancellation)
  into utterances where the webrtcvad endpointer of the turn-based mode (`Endpointer`) says a turn
  started and ended; an utterance longer than `max_seconds` is cut there (counted).
- `Recognizer(model)`: the recognizer process. `model` is a Hugging Face repo id (default
  `Qwen/Qwen3-ASR-0.6B`, downloaded through huggingface_hub into its cache like the main model),
  a local directory with the repository's files, or "tiny" (random weights, built locally by
  engine.tiny_asr: nonsense text, for tests). The backend is mlx-qwen3-asr (docs/asr.md says why).
- Errors: the `asr` extra missing -> `MissingLibraryError` naming `pip install -e ".[asr]"`; the
  model missing -> `ModelNotFound` (hub errors mapped like the main model's); the process failing
  to load it -> `EngineError` with its message.
"""
from __future__ import annotations

import importlib.util
import itertools
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio.vad import Utterance, UtteranceCutter
from .errors import ConfigError, CorruptCheckpoint, EngineError, MissingLibraryError, ModelNotFound

__all__ = ["DEFAULT_ASR_REPO", "Utterance", "Transcript", "UtteranceCutter", "Recognizer",
           "resolve_asr_model", "check_asr_installed"]

DEFAULT_ASR_REPO = "Qwen/Qwen3-ASR-0.6B"
ASR_RATE = 16000          # what the recognizer takes
STREAM_RATE = 24000       # what the engine hears
_BACKEND = "mlx_qwen3_asr"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]
_NEEDED = ("config.json", "vocab.json", "merges.txt")


# ----------------------------------------------------------------------------------------------
# Install and model checks (caller's thread; no MLX)
# ----------------------------------------------------------------------------------------------
def check_asr_installed() -> None:
    """Raise MissingLibraryError naming the fix when the recognizer backend is not installed."""
    if importlib.util.find_spec(_BACKEND) is None:
        raise MissingLibraryError(
            "the user transcript (--asr) needs the speech recognizer backend mlx-qwen3-asr, which is not "
            "installed: `pip install -e \".[asr]\"` in the engine's checkout (or `pip install "
            "'personaplex-engine[asr]'`)")


def _check_dir(root: Path, source: str) -> Path:
    missing = [n for n in _NEEDED if not (root / n).is_file()]
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        missing.append("model.safetensors (or model-*-of-*.safetensors)")
    if missing:
        raise ModelNotFound(
            f"speech recognizer {source}: {root} lacks {', '.join(missing)}. A recognizer directory holds "
            f"the files of https://huggingface.co/{DEFAULT_ASR_REPO} (config.json, the safetensors "
            "weights, vocab.json, merges.txt, tokenizer_config.json).")
    from .hub import check_safetensors
    for w in weights:
        check_safetensors(w)
    return root


def resolve_asr_model(model: str | os.PathLike = DEFAULT_ASR_REPO, *, offline: bool | None = None,
                      progress: bool = True, cache_dir=None, token=None, revision=None) -> Path:
    """The local directory of a recognizer: "tiny" (built locally), a directory, or a hub repo id
    (downloaded into the Hugging Face cache; `offline`/HF_HUB_OFFLINE=1: the cache only).

    Raises: ModelNotFound, GatedModelError, NetworkError, CorruptCheckpoint (as `hub.resolve_model`)."""
    from . import hub

    if str(model) == "tiny":
        from .tiny_asr import ensure_tiny_asr
        return _check_dir(ensure_tiny_asr(), "tiny")
    path = Path(model).expanduser()
    if path.is_dir():
        return _check_dir(path, str(model))
    if path.exists() or isinstance(model, os.PathLike) or not hub._REPO_ID.match(str(model)):
        raise ModelNotFound(f"speech recognizer {model!s} is neither a local directory with the model's "
                            f"files nor a Hugging Face repo id (owner/name, e.g. {DEFAULT_ASR_REPO}), "
                            "nor 'tiny'")
    import huggingface_hub as hh

    offline = hub._env_offline() if offline is None else offline
    quiet = {} if progress else {"tqdm_class": hub._silent_tqdm()}
    try:
        root = Path(hh.snapshot_download(str(model), allow_patterns=_HUB_PATTERNS, revision=revision,
                                         cache_dir=cache_dir, token=token, local_files_only=offline,
                                         **quiet))
    except Exception as exc:
        raise hub._map_hub_error(exc, "the recognizer's files", repo=str(model), offline=offline,
                                 token=token, cache_dir=cache_dir, default=DEFAULT_ASR_REPO) from exc
    try:
        return _check_dir(root, str(model))
    except CorruptCheckpoint as exc:
        raise CorruptCheckpoint(f"{exc} To fetch it again: `hf download {model} --force-download`.") from None


# ----------------------------------------------------------------------------------------------
# Transcripts
# ----------------------------------------------------------------------------------------------
@dataclass
class Transcript:
    """What the recognizer heard in one utterance. `recognize_s`: the recognizer's own time;
    `latency_s`: from handing the utterance over to its text being read back."""

    index: int
    start_s: float
    end_s: float
    text: str
    recognize_s: float = 0.0
    latency_s: float = 0.0
    error: str | None = None


# ----------------------------------------------------------------------------------------------
# The recognizer process
# ----------------------------------------------------------------------------------------------
def load_backend(model_dir: str):
    """An mlx-qwen3-asr `Session` for MLX's default device: float16 on a GPU, float32 on the CPU.
    (The backend keeps a checkpoint's own dtype when asked for float32, and MLX's CPU backend has
    no fast half-precision matrix products: half-precision weights ran ~7x slower there.)"""
    import mlx.core as mx
    from mlx_qwen3_asr import Session

    if mx.default_device() != mx.cpu:
        return Session(model=model_dir, dtype=mx.float16)
    session = Session(model=model_dir, dtype=mx.float32)
    model = session.model
    model.set_dtype(mx.float32)
    text_cfg = model.config.text_config if getattr(model, "config", None) is not None else None
    if text_cfg is not None and text_cfg.tie_word_embeddings and not hasattr(model.lm_head, "scales"):
        model.lm_head.weight = model.model.embed_tokens.weight       # one copy, as the backend keeps it
    mx.eval(model.parameters())
    return session


def _serve(conn, model_dir: str, language: str | None, device: str, nice: int, threads: int,
           max_new_tokens: int | None) -> None:
    """Child process: load the model, then transcribe utterances until told to stop (None) or the
    parent is gone (its end of the connection closes). Every MLX call of the recognizer runs here,
    on this process's main thread."""
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    try:
        from . import _blas
        if threads > 0 and _blas._handle is not None and hasattr(_blas._handle, "openblas_set_num_threads"):
            _blas._handle.openblas_set_num_threads(int(threads))
        import mlx.core as mx

        from .audio.resample import resample

        if device == "cpu":
            mx.set_default_device(mx.cpu)
        t0 = time.perf_counter()
        session = load_backend(model_dir)
        opts = dict(language=language, max_new_tokens=max_new_tokens)
        session.transcribe(np.zeros(ASR_RATE // 2, np.float32), **opts)   # warm-up
        conn.send(("ready", {"load_s": time.perf_counter() - t0, "device": str(mx.default_device())}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed_to_load", f"{type(exc).__name__}: {' '.join(str(exc).split())}"))
        return
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        job_id, audio, rate = job
        t = time.perf_counter()
        try:
            x = audio if rate == ASR_RATE else resample(audio, rate, ASR_RATE)
            text = session.transcribe(np.asarray(x, np.float32), **opts).text.strip()
            conn.send(("text", job_id, text, time.perf_counter() - t))
        except Exception as exc:  # noqa: BLE001 - one bad utterance must not end the transcript
            conn.send(("error", job_id, f"{type(exc).__name__}: {exc}", time.perf_counter() - t))


def _child_main(argv: list[str]) -> int:
    """`python -m engine.asr FD JSON`: the recognizer process (started by `Recognizer`)."""
    import json
    import signal
    from multiprocessing.connection import Connection

    # Ctrl-C in the terminal reaches the whole process group: the parent decides when this ends
    # (close(), or its end of the connection closing), so the transcripts due can still come back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    try:
        _serve(conn, **json.loads(argv[1]))
    finally:
        conn.close()
    return 0


class Recognizer:
    """A speech recognizer in its own process (see the module docstring).

    Args:
        model: DEFAULT_ASR_REPO, another repo id, a local directory, or "tiny".
        language: forced language name for the recognizer ("English"; None lets it detect).
        device: "auto" (MLX's default device in the child: the GPU where there is one) or "cpu".
        nice: priority decrease of the child process (on a CPU it then yields to the loop).
        threads: BLAS threads of the child (0: the library's default); default half the cores.
        max_pending: utterances waiting for recognition beyond this are dropped (counted).
        max_new_tokens: cap on the tokens of one transcript (None: the backend's, from the length).
        wait: block until the model is loaded (raises its load error here); else call `wait_ready()`.
        offline, progress: as for the main model's download.

    `submit(audio)` returns a job id at once; `result(job_id, timeout)` gives the `Transcript` when
    it is there. Safe to use from several threads. `close()` stops the process.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_ASR_REPO, *, language: str | None = "English",
                 device: str = "auto", nice: int = 10, threads: int | None = None, max_pending: int = 8,
                 max_new_tokens: int | None = None,
                 wait: bool = True, ready_timeout: float = 300.0, offline: bool | None = None,
                 progress: bool = True):
        if device not in ("auto", "cpu"):
            raise ConfigError(f"recognizer device={device!r}: use 'auto' or 'cpu'")
        if max_pending < 1:
            raise ConfigError(f"max_pending={max_pending}: must be >= 1")
        check_asr_installed()
        self.model = str(model)
        self.model_dir = resolve_asr_model(model, offline=offline, progress=progress)
        self.max_pending = int(max_pending)
        self.ready_timeout = float(ready_timeout)
        if threads is None:
            threads = max(1, (os.cpu_count() or 2) // 2)
        # A fresh interpreter (not multiprocessing's spawn, which re-imports the caller's main
        # script), connected by a socket pair; it never shares MLX or threads with this process.
        import json
        import subprocess
        import sys

        ours, theirs = mp.Pipe(duplex=True)
        args = dict(model_dir=str(self.model_dir), language=language, device=device, nice=int(nice),
                    threads=int(threads), max_new_tokens=max_new_tokens)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine.asr", str(theirs.fileno()), json.dumps(args)],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        self._conn = ours
        self._outbox: "queue.Queue" = queue.Queue()
        # Sends happen on a thread of their own: a busy child lets its socket fill up, and the
        # caller (the 12.5 Hz loop) must never wait for that.
        self._sender = threading.Thread(target=self._send_loop, name="asr-send", daemon=True)
        self._sender.start()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._sent: dict[int, float] = {}       # job id -> perf_counter at submit
        self._done: dict[int, Transcript] = {}
        self._discarded: set[int] = set()
        self._meta: dict[int, tuple[int, float, float]] = {}
        self.ready = False
        self.info: dict = {}
        self.error: str | None = None
        self.submitted = self.completed = self.failed = self.dropped = 0
        if wait:
            self.wait_ready()

    # -- lifecycle -----------------------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> "Recognizer":
        """Block until the child has loaded the model; raise EngineError with its error if it failed."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while not self.ready:
            with self._lock:
                self._collect()
            if self.error is not None:
                where = "" if Path(self.model) == self.model_dir else f" ({self.model_dir})"
                raise EngineError(f"the speech recognizer could not load {self.model}{where}: {self.error}. "
                                  "Are the files complete and of a Qwen3-ASR model?")
            if not self.ready:
                if time.monotonic() >= deadline:
                    raise EngineError(f"the speech recognizer did not load {self.model} within "
                                      f"{self.ready_timeout:.0f} s")
                time.sleep(0.02)
        return self

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def pending(self) -> int:
        return len(self._sent)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the process (it finishes the utterance in hand first, up to `timeout`)."""
        import subprocess

        self._outbox.put(None)
        self._sender.join(timeout)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(timeout)
        with self._lock:
            self._conn.close()

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            try:
                self._conn.send(item)
            except (OSError, ValueError):     # the child is gone: result() reports its jobs
                return
            if item is None:
                return

    def __enter__(self) -> "Recognizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, audio, sample_rate: int = STREAM_RATE, *, index: int = 0, start_s: float = 0.0,
               end_s: float | None = None) -> int | None:
        """Queue one utterance (mono float audio); returns its job id, or None when `max_pending`
        utterances are already waiting (the utterance is dropped and counted). Never blocks."""
        x = np.ascontiguousarray(np.asarray(audio, np.float32).reshape(-1))
        with self._lock:
            if len(self._sent) >= self.max_pending or not self.alive:
                self.dropped += 1
                return None
            job = next(self._ids)
            self._sent[job] = time.perf_counter()
            self._meta[job] = (index, start_s, x.size / sample_rate + start_s if end_s is None else end_s)
            self.submitted += 1
        self._outbox.put((job, x, int(sample_rate)))
        return job

    def result(self, job: int, timeout: float = 0.0) -> Transcript | None:
        """The transcript of job `job`, waiting up to `timeout` seconds; None if not there yet.
        A job lost with the process comes back as a Transcript with `error` set."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._collect()
                if job in self._done:
                    return self._done.pop(job)
                if job not in self._sent:
                    raise ConfigError(f"unknown recognizer job {job!r}")
                if not self.alive:
                    self._collect()
                    if job in self._done:
                        return self._done.pop(job)
                    self._finish(job, "", 0.0, f"the recognizer process exited (code {self._proc.returncode})")
                    return self._done.pop(job)
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until the process has answered every job handed to it (discarded ones too);
        returns whether it did within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._collect()
                if not self._sent or not self.alive:
                    return not self._sent
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def discard(self, job: int | None) -> None:
        """The caller no longer wants job `job`'s transcript: it is dropped when it arrives."""
        if job is None:
            return
        with self._lock:
            if self._done.pop(job, None) is None and job in self._sent:
                self._discarded.add(job)

    def transcribe(self, audio, sample_rate: int = STREAM_RATE, timeout: float = 60.0) -> str:
        """Blocking convenience: the text of one utterance (raises EngineError on failure)."""
        job = self.submit(audio, sample_rate)
        if job is None:
            raise EngineError("the speech recognizer is busy or stopped: utterance dropped")
        tr = self.result(job, timeout)
        if tr is None:
            raise EngineError(f"no transcript within {timeout:.0f} s")
        if tr.error:
            raise EngineError(f"speech recognition failed: {tr.error}")
        return tr.text

    # -- internals (hold self._lock) -----------------------------------------------------------
    def _finish(self, job: int, text: str, secs: float, error: str | None) -> None:
        t_sent = self._sent.pop(job, None)
        index, start_s, end_s = self._meta.pop(job, (0, 0.0, 0.0))
        latency = time.perf_counter() - t_sent if t_sent is not None else 0.0
        if job in self._discarded:
            self._discarded.discard(job)
        else:
            self._done[job] = Transcript(index, start_s, end_s, text, secs, latency, error)
        if error is None:
            self.completed += 1
        else:
            self.failed += 1

    def _collect(self) -> None:
        """Read every message that is there (never waits: callers sleep outside the lock)."""
        while True:
            try:
                msg = self._conn.recv() if self._conn.poll(0) else None
            except (EOFError, OSError):
                msg = None
            if msg is None:
                if not self.ready and self.error is None and not self.alive:
                    self.error = f"the recognizer process exited (code {self._proc.returncode}) while loading"
                return
            kind = msg[0]
            if kind == "ready":
                self.ready, self.info = True, msg[1]
            elif kind == "failed_to_load":
                self.error = msg[1]
            elif kind == "text":
                self._finish(msg[1], msg[2], msg[3], None)
            elif kind == "error":
                self._finish(msg[1], "", msg[3], msg[2])

if __name__ == "__main__":
    import sys
    sys.exit(_child_main(sys.argv[1:]))
