"""The frozen-encoder training step with one codebase's CLI settings, timed in its own process.

vit_b at 256 px, batch 4, prompt encoder and mask decoder trainable, cached (random) embeddings,
each codebase's default prompts and losses, AdamW; 3 warm-up steps, then the median of 15. Run it
against an older checkout to compare code of two days on one machine (issue 13's cached-step goal
against the code where the speed work began, commit 6e636ad, which had no bf16 and no malloc
settings)::

    git worktree add /tmp/w6e 6e636ad
    (cd /tmp/w6e && PYTHONPATH=src python /path/to/benchmarks/cached_step_across_commits.py old)
    PYTHONPATH=src python benchmarks/cached_step_across_commits.py new       # the CLI's settings
    PYTHONPATH=src python benchmarks/cached_step_across_commits.py new fp32  # the same, fp32

``new`` applies what the CLI applies (``scrollsam.process.tune_process``; bf16 autocast unless
``fp32`` is given); ``old`` runs fp32 with no process settings. Alternate the runs: one line each.
The training loop's NaN guard, loss read-back and gradient clipping are left out at both commits.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time

if len(sys.argv) < 2 or sys.argv[1] not in ("old", "new") or sys.argv[2:] not in ([], ["fp32"]):
    print("usage: cached_step_across_commits.py old | new [fp32]", file=sys.stderr)
    sys.exit(2)
NEW = sys.argv[1] == "new"
if NEW:  # before torch is imported, as the CLI does
    from scrollsam.process import tune_process
    tune_process()

import torch  # noqa: E402

from scrollsam import build_model  # noqa: E402
from scrollsam.config import LossConfig, PromptConfig  # noqa: E402
from scrollsam.model.trainable import set_trainable  # noqa: E402
from scrollsam.train.step import prompted_forward  # noqa: E402

try:
    from scrollsam.train.optim import make_optimizer
except ImportError:  # older checkouts
    from scrollsam.train.loop import make_optimizer  # type: ignore[no-redef]


def main() -> None:
    bf16 = NEW and "fp32" not in sys.argv
    torch.manual_seed(0)
    model = build_model("vit_b", image_size=256).train()
    set_trainable(model, ["prompt_encoder", "mask_decoder"])
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 256, 16, 16, generator=gen)  # (B, 256, g, g) cached embeddings
    label = (torch.rand(4, 1, 256, 256, generator=gen) > 0.7).float()  # (B, 1, S, S)
    valid = torch.ones_like(label)
    opt = make_optimizer(params, lr=1e-4, weight_decay=0.01)
    names = inspect.signature(prompted_forward).parameters
    kw = ({"prompt_cfg": PromptConfig(), "loss_cfg": LossConfig()} if "prompt_cfg" in names
          else {"prompts": PromptConfig(), "loss": LossConfig()})

    def step() -> None:
        g = torch.Generator().manual_seed(1)  # the same prompts every step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = prompted_forward(model, emb, label, valid, gen=g, **kw)
        (out.parts["loss"] if hasattr(out, "parts") else out.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    label_ = "new " + ("bf16" if bf16 else "fp32") if NEW else "old fp32"
    print(f"{label_}: median {statistics.median(times) * 1e3:.1f} ms a step")


if __name__ == "__main__":
    main()
