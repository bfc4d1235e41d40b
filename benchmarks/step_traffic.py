"""What one eager training step asks of a GPU, counted without one: kernels, bytes and FLOPs.

    .venv/bin/python benchmarks/step_traffic.py --case vit_b_1024_b8_triton
    .venv/bin/python benchmarks/step_traffic.py --case vit_b_1024_b8_fold --by-node --top 40
    .venv/bin/python benchmarks/step_traffic.py --case vit_b_256_b16_fold+xray --json /tmp/t.json

The step is ``gpu_step.make_step``'s, the one ``bench_gpu.py`` times (the loop's forward with
the default prompts and losses, backward, clipping, AdamW), built on PyTorch's ``meta`` device:
every operator runs for its shapes only, so vit_b at 1024 px and batch 16 takes seconds on a
laptop. CUDA's bf16 autocast is emulated (:class:`CudaAutocast`: matrix products and
convolutions in bf16, layer norms, powers, exponentials and logarithms in float32, sums and
softmaxes of bf16 into float32; the weights cast once a step), since autocast does not act on
``meta`` tensors. SDPA without a mask runs as one flash-attention operator (the ``meta``
device would take SDPA's unfused math form and count a score matrix no GPU writes); SDPA with a
mask does take that form, so the ``bias`` path is refused (the decoder's small masked token
attention is counted so). The Triton attention runs its registered shapes-only form: the
PyTorch work its CUDA wrapper does around the kernel (backward's contiguous gradient and its
delta sum, about 10 GB of a vit_b 1024 px batch-8 step) is not counted, so compare ``triton``
with ``fold`` with that in mind.

Every ATen operator that is a kernel (not a view, not an allocation, not on an empty tensor)
counts once, with the bytes of its tensor inputs and outputs (an expanded axis once; what
``copy_`` overwrites is not read) and the FLOPs of ``torch.utils.flop_counter``'s formulas.
Host-side operators (random draws, ``nonzero``) count as kernels too. Operators are grouped
by phase: the module or function that ran them in forward (``encoder``, ``depth``,
``decoder``, ``head``, ``loss``, ``sampler``, ``optim``; ``other``: the rest, the prompt
encoder's work included), and ``bwd:`` the same phase's backward (``--by-node`` adds the
autograd node, e.g. ``bwd:encoder:SliceBackward0``). ``roof_ms`` is a roofline floor per
operator, ``max(FLOPs / --tflops, bytes / --tbs)``, summed: 600 TFLOP/s and 2.8 TB/s by
default, about what dense bf16 products and HBM3 copies reach on an H100.

It is a model, not a timing. It leaves out launch latency and the host's time per operator
(eager steps at small batches are bound by that: compare the kernel counts), caches (bytes
read twice count twice) and kernels slower than their roofline (attention, small products).
``meta`` cannot run CUDA's fused AdamW: its bytes are counted from the parameters
(:class:`FusedAdamW`); gradient clipping runs per tensor there (the same bytes as CUDA's
multi-tensor kernels, many more kernels). What it is for: to see, without a GPU, which part of
a step moves the bytes, and what a change does to them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_step import Case, case_named, make_step  # noqa: E402

LOW = frozenset({  # CUDA autocast's bf16 list, as these functions are called from Python
    "linear", "conv1d", "conv2d", "conv_transpose2d", "matmul", "__matmul__", "__rmatmul__",
    "einsum", "bmm", "baddbmm", "mm", "addmm", "mv", "addmv", "scaled_dot_product_attention"})
FP32 = frozenset({  # its float32 list (those the project calls)
    "layer_norm", "group_norm", "pow", "__pow__", "exp", "expm1", "log", "log1p", "log2",
    "log10", "rsqrt", "reciprocal", "softplus", "logsumexp", "binary_cross_entropy_with_logits",
    "mse_loss", "l1_loss", "cdist", "interpolate"})  # interpolate: CUDA's upsample_* entries
TO_FP32 = frozenset({"sum", "softmax", "log_softmax", "cumsum", "prod", "nansum"})  # dtype=
FREE = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                  "_unsafe_view"})  # no kernel
FILLS = frozenset({"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "fill_",
                   "zero_", "new_zeros", "new_ones", "new_full"})  # write only


class Tally:
    """Kernels, bytes and FLOPs per (phase, operator), with the phase now running."""

    def __init__(self, *, by_node: bool) -> None:
        self.phase = "other"
        self.by_node = by_node
        self.tagged: dict[int, Any] = {}  # autograd nodes given a phase, by id
        self.ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])

    def add(self, op: str, nbytes: int, flops: float, kernels: int = 1) -> None:
        row = self.ops[(self.phase, op)]
        row[0] += kernels
        row[1] += nbytes
        row[2] += flops

    def tag(self, out: Any) -> None:
        """Run the backward of ``out``'s autograd nodes under the current phase."""
        phase = self.phase
        for t in _tensors(out):
            node = t.grad_fn
            if node is None or id(node) in self.tagged:  # the phase that made it keeps it
                continue
            self.tagged[id(node)] = node  # held for the step: its id is not reused
            label = f"bwd:{phase}" + (f":{type(node).__name__}" if self.by_node else "")
            node.register_prehook(lambda grads, label=label: setattr(self, "phase", label))


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors in a nest of lists, tuples and dicts."""
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


class _Flash(torch.autograd.Function):
    """SDPA as the flash operator and its backward (``meta`` picks the math form)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                  scale=scale)
        ctx.save_for_backward(q, k, v, out[0], out[1])
        ctx.rest, ctx.scale = out[2:8], scale
        return out[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        cq, ck, mq, mk, seed, offset = ctx.rest
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cq, ck, mq, mk, 0.0, False, seed, offset,
            scale=ctx.scale)
        return dq, dk, dv, None


class CudaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast policy at the Python call level, for ``meta`` tensors; off inside
    ``torch.autocast(..., enabled=False)`` regions the code opens itself (the loss's sums)."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally
        self.weights: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(y, dtype) for y in x)
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
            return x
        if x.is_leaf and x.requires_grad:  # a weight: autocast casts it once while enabled
            key = (id(x), dtype)
            if key not in self.weights:
                self.weights[key] = x.to(dtype)
            return self.weights[key]
        return x.to(dtype)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not any(_AUTOCAST_OFF):
            if name in LOW:
                args = self._cast(args, torch.bfloat16)
                kwargs = {k: self._cast(v, torch.bfloat16) for k, v in kwargs.items()}
                if name == "scaled_dot_product_attention":
                    out = self._attention(*args, **kwargs)
                    if out is not None:
                        self.tally.tag(out)
                        return out
            elif name in FP32:
                args = self._cast(args, torch.float32)
            elif (name in TO_FP32 and args and isinstance(args[0], torch.Tensor)
                  and args[0].dtype == torch.bfloat16 and kwargs.get("dtype") is None):
                kwargs = dict(kwargs, dtype=torch.float32)
        out = func(*args, **kwargs)
        self.tally.tag(out)
        return out

    @staticmethod
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None,
                   dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, **kw: Any) -> torch.Tensor | None:
        """The flash operator where a GPU would take one (no mask, equal head dims <= 256)."""
        if attn_mask is not None or is_causal or kw or q.shape[-1] != v.shape[-1] \
                or q.shape[-1] > 256:
            return None
        return _Flash.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


_AUTOCAST_OFF: list[bool] = []  # a stack, True for the code's own autocast-off regions


@contextlib.contextmanager
def _autocast_off(*args: Any, enabled: bool = True, **kwargs: Any) -> Iterator[None]:
    """``torch.autocast(..., enabled=False)`` for :class:`CudaAutocast`."""
    _AUTOCAST_OFF.append(not enabled)
    try:
        yield
    finally:
        _AUTOCAST_OFF.pop()


class Counter(TorchDispatchMode):
    """Counts each ATen kernel into ``tally``."""

    def __init__(self, tally: Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        returns = func._schema.returns
        if name in FREE or (returns and returns[0].alias_info is not None
                            and not returns[0].alias_info.is_write):
            return out  # a view or an allocation: no kernel
        sources = (args[1:], kwargs) if name == "copy_" else (args, kwargs)  # copy_: no read
        read = 0 if name in FILLS else sum(_nbytes(t) for t in _tensors(sources))
        formula = flop_registry.get(func.overloadpacket)
        flops = float(formula(*args, **kwargs, out_val=out)) if formula else 0.0
        written = sum(_nbytes(t) for t in _tensors(out))
        if read + written or flops:  # an empty tensor launches nothing
            self.tally.add(str(func.overloadpacket), read + written, flops)
        return out


def _nbytes(t: torch.Tensor) -> int:
    """The bytes ``t`` covers in memory: an expanded (stride 0) axis counts once."""
    return math.prod(n for n, st in zip(t.shape, t.stride(), strict=True) if st) \
        * t.element_size()


def _enter(tally: Tally, label: str, fn: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        outer, tally.phase = tally.phase, label
        try:
            return fn(*args, **kwargs)
        finally:
            tally.phase = outer
    return run


@contextlib.contextmanager
def _patched(pairs: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Each ``(owner, attr, value)`` set for the block (``unittest.mock.patch.object``)."""
    with contextlib.ExitStack() as stack:
        for owner, attr, value in pairs:
            stack.enter_context(mock.patch.object(owner, attr, value))
        yield


def _phase_patches(model: Any, tally: Tally) -> list[tuple[Any, str, Any]]:
    """Wrappers for the step's parts, so that what they run counts under their names; the
    loss's autocast-off region; clipping (then the optimizer) as ``optim``; the Triton
    attention's shapes-only form allowed on ``meta``."""
    import scrollsam.mask_loss as mask_loss
    import scrollsam.model.rel_attention as rel_attention
    import scrollsam.train.step as step

    owners = [(model.sam.image_encoder, "forward", "encoder"),
              (model, "_predict_masks", "decoder"), (model, "refine", "head"),
              (step, "sam_loss", "loss"), (step, "corrective_points", "sampler"),
              (step, "first_prompts", "sampler")]
    if model.depth_encoder is not None:
        owners.append((model.depth_encoder, "forward", "depth"))
    clip = torch.nn.utils.clip_grad_norm_

    def clip_then_optimizer(*args: Any, **kwargs: Any) -> Any:
        tally.phase = "optim"  # clipping, then the optimizer step
        return clip(*args, **kwargs)

    return [*((owner, attr, _enter(tally, label, getattr(owner, attr)))
              for owner, attr, label in owners),
            (mask_loss, "_float32", lambda like: _autocast_off(enabled=False)),
            (torch.nn.utils, "clip_grad_norm_", clip_then_optimizer),
            (rel_attention, "available", lambda device: True)]


class FusedAdamW:
    """Stands in for CUDA's fused AdamW, which ``meta`` cannot run: ``step`` counts what that
    kernel moves, each float32 parameter, gradient and two moments read and the parameter and
    moments written (28 bytes an element), in launches of up to 36 tensors (PyTorch's
    multi-tensor limit for four lists); the update itself is not applied."""

    def __init__(self, params: list[torch.nn.Parameter], tally: Tally) -> None:
        self.params, self.tally = params, tally

    def step(self) -> None:
        live = [p for p in self.params if p.grad is not None]
        self.tally.add("fused AdamW (modelled)", 28 * sum(p.numel() for p in live), 0.0,
                       kernels=-(-len(live) // 36))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _check(case: Case) -> None:
    """ValueError for a case this count would misread."""
    if case.compile:
        raise ValueError(f"{case.name}: compiled steps fuse kernels this count cannot see; "
                         "take the eager case")
    if case.path == "auto":
        raise ValueError(f"{case.name}: auto resolves by device, and on meta would take the "
                         "CPU's choice; count fold or triton")
    if case.path == "bias":
        raise ValueError(f"{case.name}: SDPA with a mask runs its math form on meta (a score "
                         "matrix no GPU writes); count fold or triton")


def count_step(case: Case, *, by_node: bool = False) -> Tally:
    """One training step of ``case`` (eager) on ``meta``, counted after one uncounted step
    (first-call work, such as autotuning tables and lazily built buffers, stays out)."""
    _check(case)
    tally = Tally(by_node=by_node)
    autocast = CudaAutocast(tally)
    import scrollsam.train.optim as optim

    def adamw(params: list[torch.nn.Parameter], **settings: Any) -> FusedAdamW:
        return FusedAdamW(params, tally)

    with _patched([(optim, "make_optimizer", adamw)]):
        step, model = make_step(case, torch.device("meta"), cast=lambda: autocast,
                                read_loss=False)
    with _patched(_phase_patches(model, tally)):
        for counted in (False, True):
            tally.ops.clear()
            tally.tagged.clear()
            autocast.weights.clear()  # autocast's cache lives for one step's forward
            tally.phase = "other"
            with Counter(tally) if counted else contextlib.nullcontext():
                step()
    return tally


def summary(tally: Tally, *, tflops: float, tbs: float) -> dict[str, Any]:
    """Per phase and per (phase, operator): kernels, GB, TFLOP and the roofline ms."""
    def roof(row: list[float]) -> float:
        return max(row[2] / (tflops * 1e12), row[1] / (tbs * 1e12)) * 1e3

    keys = ("kernels", "gb", "tflop", "roof_ms")
    ops = [dict(phase=phase, op=op, kernels=row[0], gb=row[1] / 1e9, tflop=row[2] / 1e12,
                roof_ms=roof(row)) for (phase, op), row in tally.ops.items()]
    phases: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(keys, 0))
    for o in ops:
        for k in keys:
            phases[o["phase"]][k] += o[k]
    total = {k: sum(p[k] for p in phases.values()) for k in keys}
    return dict(tflops=tflops, tbs=tbs, total=total,
                phases=dict(sorted(phases.items(), key=lambda kv: -kv[1]["roof_ms"])),
                ops=sorted(ops, key=lambda o: -o["roof_ms"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="vit_b_1024_b8_triton",
                        help="a case name as gpu_step.py writes them, eager (no +compile): "
                        "MODEL_SIZE_bBATCH_PATH[+wN][+center|+perkind|+free][+xray]")
    parser.add_argument("--tflops", type=float, default=600.0,
                        help="matrix products' rate for the roofline (TFLOP/s)")
    parser.add_argument("--tbs", type=float, default=2.8,
                        help="memory bandwidth for the roofline (TB/s)")
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    parser.add_argument("--by-node", action="store_true",
                        help="split backward phases by autograd node")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    try:
        case = case_named(args.case)
        _check(case)
    except ValueError as err:
        parser.error(str(err))
    tally = count_step(case, by_node=args.by_node)
    result = summary(tally, tflops=args.tflops, tbs=args.tbs)
    print(f"{args.case}: one eager step on a model GPU ({args.tflops:g} TFLOP/s, "
          f"{args.tbs:g} TB/s); roofline floor, not a timing")
    row = "{:<34} {:>8} {:>9} {:>8} {:>9}"
    print(row.format("phase", "kernels", "GB", "TFLOP", "roof ms"))
    for name, p in [*result["phases"].items(), ("total", result["total"])]:
        print(row.format(name, p["kernels"], f"{p['gb']:.2f}", f"{p['tflop']:.2f}",
                         f"{p['roof_ms']:.1f}"))
    print(f"\ntop {args.top} operators by roofline ms:")
    for o in result["ops"][:args.top]:
        print(row.format(o["phase"][:34], o["kernels"], f"{o['gb']:.2f}", f"{o['tflop']:.3f}",
                         f"{o['roof_ms']:.1f}") + "  " + o["op"])
    if args.json:
        args.json.write_text(json.dumps(dict(case=args.case, **result), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
