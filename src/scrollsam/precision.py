"""Precision: bf16 autocast where the hardware has bf16 units, fp32 elsewhere; chosen once.

Weights stay float32 (the master copy the optimizer updates); ``torch.autocast`` runs matrix
products in bfloat16 on

* CUDA GPUs, and
* CPUs with native bf16 instructions (x86 AVX512-BF16 or AMX; Arm's BF16 extension): on the
  2-core AMD EPYC of ``benchmarks/results.json`` a 2048^2 matrix product runs about 4x faster
  in bf16 than in fp32.

CPUs without them emulate bf16 through conversions and gain nothing, so they stay fp32. Losses
and metrics are computed in float32 whatever the autocast (``scrollsam.losses`` casts logits
with ``.float()`` first).

``train.amp`` (bool) means "bf16 where it is native"; ``scrollsam predict --precision`` takes
``auto`` (the run's ``train.amp``), ``bf16`` (forced, also where it is emulated) or ``fp32``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16, AMX, or Arm BF16)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private torch probe: treat any failure as "no"
            continue
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_native(device: torch.device | str) -> bool:
    """Whether bf16 autocast pays off on ``device``: CUDA, or a CPU with bf16 units."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_has_bf16())


def use_bf16(device: torch.device | str, precision: str | bool) -> bool:
    """Resolve a precision choice for ``device``: ``True`` / ``"auto"`` -> bf16 where native,
    ``"bf16"`` -> bf16 (a warning where it is emulated), ``False`` / ``"fp32"`` -> fp32."""
    if precision is True or precision == "auto":
        return bf16_native(device)
    if precision is False or precision == "fp32":
        return False
    if precision == "bf16":
        if not bf16_native(device):
            _warn_emulated(torch.device(device).type)
        return True
    raise ValueError(f"precision: expected one of {PRECISIONS} or a bool, got {precision!r}")


@functools.cache
def _warn_emulated(kind: str) -> None:
    log.warning("bf16 asked for on a %s without bf16 units: emulated, likely slower than fp32",
                kind)


def autocast_for(device: torch.device | str, amp: str | bool) -> contextlib.AbstractContextManager:
    """The autocast context for ``device`` and the choice ``amp`` (see :func:`use_bf16`):
    ``torch.autocast(device, bfloat16)`` or a null context."""
    device = torch.device(device)
    if use_bf16(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(device: torch.device | str, amp: str | bool) -> str:
    """``"bf16"`` or ``"fp32"``: what :func:`autocast_for` gives, for logs and run records."""
    return "bf16" if use_bf16(device, amp) else "fp32"
