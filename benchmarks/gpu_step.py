"""The training step the GPU benchmark times (``bench_gpu.py``): its cases and how each is built.

A :class:`Case` names a model, input size, batch, attention path, window, compile and prompt
mode; :func:`make_step` builds the model and returns one real training step of it (see
``bench_gpu.py`` for what the step holds). Kept apart from ``bench_gpu.py`` so that file stays
the runner.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Case:
    """One timed configuration."""

    model: str
    size: int
    batch: int
    path: str = "fold"  # official | fold | bias | triton | auto (FusedAttention modes)
    window: int | None = None  # None: the variant's (14)
    compile: bool = False
    # sam: the default SAM-paper prompting (uniform corrective points, on the device);
    # center: the same with corrective points at the error's centre (CPU distance transforms);
    # perkind: the same with a decoder call per prompt kind and round (7, as before the kinds
    # shared their calls: 3); free: prompt-free sets only
    prompts: str = "sam"
    # the recommended x-ray model (configs/xray_depth.yaml: a band of 26 slices through the
    # depth encoder, the full-resolution mask head, its prompt settings) around this SAM variant
    xray: bool = False

    @property
    def name(self) -> str:
        w = f"+w{self.window}" if self.window else ""
        c = "+compile" if self.compile else ""
        p = "" if self.prompts == "sam" else f"+{self.prompts}"
        x = "+xray" if self.xray else ""
        return f"{self.model}_{self.size}_b{self.batch}_{self.path}{w}{c}{p}{x}"


def case_named(name: str) -> Case:
    """The :class:`Case` whose :attr:`Case.name` is ``name``, listed or not (e.g.
    ``vit_b_1024_b12_triton+w16+free``); ValueError for a name of another form."""
    base, *flags = name.split("+")
    found = re.fullmatch(r"(\w+?)_(\d+)_b(\d+)_(official|fold|bias|triton|auto)", base)
    prompts = [f for f in flags if f in ("center", "perkind", "free")]
    windows = [int(f[1:]) for f in flags if re.fullmatch(r"w\d+", f)]
    if not found or len(prompts) > 1 or len(windows) > 1:
        raise ValueError(f"not a case name: {name!r} (MODEL_SIZE_bBATCH_PATH[+wN][+compile]"
                         "[+center|+perkind|+free][+xray])")
    model, size, batch, path = found.groups()
    case = Case(model, int(size), int(batch), path, window=windows[0] if windows else None,
                compile="compile" in flags, prompts=prompts[0] if prompts else "sam",
                xray="xray" in flags)
    if case.name != name:
        raise ValueError(f"not a case name: {name!r} (did you mean {case.name!r}?)")
    return case


# In order of importance: the budget cuts from the end.
GPU_CASES = [
    # FusedAttention's own choice (what training runs): triton for the 64 x 64 global blocks,
    # fold for the windowed ones. The eager cases first: they count the FLOPs the compiled
    # cases' shares of peak need
    Case("vit_b", 1024, 4, "auto"),
    Case("vit_b", 1024, 4, "official"),
    Case("vit_b", 1024, 32, "auto", compile=True),  # compiles for minutes (175-200 s)
    Case("vit_b", 1024, 16, "auto", compile=True),
    Case("vit_b", 1024, 4, "fold"),
    Case("vit_b", 1024, 4, "triton"),  # the bias inside scrollsam's kernel
    Case("vit_b", 1024, 8, "fold", prompts="free"),  # the encoder and decoder alone,
    Case("vit_b", 1024, 8, "triton", prompts="free"),  # per attention path
    Case("vit_b", 1024, 4, "fold", prompts="center"),  # the corrective sampler before
    Case("vit_b", 1024, 4, "fold", prompts="perkind"),  # the decoder calls before
    Case("vit_b", 1024, 4, "fold", compile=True),  # encoder + decoder compiled, static sets
    Case("vit_b", 1024, 8, "fold"),
    Case("vit_b", 1024, 16, "fold"),
    Case("vit_b", 256, 32, "official"),
    Case("vit_b", 256, 32, "fold"),
    Case("vit_b", 256, 32, "fold", window=16),
    Case("vit_b", 256, 128, "fold", window=16),
    Case("vit_b", 256, 256, "fold", window=16),
    Case("vit_b", 1024, 2, "official"),  # the memory goal is at batch 2
    Case("vit_b", 1024, 2, "fold"),
    Case("vit_b", 1024, 16, "fold", compile=True),
    Case("vit_b", 1024, 16, "triton", compile=True),
    Case("vit_b", 1024, 32, "triton", compile=True),  # no widened heads: room for batch 32
    Case("vit_b", 256, 256, "fold", window=16, compile=True),
    Case("vit_b", 256, 256, "fold", compile=True),  # window 14: padded windows, real queries
    Case("vit_b", 256, 256, "triton", window=16, compile=True),
    Case("vit_h", 256, 8, "official"),
    Case("vit_h", 256, 8, "fold"),
    Case("vit_h", 1024, 1, "official"),
    Case("vit_h", 1024, 1, "fold"),
    Case("vit_h", 1024, 1, "triton"),  # head dim 80 as 64 + 16 columns
    Case("vit_b", 1024, 16, "fold", compile=True, prompts="free"),  # b16's prompting share
    Case("vit_b", 256, 16, "fold", xray=True),  # the recommended x-ray setup, as configured
    Case("vit_b", 256, 64, "fold", compile=True, xray=True),
    # prompt-free only: what the encoder and decoder alone cost
    Case("vit_b", 1024, 4, "official", prompts="free"),
    Case("vit_b", 256, 256, "fold", window=16, prompts="free"),
    Case("vit_b", 1024, 4, "bias"),
    Case("vit_b", 256, 32, "bias"),
    Case("vit_b", 1024, 8, "fold", compile=True),
    Case("vit_b", 256, 128, "fold", window=16, compile=True),
]
SMOKE_CASES = [
    Case("tiny", 128, 2, "official"),
    Case("tiny", 128, 2, "fold"),
    Case("tiny", 128, 2, "bias"),
    Case("tiny", 128, 2, "triton"),  # skipped on a CPU unless TRITON_INTERPRET=1
    Case("tiny", 128, 2, "fold", prompts="center"),
    Case("tiny", 128, 2, "fold", prompts="perkind"),
    Case("tiny", 128, 2, "fold", window=4, compile=True),
    Case("tiny", 128, 2, "fold", xray=True),
]
XRAY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "xray_depth.yaml"


def blob_labels(batch: int, size: int, *, device: torch.device,
                gen: torch.Generator) -> torch.Tensor:
    """Blob-shaped ink (about 30 % of pixels) -> float [B, 1, S, S] of 0 / 1."""
    noise = torch.rand(batch, 1, size // 16, size // 16, generator=gen)  # (B, 1, S/16, S/16)
    smooth = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth > 0.6).float().to(device)  # (B, 1, S, S)


def make_step(case: Case, device: torch.device, *, compile_backend: str = "inductor",
              cast: Callable[[], AbstractContextManager] | None = None,
              read_loss: bool = True):
    """Build the model and return ``step()`` (one training step) and the model. ``cast``: the
    precision context of the forward (default: bf16 autocast on ``device``, as the loop runs);
    ``read_loss=False``: the step does not read the loss back (a ``meta`` device has no values;
    ``step()`` then returns nan)."""
    from scrollsam import build_model
    from scrollsam.config import LossConfig, PromptConfig, load_config
    from scrollsam.data.dataset import ink_flags
    from scrollsam.model.assemble import model_from_config
    from scrollsam.model.attention import fuse_attention
    from scrollsam.model.compile import compile_model
    from scrollsam.precision import autocast_for
    from scrollsam.train import prompt_sets
    from scrollsam.train.forward import LossModule
    from scrollsam.train.optim import make_optimizer
    from scrollsam.train.prefetch import DevicePrefetch
    from scrollsam.train.step import prompted_forward

    torch.manual_seed(0)
    attention = "official" if case.path == "official" else "fused"
    prompts, losses, chans = PromptConfig(), LossConfig(), 3
    with device:  # parameters initialised on the device: vit_h builds in seconds, not minutes
        if case.xray:
            cfg = load_config(XRAY_CONFIG, [
                f"model.type={case.model}", f"model.image_size={case.size}",
                "model.checkpoint=null", f"model.window_size={case.window or 'null'}",
                f"model.attention={attention}"])
            chans = cfg.data.z_end - cfg.data.z_start  # the band's slices
            model = model_from_config(cfg.model, in_chans=chans)
            prompts, losses = cfg.prompts, cfg.loss
        else:
            model = build_model(case.model, image_size=case.size, window_size=case.window,
                                attention=attention)
    if case.path != "official":
        fuse_attention(model.sam.image_encoder, mode=case.path)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]  # the whole model, or as set
    # as train.compile does it: the encoder, the decoder, then static prompt sets
    static = case.compile and compile_model(model, device=device, backend=compile_backend)
    opt = make_optimizer(params, lr=1e-5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(case.batch, chans, case.size, case.size, generator=gen)
    label = blob_labels(case.batch, case.size, device=torch.device("cpu"), gen=gen)
    valid = torch.ones_like(label)  # (B, 1, S, S)
    batch = {"image": images, "label": label, "valid": valid,
             "has_ink": ink_flags(label, valid)}  # (B,) the dataset's flags
    if device.type == "cuda":  # pinned, as the loader gives it; the loop's prefetch copies it
        batch.update({k: batch[k].pin_memory() for k in ("image", "label", "valid")})
    else:  # (images made on the device, the truth on the host: the step moves it)
        batch["image"] = images.to(device)
    batches = DevicePrefetch(itertools.repeat(batch), device)  # a side stream on CUDA
    if case.prompts == "free":
        prompts = PromptConfig(prompt_free_share=1.0, corrective_rounds=0)
    elif case.prompts == "center":
        prompts = PromptConfig(corrective="center")
    families = prompt_sets.PER_KIND if case.prompts == "perkind" else prompt_sets.FAMILIES
    # the loop's own forward module: encode (no value check), then the prompted loss
    loss_of = LossModule(model, None, prompt_cfg=prompts, loss_cfg=losses, device=device,
                         forward=partial(prompted_forward, static=static, families=families))
    drawn = [0]  # samples drawn so far: each step's tiles get new prompt seeds, as in training

    def step() -> float:
        seeds = prompt_sets.tile_seeds(0, range(drawn[0], drawn[0] + case.batch))
        drawn[0] += case.batch
        batch = next(batches)
        with (cast or partial(autocast_for, device, True))():
            out = loss_of(batch["image"], batch["label"], batch["valid"], seeds,
                          has_ink=batch["has_ink"])
        out.parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not read_loss:
            return float("nan")
        return float(out.parts["loss"].detach())  # the loop logs it: a sync, as in training

    return step, model


def count_syncs(step) -> int:
    """The waits for the device in one call of ``step`` that
    ``torch.cuda.set_sync_debug_mode`` reports (expected: 1, the loss the loop reads). CUDA
    only."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def count_flops(step) -> float:
    """FLOPs of one call of ``step`` (forward and backward) with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())
