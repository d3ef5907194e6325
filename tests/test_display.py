"""engine.display.Transcript: wrapped transcript lines, one status line, pipe-friendly output."""
from __future__ import annotations

import io

import pytest

from engine.display import LABELS, Transcript
from engine.session import SessionStats

WORDS = ("the quick brown fox jumps over the lazy dog while a very patient engineer watches "
         "its realtime loop print every word exactly once ").split()


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def pieces(n_words):
    """Word pieces as the model emits them: a leading space, some words split in two pieces."""
    out = []
    for i in range(n_words):
        w = WORDS[i % len(WORDS)]
        if len(w) > 4 and i % 3 == 0:
            out += [" " + w[:3], w[3:]]
        else:
            out.append(" " + w)
    return out


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: applies \\r, erase-line and cursor-up."""
    rows, r, c = [""], 0, 0
    i = 0
    while i < len(raw):
        if raw.startswith("\033[K", i):
            rows[r] = rows[r][:c]
            i += 3
        elif raw.startswith("\033[A", i):
            r = max(0, r - 1)
            i += 3
        elif raw[i] == "\r":
            c = 0
            i += 1
        elif raw[i] == "\n":
            r, c = r + 1, 0
            if r == len(rows):
                rows.append("")
            i += 1
        else:
            line = rows[r]
            rows[r] = line[:c].ljust(c) + raw[i] + line[c + 1:]
            c += 1
            i += 1
    return rows


def test_pipe_wrapped_lines_and_periodic_health():
    clock, buf = Clock(), io.StringIO()
    t = Transcript(buf, tty=False, width=80, health_every_s=5.0, pause_s=2.0, clock=clock)
    stats = SessionStats(frames=100, step_ms_p50=12.3, step_ms_p99=45.6, capture_fill=1920, playback_fill=3840)
    sent = pieces(60)
    for k, p in enumerate(sent):
        clock.t = k * 0.25                     # a word piece every 250 ms: 15 s of speech
        t.text(p)
        t.health(f"{clock.t:.1f} s | " + stats.health_line())
    t.close()
    out = buf.getvalue()
    assert "\r" not in out and "\033" not in out
    lines = out.splitlines()
    health = [ln for ln in lines if ln.startswith("-- ")]
    said = [ln for ln in lines if ln.startswith("agent: ")]
    assert len(health) + len(said) == len(lines)
    # one health line at the start, then one every 5 s of the run
    last = (len(sent) - 1) * 0.25
    assert last > 15 and [h.split(" s |")[0] for h in health] == [f"-- {5.0 * i:.1f}" for i in range(int(last // 5) + 1)]
    assert all(h.endswith("step 12.3/45.6 ms | mic 80 out 160 ms | no misses, no losses") for h in health)
    assert all(len(ln) <= 80 for ln in lines)
    assert len(said) >= 5 and all(len(ln) > 60 for ln in said[:-1])     # filled, then wrapped
    # every word exactly once, in order, none broken across lines
    text = " ".join(ln[len("agent: "):] for ln in said)
    assert text == "".join(sent).strip()


def test_pause_ends_the_line_and_speakers_get_their_own_lines():
    clock, buf = Clock(), io.StringIO()
    t = Transcript(buf, tty=False, clock=clock, pause_s=2.0)
    t.text(" hello")
    t.text(" there")
    clock.t = 1.0
    t.tick()
    assert buf.getvalue() == ""                # still the same sentence
    clock.t = 3.5
    t.tick()
    assert buf.getvalue() == "agent: hello there\n"
    t.text(" what's up", speaker="you")
    t.text(" not much")                       # the agent again: the user's line ends
    t.close()
    assert buf.getvalue().splitlines() == ["agent: hello there", "  you: what's up", "agent: not much"]
    assert len(set(map(len, LABELS.values()))) == 1
    with pytest.raises(ValueError, match="speaker"):
        t.text("x", speaker="narrator")


def test_long_word_and_newline_pieces():
    buf = io.StringIO()
    t = Transcript(buf, tty=False, width=30)
    t.text(" " + "x" * 50 + " end\nnext")
    t.close()
    lines = buf.getvalue().splitlines()
    assert lines == ["agent: " + "x" * 23, "agent: " + "x" * 23, "agent: xxxx end", "agent: next"]


def test_terminal_status_line_stays_below_the_transcript():
    clock, buf = Clock(), io.StringIO()
    t = Transcript(buf, tty=True, width=80, clock=clock)
    t.width = 80                               # the test's terminal: 80 columns whatever runs pytest
    long_stats = SessionStats(frames=10**6, step_ms_p50=1234.5, step_ms_p99=99999.9, deadline_misses=123456,
                              capture_fill=10**7, playback_fill=10**7, playback_underrun=10**9,
                              capture_overflow=10**9, dropped_input_frames=10**6)
    sent = pieces(40)
    for k, p in enumerate(sent):
        clock.t = k * 0.25
        t.text(p)
        t.health(f"{clock.t:.1f} s | " + long_stats.health_line())
        rows = screen(buf.getvalue())
        status = rows[-1]
        assert status.startswith(f"{clock.t:.1f} s | step ") and len(status) == 80 and status.endswith("~")
        shown = [r for r in rows[:-1] if r]
        assert all(r.startswith("agent: ") and len(r) <= 80 for r in shown)
        assert " ".join(r[7:] for r in shown) == "".join(sent[:k + 1]).strip()   # live, word by word
    t.close()
    rows = screen(buf.getvalue())
    assert rows[-1] == ""                      # status gone, cursor on a fresh line for the summary
    said = [r for r in rows if r]
    assert len(said) >= 3 and " ".join(r[7:] for r in said) == "".join(sent).strip()


def test_health_line_fits_in_80_columns_with_time():
    st = SessionStats(frames=7500, step_ms_p50=9.7, step_ms_p99=71.3, deadline_misses=12, capture_fill=1920,
                      playback_fill=3840, playback_underrun=4800, capture_overflow=0, dropped_input_frames=3)
    line = "-- 600 s | " + st.health_line()
    assert len(line) <= 80, line
    assert line.endswith("step 9.7/71.3 ms | mic 80 out 160 ms | miss 12 underrun 4800 drop 3")
    assert SessionStats(step_ms_p50=5, step_ms_p99=6).health_line() == \
        "step 5.0/6.0 ms | mic 0 out 0 ms | no misses, no losses"
