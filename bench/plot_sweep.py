"""Tick time against rows: a markdown table and an SVG plot from `bench/serve.py` sweep output.

    python bench/plot_sweep.py docs/gpu/2026-12-04b-h200-solo-sweep.txt docs/gpu/2026-12-04f-h200-ring-attention.txt \
        --svg docs/sweep-h200.svg

Each input is a text file holding sweep rows (the JSON lines `bench/serve.py` prints, one per batch
size), each series introduced by a line `## sweep: LABEL`; other lines are ignored. The plot draws
every series' p50 (p99 as a thin band), the 80 ms deadline, and vllm-omni's published lockstep figures
for comparison (its issue #7389: B=8 32.6 ms, B=16 45.0 ms, B=32 70.2 ms; GPU not stated there).
Standard library only, so it runs anywhere the docs are edited.
"""
from __future__ import annotations

import argparse
import json
import sys

PEER = ("vllm-omni lockstep (published)", {8: 32.6, 16: 45.0, 32: 70.2})
DEADLINE_MS = 80.0
COLOURS = ("#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a")


def read_series(path: str) -> dict[str, dict[int, tuple[float, float]]]:
    """{label: {rows: (p50, p99)}} in file order."""
    series: dict[str, dict[int, tuple[float, float]]] = {}
    label = None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("## sweep:"):
                label = line.split(":", 1)[1].strip()
                series.setdefault(label, {})
            elif line.startswith("## "):
                label = None
            elif label is not None and line.startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: not a JSON sweep row ({e}); fix or remove the line")
                if "batch" in row:
                    series[label][int(row["batch"])] = (float(row["p50_ms"]), float(row["p99_ms"]))
    if not any(series.values()):
        raise SystemExit(f"{path}: no sweep rows found; each series needs a '## sweep: LABEL' line "
                         "followed by bench/serve.py's JSON rows")
    return series


def table(series) -> str:
    rows = sorted({b for s in series.values() for b in s} | set(PEER[1]))
    head = "| rows | " + " | ".join(series) + f" | {PEER[0]} |"
    lines = [head, "|---:|" + "---:|" * (len(series) + 1)]
    for b in rows:
        cells = [f"{s[b][0]:.1f} / {s[b][1]:.1f}" if b in s else "" for s in series.values()]
        peer = PEER[1].get(b)
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {peer if peer is not None else ''} |")
    return "\n".join(lines)


def svg(series, title: str) -> str:
    W, H, left, right, top, bottom = 720, 420, 60, 250, 40, 50
    xs = sorted({b for s in series.values() for b in s} | set(PEER[1]))
    xmax = max(xs)
    ymax = max([DEADLINE_MS] + [p99 for s in series.values() for _, p99 in s.values()]) * 1.08
    ymax = 20 * -(-ymax // 20)

    def px(b):
        return left + (W - left - right) * b / xmax

    def py(ms):
        return H - bottom - (H - top - bottom) * ms / ymax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">{title}</text>']
    for ms in range(0, int(ymax) + 1, 20):                          # y grid
        out.append(f'<line x1="{left}" y1="{py(ms):.1f}" x2="{W - right}" y2="{py(ms):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 8}" y="{py(ms) + 4:.1f}" text-anchor="end">{ms}</text>')
    for b in xs:                                                    # x ticks
        out.append(f'<text x="{px(b):.1f}" y="{H - bottom + 18}" text-anchor="middle">{b}</text>')
    out.append(f'<text x="{(left + W - right) / 2}" y="{H - 10}" text-anchor="middle">rows (sessions)</text>')
    out.append(f'<text x="16" y="{(top + H - bottom) / 2}" transform="rotate(-90 16 {(top + H - bottom) / 2})" '
               f'text-anchor="middle">tick ms (p50; band to p99)</text>')
    out.append(f'<line x1="{left}" y1="{py(DEADLINE_MS):.1f}" x2="{W - right}" y2="{py(DEADLINE_MS):.1f}" '
               f'stroke="black" stroke-dasharray="6 4"/>')
    legend = [("80 ms deadline", "black", "6 4")]
    for (label, s), colour in zip(series.items(), COLOURS):
        pts = sorted(s.items())
        band = [(px(b), py(p99)) for b, (_, p99) in pts] + [(px(b), py(p50)) for b, (p50, _) in reversed(pts)]
        out.append('<polygon points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in band)
                   + f'" fill="{colour}" fill-opacity="0.25"/>')
        out.append('<polyline points="' + " ".join(f"{px(b):.1f},{py(p50):.1f}" for b, (p50, _) in pts)
                   + f'" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(b):.1f}" cy="{py(p50):.1f}" r="3" fill="{colour}"/>' for b, (p50, _) in pts]
        legend.append((label, colour, ""))
    peer = sorted(PEER[1].items())
    out.append('<polyline points="' + " ".join(f"{px(b):.1f},{py(ms):.1f}" for b, ms in peer)
               + '" fill="none" stroke="#9467bd" stroke-width="2" stroke-dasharray="2 3"/>')
    out += [f'<rect x="{px(b) - 3:.1f}" y="{py(ms) - 3:.1f}" width="6" height="6" fill="#9467bd"/>' for b, ms in peer]
    legend.append((PEER[0], "#9467bd", "2 3"))
    for i, (label, colour, dash) in enumerate(legend):              # legend, right of the plot
        y = top + 10 + 20 * i
        out.append(f'<line x1="{W - right + 15}" y1="{y}" x2="{W - right + 40}" y2="{y}" stroke="{colour}" '
                   f'stroke-width="2"' + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
        out.append(f'<text x="{W - right + 46}" y="{y + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="text files with '## sweep: LABEL' lines and bench/serve.py JSON rows "
                                             "(series in file order)")
    ap.add_argument("--svg", help="write the plot here")
    ap.add_argument("--title", default="Batched tick on one H200, 7B shapes, 4-bit (bench/serve.py)")
    args = ap.parse_args()
    series = {}
    for path in args.paths:
        for label, rows in read_series(path).items():
            series.setdefault(label, {}).update(rows)
    print(table(series))
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg(series, args.title))
        print(f"wrote {args.svg}", file=sys.stderr)


if __name__ == "__main__":
    main()
