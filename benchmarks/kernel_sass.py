"""The rel_attention kernels compiled for an H100 (sm_90) on a machine without a GPU: registers,
stack (spills) and the instructions of each kernel's hot loop, by kind.

Triton carries its own ptxas and cuobjdump, so the machine code a GPU would run can be read
here. The hot loop (the key-block or query-block loop every program repeats) is where each
kernel spends its time; its instruction counts are a static proxy for the kernel's non-tensor-
core work (the softmax, the bias, conversions, addresses), for comparing kernel changes between
GPU sessions. They are not timings: a count says nothing of latency or of how the products and
the rest overlap. "Per score" divides one pass of the loop by the scores each thread owns in it
(BLOCK_M x BLOCK_N / threads): MUFU per score near 1 is one exp2 each, 2 means the tile's layout
has every thread compute its part of the softmax twice (64-row tiles on 8 warps do).
Instruction kinds reported: tensor-core products (``HGMMA`` warpgroup, ``HMMA`` warp), ``MUFU``
(exp2, reciprocals), the float32 pipe (``FFMA FADD FMUL FMNMX FSEL FSETP``) and everything in
the loop (``total``).

    .venv/bin/python benchmarks/kernel_sass.py      # vit_b at 1024 px: 64 x 64, 14 x 14 windows
    .venv/bin/python benchmarks/kernel_sass.py --grids 16x16 --head-dim 80 --dtype fp32

Every tile the autotuner may pick for the grid is compiled (each takes a few seconds); float32
launches one fixed tile, so only that one.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    from scrollsam.model import rel_attention as ra
except ImportError:  # run from a checkout without scrollsam installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from scrollsam.model import rel_attention as ra

KERNELS = ("forward", "backward_kv", "backward_q")
FP32_PIPE = ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)")
# a branch's target address: BRA[.U|.DIV ...] [!]P0 / UR4, ... 0x1f0 (the last operand)
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+(?:[^;]*?,\s*)?0x([0-9a-f]+)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.MULTILINE)


def compile_sm90(kernel: str, grid: tuple[int, int], dtype: str, config: Any,
                 head_dim: int = 64) -> Any:
    """``kernel`` (one of KERNELS) compiled for sm_90 with Triton's own ptxas, as a launch on
    ``grid`` (H, W) tokens with ``dtype`` ("bf16", "fp16" or "fp32") q / k / v and tile
    ``config`` (a triton.Config) would compile it: the 16-byte alignment a launch sees on the
    pointers and the q / k / v strides. Returns Triton's CompiledKernel (``asm["cubin"]``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = _kernel(kernel).fn
    h, w = grid
    block_d, block_d2 = ra.head_parts(head_dim)
    consts = dict(N=h * w, NQ=h * w, H=h, W=w, WP=ra._pow2(w, least=1), D=head_dim,
                  BLOCK_D=block_d, BLOCK_D2=block_d2,
                  PRECISION="ieee" if dtype == "fp32" else "tf32", **config.kwargs)
    pointers = {name: "*fp32" if name in ("LSE", "DELTA") else f"*{dtype}"
                for name in jit.arg_names if name.isupper() and name not in consts}
    signature = {name: "constexpr" if name in consts else pointers.get(name) or (
        "fp32" if name == "scale" else "i32") for name in jit.arg_names}
    aligned = [i for i, name in enumerate(jit.arg_names)  # as a launch specialises them
               if name in pointers or (name[0] == "s" and name[1:2] in "qkv" and len(name) == 3)]
    source = ASTSource(fn=jit, signature=signature, constexprs={
        (jit.arg_names.index(name),): value for name, value in consts.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return ra.triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
        "num_warps": config.num_warps, "num_stages": config.num_stages,
        "enable_fp_fusion": True})  # as rel_attention's launches ask


def _kernel(name: str) -> Any:
    """The autotuned kernel ``name`` (its configs and pruning), or a one-line error."""
    tuned = getattr(ra, f"_{name}", None)  # rel_attention._forward, ...
    if ra.triton is None or type(tuned).__name__ != "Autotuner":
        raise RuntimeError("needs Triton, not under its interpreter (unset TRITON_INTERPRET)")
    return tuned


def tiles(kernel: str, grid: tuple[int, int], dtype: str = "bf16") -> list[Any]:
    """The configs ``kernel``'s autotuner would time on ``grid`` (after its pruning); for
    float32 the one fixed tile it launches instead."""
    tuned = _kernel(kernel)
    pitch = ra._pow2(grid[1], least=1)
    if dtype == "fp32":
        block_m, block_n, warps, stages = ra._untuned(pitch)
        return [ra.triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps,
                                 num_stages=stages)]
    return tuned.early_config_prune(tuned.configs, {}, WP=pitch)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    """cuobjdump's output for ``cubin`` (Triton's own copy of the tool)."""
    tool = Path(ra.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def hot_loop(sass: str) -> collections.Counter:
    """Instruction kinds (opcode without modifiers: ``MUFU.EX2`` -> ``MUFU``) of the longest
    loop in ``sass`` (cuobjdump -sass text; each function's addresses start at 0): the
    instructions from a backward branch's target to the branch. Empty where there is no loop;
    a ValueError for a branch whose target cannot be read (a cuobjdump this does not know)."""
    best: list[tuple[int, str, str]] = []
    for body in _FUNCTION.split(sass)[::2]:  # the text before each header, then each function
        code = [(int(m.group(1), 16), m.group(3), line) for line in body.splitlines()
                if (m := _INSTRUCTION.search(line))]
        for end, (address, op, line) in enumerate(code):
            if op != "BRA":
                continue
            target = _BRANCH_TARGET.search(line)
            if target is None:
                raise ValueError(f"kernel_sass: cannot read the branch target of {line.strip()!r}")
            start = int(target.group(1), 16)
            if start < address:
                loop = [c for c in code[:end + 1] if c[0] >= start]
                best = loop if len(loop) > len(best) else best
    return collections.Counter(op for _, op, _ in best)


def measure(kernel: str, grid: tuple[int, int], dtype: str, config: Any,
            head_dim: int = 64) -> dict:
    """One kernel, grid and tile: registers, stack bytes and its hot loop's counts."""
    cubin = compile_sm90(kernel, grid, dtype, config, head_dim).asm["cubin"]
    usage = re.search(r"REG:(\d+).*?STACK:(\d+)", _cuobjdump(cubin, "--dump-resource-usage"))
    loop = hot_loop(_cuobjdump(cubin, "-sass"))
    scores = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] / (32 * config.num_warps)
    return {"kernel": kernel, "grid": f"{grid[0]}x{grid[1]}", "dtype": dtype,
            "head_dim": head_dim, "tile": f"{config.kwargs['BLOCK_M']}x"
            f"{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}",
            "registers": int(usage.group(1)), "stack": int(usage.group(2)),
            "scores_per_thread": scores,  # of one pass of the loop
            "loop": {"total": sum(loop.values()), "HGMMA": loop["HGMMA"], "HMMA": loop["HMMA"],
                     "MUFU": loop["MUFU"], "fp32": sum(loop[k] for k in FP32_PIPE),
                     **{k: loop[k] for k in FP32_PIPE}},
            "per_score": {"total": sum(loop.values()) / scores, "MUFU": loop["MUFU"] / scores}}


def _grids(text: str) -> list[tuple[int, int]]:
    """"64x64,14x14" -> [(64, 64), (14, 14)]; argparse's one-line error otherwise."""
    grids = []
    for item in text.split(","):
        h, _, w = item.strip().partition("x")
        if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise argparse.ArgumentTypeError(f"expected grids like 64x64,14x14, got {item!r}")
        grids.append((int(h), int(w)))
    return grids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=_grids, default="64x64,14x14",
                        help="token grids HxW: 64x64 = vit_b's global blocks at 1024 px, "
                             "14x14 its windows")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    kernels = args.kernels.split(",")
    if not set(kernels) <= set(KERNELS):
        parser.error(f"--kernels: expected some of {','.join(KERNELS)}, got {args.kernels!r}")
    try:
        tiles(kernels[0], args.grids[0])
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'kernel':<12} {'grid':<6} {'tile':<16} {'regs':>4} {'stack':>5} | per score: "
          f"{'total':>5} {'MUFU':>4} | hot loop: {'total':>5} {'HGMMA':>5} {'HMMA':>4} "
          f"{'MUFU':>4} {'fp32':>4}  " + " ".join(f"{k:>5}" for k in FP32_PIPE))
    for grid in args.grids:
        for kernel in kernels:
            for config in tiles(kernel, grid, args.dtype):
                row = measure(kernel, grid, args.dtype, config, args.head_dim)
                loop = row["loop"]
                per = row["per_score"]
                print(f"{kernel:<12} {row['grid']:<6} {row['tile']:<16} {row['registers']:>4} "
                      f"{row['stack']:>5} |            {per['total']:>5.1f} {per['MUFU']:>4.2f} "
                      f"|            {loop['total']:>5} {loop['HGMMA']:>5} {loop['HMMA']:>4} "
                      f"{loop['MUFU']:>4} {loop['fp32']:>4}  "
                      + " ".join(f"{loop[k]:>5}" for k in FP32_PIPE), flush=True)
                rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"triton": ra.triton.__version__, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
