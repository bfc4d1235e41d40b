"""Where a timed training step's device time goes (``bench_gpu.py --profile``).

:func:`profile_step` runs a few steps of an already built and warmed step under
``torch.profiler`` and writes three things, per step:

- the device's busy time against the step's wall time, and the longest idle gaps between two
  kernels, each named by the kernels on either side (a gap is the device waiting for the host);
- device time by kernel class (:data:`CLASSES`: the attention kernels, matrix products,
  compiled fused kernels, the upsampling, copies, the optimizer, ...);
- the kernels with the most device time, by name, and torch.profiler's own op table, whole
  and by input shape (which of several convolutions a kernel served, say).

Kernel times are the kernels' own (device events), so nothing is counted twice where an op's
row also carries its kernels' time.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch

# (class, pattern on the kernel name), the first match wins
CLASSES = [
    ("rel_attention triton (scrollsam)", r"^(forward|backward_kv|backward_q)$"),
    ("compiled fused (inductor)", r"^triton_"),  # before the rest: names like
    # triton_red_fused_convolution_backward_sum are inductor's own kernels, not cuDNN's
    ("SDPA (cuDNN, flash, efficient)", r"flash|fmha|attention|Attention|sdpa|"
                                       r"compute_dot_do_o|convert_dq"),
    ("upsample", r"upsample"),
    ("convolutions (cuDNN)", r"convolve|wgrad|dgrad|fprop|nchwToNhwc|nhwcToNchw|conv"),
    ("matrix products", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|ampere_|splitK"),
    ("optimizer", r"multi_tensor|fused_adam|adam"),
    ("copies / cat", r"copy|Copy|cat_|Cat|memcpy|Memcpy"),
    ("reductions", r"reduce|Reduce"),
    ("elementwise (eager)", r"elementwise|Elementwise"),
    ("memset / fill", r"memset|Memset|fill|Fill"),
]


def kernel_class(name: str) -> str:
    """The :data:`CLASSES` entry a device kernel's name falls in ("other" for none)."""
    for label, pattern in CLASSES:
        if re.search(pattern, name):
            return label
    return "other"


def _kernels(prof: torch.profiler.profile) -> list[tuple[float, float, str]]:
    """The device kernels and copies of a profile: (start us, end us, name), by start. Device
    ranges of user annotations (``Optimizer.step#AdamW.step``) are not kernels: left out."""
    from torch.autograd import DeviceType

    found = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            found.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(found)


def summarise(kernels: list[tuple[float, float, str]], wall_s: float, steps: int, *,
              gaps: int = 15, top: int = 40) -> str:
    """The text report of :func:`profile_step` from its kernels (start, end in us, name) and
    the wall time of ``steps`` steps."""
    per = 1e3 * steps  # us -> ms per step
    busy, end_seen, last, idle = 0.0, None, "", []  # last: the kernel that ends at end_seen
    for start, end, name in kernels:  # busy: the union of kernel intervals
        if end_seen is not None and start > end_seen:
            idle.append((start - end_seen, last, name))
        if end_seen is None or end > end_seen:
            busy += end - max(start, end_seen if end_seen is not None else start)
            end_seen, last = end, name
    by_class: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start, end, name in kernels:
        by_class[kernel_class(name)] += end - start
        by_name[name][0] += end - start
        by_name[name][1] += 1
    total = sum(by_class.values())
    lines = [f"per step ({steps} profiled): wall {wall_s * 1e3 / steps:.1f} ms, device busy "
             f"{busy / per:.1f} ms ({busy / (wall_s * 1e6):.0%}), kernel time {total / per:.1f} "
             f"ms in {len(kernels) / steps:.0f} kernels",
             f"idle gaps over 20 us: {sum(g for g, *_ in idle if g > 20) / per:.1f} ms a step "
             f"in {sum(1 for g, *_ in idle if g > 20) / steps:.0f}", "",
             "device time by kernel class, ms a step:"]
    for label, t in sorted(by_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {t / per:8.2f}  {t / total:6.1%}  {label}")
    lines += ["", f"longest idle gaps (ms, kernel before -> kernel after), all {steps} steps:"]
    for g, before, after in sorted(idle, key=lambda x: -x[0])[:gaps]:
        lines.append(f"  {g / 1e3:7.2f}  {before[:70]} -> {after[:70]}")
    lines += ["", "kernels by device time (ms a step, calls a step, class, name):"]
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {t / per:8.2f} {n / steps:6.1f}  {kernel_class(name)[:18]:18s} "
                     f"{name[:110]}")
    return "\n".join(lines)


def profile_step(step: Callable[[], object], device: torch.device, *, steps: int = 3,
                 rows: int = 40) -> str:
    """Profile ``steps`` calls of a built, warmed ``step``: :func:`summarise`'s report
    (CUDA) and torch.profiler's op table (``rows`` ops with the most device time, or host
    time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)
    shaped = prof.key_averages(group_by_input_shape=True).table(  # which call is which: the
        sort_by=sort, row_limit=rows, max_name_column_width=60,  # convolutions' shapes say
        max_shapes_column_width=120)
    head = f"{steps} steps, {wall:.2f} s"
    if cuda:
        try:  # the op table is still worth writing if the events' fields differ
            head = summarise(_kernels(prof), wall, steps)
        except Exception as err:
            head += f"; summary failed: {type(err).__name__}: {err}"
    return head + "\n\n" + table + "\n\nby input shape:\n" + shaped
