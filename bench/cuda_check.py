"""Compile the fused LM kernels with nvcc, no GPU needed: errors, registers, spills, and whether a
block of 512 / 256 threads can launch (an SM has 65536 registers).

    python bench/cuda_check.py                  # every kernel, the 7B shapes at 4-bit with bf16 heads
    python bench/cuda_check.py depformer_rows   # one kernel
    python bench/cuda_check.py --float32        # float32 dense weights (what the GPU tests use)

`mx.fast.cuda_kernel` wraps a body in a kernel whose parameters are the inputs (`const T*`) and
outputs (`T*`) and whose template constants are set per call; this does the same with constexpr
values (PersonaPlex 7B, 4-bit layers, bf16 heads and tables), so a body that compiles here compiles
there. Registers: MLX launches with the threads per block that engine/models/fused.py picks, and a
kernel using more than 65536 / threads registers per thread does not launch ("too many resources
requested"), which on the H100 is what the 512-thread batched depformer did (154 registers).
Exit status 1 when a kernel does not compile.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "engine" / "models" / "cuda"
T = "__nv_bfloat16"
U = "uint32_t"
F = "float"
I = "int32_t"

_DEP = dict(D=4096, DD=1024, NH=16, LD=6, HIDD=2816, CARD=2048, NS=8, NSIN=16, NSL=16, BD=4, BE=16, BHD=16,
            GS=64, NSORT=2048, NT=512)
_DEP_W = [("win", U), ("sin_", T), ("bin", T), ("tew", T), ("tes", T), ("teb", T), ("ew", T), ("es", T),
          ("eb", T), ("qw", U), ("qs", T), ("qb", T), ("ow", U), ("os", T), ("ob", T), ("iw", U), ("is", T),
          ("ib", T), ("dw", U), ("ds", T), ("db", T), ("dn1", T), ("dn2", T), ("lw", T), ("ls", T), ("lb", T),
          ("fp", F)]
KERNELS = {
    "temporal": (dict(D=4096, H=32, HD=128, L=32, C=3000, HID=11264, TXT=32000, BT=4, BH=16, GS=64, NCH=4, NT=512),
                 [("x0", T), ("kv", T), ("pos", I), ("offs", I), ("wq", U), ("sq", T), ("bq", T), ("wo", U),
                  ("so", T), ("bo", T), ("wi", U), ("si", T), ("bi_", T), ("wd", U), ("sd", T), ("bd", T),
                  ("n1", T), ("n2", T), ("onorm", T), ("wt", T), ("st", T), ("bt", T), ("fp", F)],
                 [("h", F), ("logits", F), ("scratch", F)]),
    "depformer": (dict(_DEP, TOPK=250, GREEDY="false"), [("h", F), ("ttok", I), ("noise", F)] + _DEP_W,
                  [("toks", I), ("scratch", F)]),
    "depformer_rows": (dict(_DEP, NB=8), [("h", F), ("meta", I), ("ttok", I), ("forced", I), ("temp", F),
                                           ("topk", I), ("noise", F)] + _DEP_W,
                       [("toks", I), ("scratch", F)]),
    "ring_attn_part": (dict(H=32, HD=128, C=3000, CH=256, NT=256),
                       [("q", T), ("k", T), ("v", T), ("pos", I), ("sc", F)], [("part", F)]),
    "ring_attn_combine": (dict(HD=128, NCK=12), [("part", F)], [("o", T)]),
    # the same body over fp8 e4m3 rings (BatchEngine(kv_dtype="fp8")): the keys and values as bytes
    "ring_attn_part_fp8": (dict(H=32, HD=128, C=3000, CH=256, NT=256),
                           [("q", T), ("k", "uint8_t"), ("v", "uint8_t"), ("pos", I), ("sc", F)], [("part", F)]),
}


def body(name: str) -> str:
    """The kernel body as engine/models/fused.py hands it to MLX."""
    return (SRC / f"{name.removesuffix('_fp8')}.cu").read_text()


def source(name: str, float32: bool = False) -> str:
    consts, ins, outs = KERNELS[name]
    t_model = T
    if float32:   # dense float32 model: every matrix 32 "bits", weights and scales float
        t_model = F
        consts = {k: (32 if k in ("BD", "BE", "BHD", "BT", "BH") else v) for k, v in consts.items()}
        ins = [(n, F if t in (T, U) else t) for n, t in ins]
    params = [f"const {t}* __restrict__ {n}" for n, t in ins] + [f"{t}* __restrict__ {n}" for n, t in outs]
    defs = "".join(f"constexpr {'bool' if v in ('true', 'false') else 'int'} {k} = {v};\n" for k, v in consts.items())
    header = (SRC / "common.cuh").read_text().replace("#pragma once", "")
    return (f"#include <cstdint>\n{header}\nusing T = {t_model};\n{defs}"
            f"__global__ void {name}_check({', '.join(params)}) {{\n{body(name)}\n}}\n")


def check(name: str, nvcc: str, float32: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / f"{name}.cu"
        cu.write_text(source(name, float32))
        p = subprocess.run([nvcc, "-arch=sm_90", "-c", str(cu), "-o", str(Path(d) / "k.o"), "-Xptxas", "-v"],
                           capture_output=True, text=True)
    out = p.stdout + p.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {"kernel": name, "ok": p.returncode == 0, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else None,
            "errors": [line for line in out.splitlines() if "error" in line][:10]}


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: install the CUDA toolkit (or run on the device)", file=sys.stderr)
        return 2
    args = sys.argv[1:]
    float32 = "--float32" in args
    names = [a for a in args if a != "--float32"] or list(KERNELS)
    bad = [n for n in names if n not in KERNELS]
    if bad:
        print(f"unknown kernel(s) {bad}; known: {list(KERNELS)}", file=sys.stderr)
        return 2
    failed = False
    for n in names:
        r = check(n, nvcc, float32)
        failed |= not r["ok"]
        if r["ok"]:
            fits = [t for t in (512, 256) if r["registers"] * t <= 65536]
            print(f"{n}: {r['registers']} registers, {r['spill_bytes']} bytes spilled; launches with "
                  f"{' or '.join(map(str, fits)) if fits else 'neither 512 nor 256'} threads per block")
        else:
            print(f"{n}: does not compile")
            for line in r["errors"]:
                print("  ", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
