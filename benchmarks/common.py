"""The benchmark harness: a registry of entries, side-by-side timing, machine facts, JSON, table.

An entry is one function registered with :func:`register`. It receives ``quick`` (a smoke run:
fewer repeats, smaller work) and returns a plain dict that holds at least ``settings`` (what was
measured, JSON-able) and either a comparison from :func:`compare` (``ratio``, ``baseline_s``,
``ours_s``, ``repeats``, raw times) or its own metrics (``mpx_per_s``, ``peak_rss_mb`` ...).
The harness adds ``goal`` and ``passed``. An entry that cannot run here (no CUDA, code not
written yet) says why through its ``needs`` callable and is shown as skipped.

Adding an entry is adding one file ``benchmarks/bench_<topic>.py`` (``run.py`` imports every
``bench_*.py``)::

    from common import compare, needs_modules, register

    @register("cached_vs_recompute_train", goal=100, about="one line for the table",
              needs=needs_modules("scrollsam.train.step"))
    def cached_vs_recompute_train(quick: bool) -> dict:
        ...build both ways once, outside the timing...
        result = compare(recompute_step, cached_step, repeats=2 if quick else 5)
        result["settings"] = {"model": "vit_b", ...}
        return result

Entries without a baseline (``predict_tiny``) use :func:`measure` and put their headline numbers
under ``"metrics"`` (``{"mpx_per_s": ..., "peak_rss_mb": ...}``); :class:`PeakAnonRss` measures
resident memory that is not file-backed, :func:`synthetic_fragment` gives a cached fragment.

Timing rules every comparison follows (see :func:`compare`): both ways run in the same process,
one warm-up call each first, then ``repeats`` rounds that alternate baseline and ours (the order
flips every round so neither always runs on a warmer cache), and the medians are compared.
``ratio`` = baseline median / ours median, so > 1 means scrollsam is faster.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
try:  # a GPU machine without network has torch but not scrollsam installed: use src/
    import scrollsam  # noqa: F401
except ModuleNotFoundError as err:  # (an installed scrollsam missing a dependency says so)
    if err.name != "scrollsam":
        raise
    sys.path.insert(0, str(BENCH_DIR.parent / "src"))
WORK_DIR = BENCH_DIR / "_work"  # git-ignored scratch space for synthetic fragments
RESULTS = BENCH_DIR / "results.json"


@dataclass(frozen=True)
class Benchmark:
    """One registered entry: ``run(quick) -> dict``; ``goal`` is a minimum ``ratio`` (or None);
    ``targets`` bounds on its ``metrics``: ``{"images_per_s": (">=", 60.0)}``."""

    name: str
    run: Callable[[bool], dict[str, Any]]
    goal: float | None
    about: str
    needs: Callable[[], str | None] = field(default=lambda: None)
    targets: dict[str, tuple[str, float]] = field(default_factory=dict)

    def goal_text(self) -> str:
        """``>= 2.5``, ``images_per_s >= 60``, both, or ``-``."""
        parts = [f">= {self.goal:g}"] if self.goal is not None else []
        parts += [f"{name} {op} {value:g}" for name, (op, value) in self.targets.items()]
        return ", ".join(parts) or "-"

    def passed(self, result: dict[str, Any]) -> bool | None:
        """Whether ``result`` meets the goal and every target (a metric it lacks fails);
        None for an entry with neither."""
        if self.goal is None and not self.targets:
            return None
        ok = self.goal is None or result.get("ratio", 0.0) >= self.goal
        metrics = result.get("metrics", {})
        for name, (op, value) in self.targets.items():
            got = metrics.get(name)
            ok = ok and got is not None and (got >= value if op == ">=" else got <= value)
        return bool(ok)


REGISTRY: dict[str, Benchmark] = {}


def register(
    name: str,
    *,
    goal: float | None,
    about: str,
    needs: Callable[[], str | None] | None = None,
    targets: dict[str, tuple[str, float]] | None = None,
) -> Callable[[Callable[[bool], dict[str, Any]]], Callable[[bool], dict[str, Any]]]:
    """Decorator: add ``fn(quick) -> dict`` to the registry under ``name``.

    ``goal``: the minimum ratio that passes (None: a measurement without a goal).
    ``needs``: returns None when the entry can run here, else the reason it is skipped.
    ``targets``: absolute goals on the result's ``metrics``, ``{name: (">=" | "<=", value)}``
    (an entry passes when the ratio meets ``goal`` and every target holds).
    """
    targets = dict(targets or {})
    if any(op not in (">=", "<=") for op, _ in targets.values()):
        raise ValueError(f"benchmark {name!r}: a target's test is '>=' or '<=': {targets}")

    def add(fn: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(name, fn, goal, about, needs or (lambda: None), targets)
        return fn

    return add


# --- conditions --------------------------------------------------------------------------------


def needs_cuda() -> str | None:
    """``needs`` for GPU entries."""
    return None if torch.cuda.is_available() else "needs CUDA (CPU-only machine)"


def needs_modules(*names: str) -> Callable[[], str | None]:
    """``needs`` for entries built on code that may not exist yet: skip until it imports."""

    def check() -> str | None:
        import importlib

        for name in names:
            try:
                importlib.import_module(name)
            except ImportError as err:
                return f"needs {name} ({err})"
        return None

    return check


# --- timing ------------------------------------------------------------------------------------


def cuda_sync() -> None:
    """``sync`` for CUDA work: wait for queued kernels so the clock sees them."""
    torch.cuda.synchronize()


def _timed(fn: Callable[[], object], sync: Callable[[], None] | None) -> float:
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def compare(
    baseline: Callable[[], object],
    ours: Callable[[], object],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time ``baseline`` against ``ours``, alternating, and return medians and their ratio.

    Each is called ``warmup`` times untimed, then ``repeats`` times timed; round r runs baseline
    first when r is even and ours first when r is odd. ``sync`` (e.g. :func:`cuda_sync`) runs
    before and after every timed call. Returns ``baseline_s`` and ``ours_s`` (medians, seconds),
    ``ratio`` = baseline_s / ours_s, ``repeats`` and the raw times.
    """
    for _ in range(warmup):
        baseline()
        ours()
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    pair = (("baseline", baseline), ("ours", ours))
    for r in range(repeats):
        for key, fn in pair if r % 2 == 0 else pair[::-1]:
            times[key].append(_timed(fn, sync))
    base, mine = statistics.median(times["baseline"]), statistics.median(times["ours"])
    return {
        "ratio": base / mine,
        "baseline_s": base,
        "ours_s": mine,
        "repeats": repeats,
        "warmup": warmup,
        "baseline_times_s": [round(t, 6) for t in times["baseline"]],
        "ours_times_s": [round(t, 6) for t in times["ours"]],
    }


def measure(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
            sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time one way alone (entries without a baseline): median ``seconds`` and raw times."""
    for _ in range(warmup):
        fn()
    times = [_timed(fn, sync) for _ in range(repeats)]
    return {"seconds": statistics.median(times), "repeats": repeats, "warmup": warmup,
            "times_s": [round(t, 6) for t in times]}


# --- shared inputs and memory ------------------------------------------------------------------


def synthetic_fragment(height: int, width: int, depth: int, *, seed: int = 0) -> Path:
    """A synthetic fragment folder in ``WORK_DIR``, written on first use and reused after."""
    from scrollsam.data.synthetic import write_fragment

    path = WORK_DIR / f"fragment_{height}x{width}x{depth}_seed{seed}"
    if not (path / "mask.png").is_file():
        write_fragment(path, height=height, width=width, depth=depth, seed=seed, overwrite=True)
    return path


def _anon_rss_mb() -> float:
    """Resident memory not backed by files (RssAnon): memory-mapped slices do not count."""
    from scrollsam.infer.meter import memory_status

    return memory_status().get("rss_anon_mb", 0.0)


class PeakAnonRss:
    """Context manager sampling RssAnon every ``interval`` s in a thread; ``peak_mb`` after.

    Linux only (``peak_mb`` stays None elsewhere). For entries that report ``peak_rss_mb``.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mb: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, _anon_rss_mb())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakAnonRss:
        if Path("/proc/self/status").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _anon_rss_mb())
            self.peak_mb = self._peak


def in_fresh_process(module: str, func: str, quick: bool) -> dict[str, Any]:
    """Run ``module.func(quick)`` (a ``bench_*`` module) in a new Python process; return its dict.

    For memory entries: the peak resident memory of a fresh process is not inflated by what
    earlier entries left in this one's heap. The child imports this harness first (which finds
    scrollsam: ``src/`` where it is not installed) and inherits this process's environment.
    """
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    code = (
        "import importlib, json, sys; sys.path.insert(0, sys.argv[1]); import common; "
        "r = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])(sys.argv[4] == '1'); "
        "open(sys.argv[5], 'w').write(json.dumps(r))"
    )
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-c", code, str(BENCH_DIR), module, func,
                        "1" if quick else "0", str(out)], check=True)
        return json.loads(out.read_text())


# --- machine and results -----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Facts that decide the numbers: CPU, cores, torch and its thread count, device, date."""
    cuda = torch.cuda.is_available()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def merge_results(path: Path, machine: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Write ``results`` into the JSON at ``path``, keeping entries this run did not measure.

    ``machine`` describes this run and replaces the file's; every entry written by this run also
    carries ``measured_on`` (device and date) so entries kept from an earlier run stay traceable.
    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("results", {})
        except (json.JSONDecodeError, AttributeError):
            old = {}
    stamp = {"device": machine["device"], "cpu": machine["cpu"], "date": machine["date"]}
    merged = {**old, **{k: {**v, "measured_on": stamp} for k, v in results.items()}}
    doc = {"machine": machine, "results": dict(sorted(merged.items()))}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return doc


# --- table -------------------------------------------------------------------------------------


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def settings_text(settings: dict[str, Any]) -> str:
    """``{"B": 4, "P": 16}`` -> ``B=4 P=16``."""
    return " ".join(f"{k}={v}" for k, v in settings.items())


def table_row(bench: Benchmark, result: dict[str, Any]) -> list[str]:
    """name, baseline, scrollsam, ratio, goal, status, settings (or the skip / error note)."""
    goal = bench.goal_text()
    if "skipped" in result:
        return [bench.name, "-", "-", "-", goal, "skipped", result["skipped"]]
    if "error" in result:
        return [bench.name, "-", "-", "-", goal, "ERROR", result["error"]]
    ratio = result.get("ratio")
    if "baseline_s" in result:
        base, ours = _fmt_seconds(result["baseline_s"]), _fmt_seconds(result["ours_s"])
    else:  # a measurement without a baseline: show its headline metrics instead
        base = "-"
        ours = " ".join(f"{k}={v:.4g}" for k, v in result.get("metrics", {}).items()) or "-"
    status = {True: "pass", False: "FAIL", None: "-"}[result.get("passed")]
    metrics = result.get("metrics", {})  # what the targets judged, first: a FAIL says why
    judged = [f"{k}={metrics[k]:.4g}" if k in metrics else f"{k} not measured"
              for k in bench.targets]
    if "baseline_error" in result:
        judged.append(f"baseline failed: {result['baseline_error']};")
    notes = [*judged, settings_text(result.get("settings", {}))]
    return [bench.name, base, ours, f"{ratio:.2f}x" if ratio is not None else "-", goal, status,
            " ".join(n for n in notes if n)]


def format_table(rows: list[list[str]]) -> str:
    """Rows of cells -> an aligned plain-text table (a Markdown table, so README can take it)."""
    head = ["benchmark", "baseline", "scrollsam", "ratio", "goal", "result", "settings"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *map(line, rows)])
