"""``train.compile``: torch.compile of the image encoder and the mask decoder, with static
shapes, and of the loss's per-pixel terms, or a warning.

The encoder is most of a training step's work and sees one shape per run (B tiles of S x S,
``drop_last`` batches), so it is compiled in place (``nn.Module.compile``: parameter names and
checkpoints stay the official ones) with ``dynamic=False``. The decoder (the segmenter's
``_predict_masks``: transformer, upscaling, hypernetworks) runs several times a step, a few
hundred small kernels each time, which is where a small batch's step waits on the host. The
training loop then decodes with static prompt sets (``prompted_forward(static=True)``): every
set in every round, so each round has one shape per run. After warm-up nothing recompiles: per
module one graph for training (grad mode) per round, one for validation (no_grad), one more for
a last, smaller validation batch. ``tests/test_compile.py`` checks it with dynamo's counters.
The loss's per-pixel terms (:func:`scrollsam.mask_loss.pixel_terms`) are compiled with the
number of sets dynamic: up to four graphs per function with the default prompts, the last of
them made when a step first has a rare chunk (one set), which can be a few steps in. Each run
starts dynamo afresh (its limit of 8 graphs per function is then the run's, not shared with a
sweep's earlier trials).

Where compile cannot run (a Python torch's dynamo does not support, no C++ compiler for the CPU
backend, no Triton for CUDA) one warning line says why and the model runs eagerly; a backend
that fails while compiling falls back to eager too (dynamo's ``suppress_errors``).
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from scrollsam.device import tune_for_fixed_shapes

log = logging.getLogger(__name__)

BACKEND = "inductor"  # tests swap in "aot_eager": the same graphs and guards, no C++ build


def compile_unavailable(device: torch.device | str, backend: str | None = None) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run on ``device`` here, or None if it can."""
    backend = backend or BACKEND
    try:
        import torch._dynamo as dynamo
    except Exception as err:  # an odd torch build
        return f"torch._dynamo cannot be imported ({type(err).__name__}: {err})"
    if not dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if backend != "inductor":
        return None
    kind = torch.device(device).type
    if kind == "cpu":
        compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
        if not any(shutil.which(c) for c in compilers):
            return "no C++ compiler (g++ / clang++) for the CPU backend"
    elif kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed for the CUDA backend"
    return None


def compile_model(model: nn.Module, *, device: torch.device | str,
                  backend: str | None = None, bf16: bool = False) -> bool:
    """``train.compile``: the encoder, then the mask decoder, each where compile can run, then
    the training loss's per-pixel terms (``model.compiled_loss``: the step's loss passes it on
    to :func:`scrollsam.mask_loss.pixel_terms`, dynamic shapes). True when the encoder and
    decoder compiled: only then should the step decode static prompt sets (every set in every
    round), which buy a compiled decoder one shape per round and an eager one extra work; then,
    too, cuDNN times its convolutions once per shape
    (:func:`scrollsam.device.tune_for_fixed_shapes`).

    ``bf16``: the step runs under bf16 autocast. On a CPU the decoder then stays eager (one
    warning line): inductor's CPU code gave the compiled decoder non-finite gradients from the
    first step (tiny model, 128 px, torch 2.15; 64 px and float32 were right), a NaN loss at
    step 1."""
    if torch.device(device).type == "cpu":
        quiet_cuda_home_notice()
    if compile_unavailable(device, backend) is None:
        import torch._dynamo as dynamo

        dynamo.reset()  # a new run: dynamo's recompile limit (8 graphs per function) anew,
        # as in a sweep's next trial
    if not compile_encoder(model, device=device, backend=backend):
        return False
    decoder = not (bf16 and torch.device(device).type == "cpu"
                   and (backend or BACKEND) == "inductor")
    if not decoder:
        log.warning("train.compile: the mask decoder stays eager on a CPU under bf16 autocast "
                    "(compiled, its gradients were not finite); the encoder and the loss are "
                    "compiled")
    elif not compile_decoder(model, device=device, backend=backend):
        return False
    model.compiled_loss = backend or BACKEND
    log.info("training loss's per-pixel terms compiled (%s, dynamic shapes)",
             model.compiled_loss)
    if decoder:  # one shape per round: cuDNN may time each convolution once (eager steps
        tune_for_fixed_shapes(torch.device(device))  # change the prompt masks' shapes)
    return decoder


def _not_cuda_home_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_cuda_home_notice() -> None:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." log line, which inductor's
    C++ toolchain prints when it compiles for a CPU on a machine with a CUDA toolkit but no
    GPU: nothing is wrong, and nothing in a CPU run uses CUDA. Other lines pass."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_not_cuda_home_notice)


def compile_decoder(model: nn.Module, *, device: torch.device | str,
                    backend: str | None = None) -> bool:
    """Compile the segmenter's mask decoder pass (``model._predict_masks``) in place, static
    shapes; True if it was compiled. Parameters and checkpoints are untouched. Where compile is
    unavailable, logs one warning line and leaves it eager."""
    backend = _backend_ready(device, backend)
    if backend is None:
        return False
    model._predict_masks = torch.compile(model._predict_masks, dynamic=False, backend=backend)
    log.info("mask decoder compiled (%s, static shapes: every prompt set in every round)",
             backend)
    return True


def compile_encoder(model: nn.Module, *, device: torch.device | str,
                    backend: str | None = None) -> bool:
    """Compile ``model.sam.image_encoder`` in place (static shapes); True if it was compiled.

    Where compile is unavailable, logs one warning line and leaves the encoder eager.
    """
    backend = _backend_ready(device, backend)
    if backend is None:
        return False
    model.sam.image_encoder.compile(dynamic=False, backend=backend)
    log.info("image encoder compiled (%s, static shapes): the first step pays the compile",
             backend)
    return True


def _backend_ready(device: torch.device | str, backend: str | None) -> str | None:
    """The backend to compile with (``backend`` or :data:`BACKEND`), dynamo set to fall back to
    eager if it fails; None, after one warning line, where compile cannot run."""
    reason = compile_unavailable(device, backend)
    if reason is not None:
        log.warning("train.compile: %s; running without compile", reason)
        return None
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a failing backend falls back to eager
    return backend or BACKEND
