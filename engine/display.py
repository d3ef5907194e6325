"""The live console view of a conversation: transcript lines above one status line.

`Transcript(stream, tty=None, width=80, health_every_s=5.0, pause_s=2.0, clock=time.monotonic)`

- `text(piece, speaker="agent")` appends a text piece (pieces carry their own leading spaces, as
  the model's word pieces do). Lines are wrapped at spaces to `width` columns and labelled with the
  speaker, `agent: ` (and `  you: ` for the user's words, issue 19's ASR transcript); a change of
  speaker or `pause_s` without text (checked in `health` / `tick`) ends the line.
- `health(line)` gives the newest health line. On a terminal it is the one status line below the
  transcript, redrawn in place (ANSI: erase line, cursor up); elsewhere (a pipe or a file) it is
  printed as its own line, prefixed `-- `, at most every `health_every_s` seconds, and no `\\r` or
  escape sequence is ever written.
- `close()` finishes the current line and removes the status line.

No line written is longer than `width` columns: a health line that does not fit is cut and ends
with `~`. `tty=None` asks `stream.isatty()`; on a terminal the width is also capped by the
terminal's own width.
"""
from __future__ import annotations

import shutil
import time
from typing import Callable, TextIO

__all__ = ["Transcript", "LABELS"]

# Speaker -> line label; labels have one width so the text columns line up.
LABELS = {"agent": "agent: ", "you": "  you: "}
_ERASE = "\r\033[K"     # to the start of the line, erase it
_UP = "\033[A"          # cursor one line up


class Transcript:
    def __init__(self, stream: TextIO, tty: bool | None = None, width: int = 80, health_every_s: float = 5.0,
                 pause_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        if tty is None:
            isatty = getattr(stream, "isatty", None)
            tty = bool(isatty and isatty())
        if tty:
            width = min(width, shutil.get_terminal_size((width, 24)).columns)
        self.stream, self.tty, self.width = stream, tty, max(20, int(width))
        self.health_every_s, self.pause_s, self.clock = health_every_s, pause_s, clock
        self._speaker: str | None = None
        self._line = ""                 # the current (unfinished) line's text, without its label
        self._done: list[str] = []      # finished lines not yet written
        self._status: str | None = None
        self._drawn = 0                 # terminal: lines of the live block on screen (partial line, status)
        self._last_text = clock()
        self._last_health: float | None = None
        self.lines_written = 0

    # -- input ---------------------------------------------------------------------------------
    def text(self, piece: str, speaker: str = "agent") -> None:
        if speaker not in LABELS:
            raise ValueError(f"speaker must be one of {sorted(LABELS)}, got {speaker!r}")
        if not piece:
            return
        self._last_text = self.clock()
        if speaker != self._speaker:
            self._end_line()
            self._speaker = speaker
        for i, part in enumerate(piece.split("\n")):
            if i:
                self._end_line()
            self._add(part)
        self._render()

    def health(self, line: str) -> None:
        """The newest health line (call it as often as convenient; printing is throttled here)."""
        now = self.clock()
        self._status = self._fit(line)
        self._end_line_after_pause(now)
        if not self.tty and (self._last_health is None or now - self._last_health >= self.health_every_s):
            self._last_health = now
            self._done.append(self._fit("-- " + line))
        self._render()

    def tick(self) -> None:
        """Ends the current line after `pause_s` without text (for callers without health lines)."""
        if self._end_line_after_pause(self.clock()):
            self._render()

    def close(self) -> None:
        self._end_line()
        self._status = None
        self._render()

    # -- internals -----------------------------------------------------------------------------
    def _room(self) -> int:
        return self.width - len(LABELS[self._speaker or "agent"])

    def _add(self, part: str) -> None:
        if not self._line:
            part = part.lstrip()
        self._line += part
        room = self._room()
        while len(self._line) > room:
            cut = self._line.rfind(" ", 0, room + 1)
            if cut <= 0:                       # one word longer than the line: break it
                head, rest = self._line[:room], self._line[room:]
            else:
                head, rest = self._line[:cut], self._line[cut + 1:]
            self._done.append(LABELS[self._speaker] + head.rstrip())
            self._line = rest.lstrip()

    def _end_line(self) -> bool:
        if not self._line:
            return False
        self._done.append(LABELS[self._speaker] + self._line.rstrip())
        self._line = ""
        return True

    def _end_line_after_pause(self, now: float) -> bool:
        return bool(self._line) and now - self._last_text >= self.pause_s and self._end_line()

    def _fit(self, line: str) -> str:
        line = " ".join(line.split())          # one line, no control characters
        return line if len(line) <= self.width else line[:self.width - 1] + "~"

    def _render(self) -> None:
        out = []
        if self.tty:
            if self._drawn:
                out.append(_ERASE + (_UP + _ERASE) * (self._drawn - 1))
            live = ([LABELS[self._speaker] + self._line] if self._line else []) + \
                ([self._status] if self._status is not None else [])
            out.extend(line + "\n" for line in self._done)
            out.append("\n".join(live))
            self._drawn = len(live)
        else:
            out.extend(line + "\n" for line in self._done)
        self.lines_written += len(self._done)
        self._done.clear()
        text = "".join(out)
        if text:
            self.stream.write(text)
            self.stream.flush()
