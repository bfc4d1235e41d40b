"""Run scrollsam's benchmarks, print the table and write ``benchmarks/results.json``.

    .venv/bin/python benchmarks/run.py                      # everything (what `make bench` runs)
    .venv/bin/python benchmarks/run.py --only decode_batched_vs_loop,encoder_256_vs_upsampled_1024
    .venv/bin/python benchmarks/run.py --quick              # smoke run: seconds-to-minutes
    .venv/bin/python benchmarks/run.py --list
    python3 benchmarks/run.py --only 'gpu_*'               # a GPU machine with torch, no network

Entries live one file each in ``benchmarks/bench_*.py`` and register themselves with
``common.register``; this script imports every such file, so adding an entry is adding a file
(see ``common.py``). On a CUDA machine the GPU entries (``bench_gpu.py``) run too; on a CPU-only
machine they are listed as skipped.

Results are merged into the JSON file as each entry ends, so a run killed part-way keeps what it
measured: entries this run measured replace their old values, the others (a subset run with
``--only``, GPU entries skipped on a CPU machine) are kept, each with the ``measured_on`` stamp
of the run that produced it. ``--quick`` numbers are not publishable,
so a quick run writes ``benchmarks/_work/results-quick.json`` unless ``--out`` says otherwise.

Exit status: 0 when every entry that ran met its goal, 1 when one failed its goal or raised.
"""

from __future__ import annotations

# Benchmarks run with OpenMP's default wait policy (the machine block records it): passive
# waiting, which the CLI chooses for robustness on shared CPUs, makes the per-set official loop
# about 2x slower on an idle CPU and would flatter the batched-vs-loop ratios.
import argparse
import fnmatch
import gc
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch


def load_entries() -> dict[str, common.Benchmark]:
    """Import every ``bench_*.py`` next to this file; each registers its entries."""
    sys.path.insert(0, str(common.BENCH_DIR))
    for path in sorted(common.BENCH_DIR.glob("bench_*.py")):
        importlib.import_module(path.stem)
    return common.REGISTRY


def run_one(bench: common.Benchmark, *, quick: bool) -> dict[str, Any]:
    """Run one entry with fixed seeds; a skip or an exception becomes a result, not a crash."""
    reason = bench.needs()
    if reason:
        return {"skipped": reason}
    torch.manual_seed(0)
    np.random.seed(0)
    start = time.perf_counter()
    try:
        result = bench.run(quick)
    except Exception as err:  # report and go on with the other entries
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    finally:
        gc.collect()
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if bench.goal is not None:
        result["goal"] = bench.goal
    if bench.targets:
        result["targets"] = {k: f"{op} {v:g}" for k, (op, v) in bench.targets.items()}
    passed = bench.passed(result)
    if passed is not None:
        result["passed"] = passed
    return result


def select(entries: dict[str, common.Benchmark], only: str) -> tuple[list[str], list[str]]:
    """The entries ``--only`` names, in its order: comma-separated names or shell patterns
    (``'gpu_*'``); and the names or patterns that matched none."""
    names: list[str] = []
    unknown: list[str] = []
    for pattern in filter(None, (p.strip() for p in only.split(","))):
        found = [n for n in entries if fnmatch.fnmatchcase(n, pattern)]
        names += [n for n in found if n not in names]
        if not found:
            unknown.append(pattern)
    return names, unknown


def save(out: Path, machine: dict[str, Any], results: dict[str, dict[str, Any]], *,
         quick: bool, wall: float) -> None:
    """Merge the entries measured so far into ``out``; the machine block names them and the
    wall time so far."""
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "quick": quick, "wall_s": round(wall, 1), "entries_run": sorted(results)}
    common.merge_results(out, machine, results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated entry names or patterns to run, e.g. "
                        "'gpu_*' (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer repeats, smaller work; numbers not publishable")
    parser.add_argument("--out", type=Path,
                        help=f"JSON to merge results into (default: {common.RESULTS.name}; "
                             "_work/results-quick.json with --quick)")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    args = parser.parse_args(argv)

    entries = load_entries()
    if args.list:
        for b in entries.values():
            goal = "no goal" if b.goal_text() == "-" else f"goal {b.goal_text()}"
            note = b.needs()
            print(f"{b.name:34s} {goal}: {b.about}" + (f"  [skipped: {note}]" if note else ""))
        return 0
    # entries that cannot run here (no CUDA) go last, so the measured rows lead the table
    names = sorted(entries, key=lambda n: entries[n].needs() is not None)
    if args.only:
        names, unknown = select(entries, args.only)
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(entries)}")
    out = args.out or (common.WORK_DIR / "results-quick.json" if args.quick else common.RESULTS)

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), device {machine['device']}"
          + (" [quick]" if args.quick else ""), flush=True)
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for name in names:
        bench = entries[name]
        print(f"- {name}: {bench.about}", flush=True)
        result = run_one(bench, quick=args.quick)
        row = common.table_row(bench, result)
        print(f"  {row[1]} vs {row[2]} -> {row[3]} ({row[5]})", flush=True)
        rows.append(row)
        if "skipped" not in result and "error" not in result:
            results[name] = {**result, "quick": args.quick}
            # written as each entry ends, so a run killed later (a lent GPU's time limit)
            # keeps what it measured
            save(out, machine, results, quick=args.quick, wall=time.perf_counter() - start)
    wall = time.perf_counter() - start
    if results:
        save(out, machine, results, quick=args.quick, wall=wall)
    print()
    print(common.format_table(rows))
    print(f"\ntotal wall time {wall / 60:.1f} min; results merged into {out}")
    failed = [r[0] for r in rows if r[5] in ("FAIL", "ERROR")]
    if failed:
        print(f"not met: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
