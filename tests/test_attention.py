"""Fused encoder attention against segment_anything's own: same values, same gradients, same
parameter names; windowed and global blocks, grids that need padding; window_size option."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block
from torch.utils._python_dispatch import TorchDispatchMode

from scrollsam import build_model
from scrollsam.errors import InputError
from scrollsam.model.adapt import resize_rel_pos
from scrollsam.model.attention import (
    FusedAttention,
    FusedBlock,
    _spans,
    fuse_attention,
    key_onehot,
    relative_index,
)
from scrollsam.model.build import VARIANTS, EncoderSpec, _build_sam

# vit_b's attention shape (768 wide, 12 heads of 64, 14 x 14 windows) in two blocks, one global
VIT_B_SHAPED = EncoderSpec(768, 2, 12, (1,), window_size=14)


def _official_encoder(spec: EncoderSpec, size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    enc = _build_sam(spec, image_size=size, in_chans=3, attention="official").image_encoder
    with torch.no_grad():  # non-zero position terms (official init is zero) so they count
        enc.pos_embed.normal_(std=0.5)
        for name, p in enc.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=0.5)
    return enc


def _fused(enc: torch.nn.Module, mode: str) -> torch.nn.Module:
    out = copy.deepcopy(enc)
    assert fuse_attention(out, mode=mode) == len(out.blocks)
    return out


CASES = [  # (spec, image size): grids 8 (window 8 exact), 5 and 15 (padded), 6 (padded to 14)
    pytest.param(VARIANTS["tiny"], 128, id="tiny-128"),
    pytest.param(VARIANTS["tiny"], 80, id="tiny-80-padded"),
    pytest.param(VARIANTS["tiny"], 240, id="tiny-240-padded"),
    pytest.param(VIT_B_SHAPED, 96, id="vit_b-shaped-96-padded"),
]


@pytest.mark.parametrize("mode", ["bias", "fold", "explicit", "auto"])
@pytest.mark.parametrize(("spec", "size"), CASES)
def test_same_outputs_and_parameter_gradients_as_official(spec, size, mode):
    official = _official_encoder(spec, size)
    fused = _fused(official, mode)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen)  # (B, C, S, S)
    ref, got = official(x), fused(x)  # (B, 256, S/16, S/16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    weight = torch.randn(ref.shape, generator=gen)  # a loss that weighs every output
    (ref * weight).sum().backward()
    (got * weight).sum().backward()
    grads = dict(fused.named_parameters())
    for name, p in official.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_global_and_windowed_blocks_are_both_swapped():
    enc = build_model("tiny", image_size=128).sam.image_encoder
    grids = [b.attn.grid for b in enc.blocks]
    assert all(isinstance(b.attn, FusedAttention) for b in enc.blocks)
    assert grids == [(8, 8)] * 4  # tiny: window 8; 128 px -> an 8 x 8 global grid as well
    enc = build_model("tiny", image_size=256).sam.image_encoder
    assert [b.attn.grid for b in enc.blocks] == [(8, 8), (16, 16), (8, 8), (16, 16)]


def test_windowed_blocks_run_qkv_and_proj_on_real_tokens_only():
    """A 6 x 6 grid in 14-wide windows: officially padded to 14 x 14 (196 tokens per image
    through qkv and proj); fused, the 36 real tokens and one zero token (qkv's padding value)."""
    enc = _fused(_official_encoder(VIT_B_SHAPED, 96), "auto")
    seen: dict[str, list[int]] = {"qkv": [], "proj": []}
    for name in seen:
        getattr(enc.blocks[0].attn, name).register_forward_hook(
            lambda mod, args, out, name=name: seen[name].append(args[0][..., 0].numel()))
    enc(torch.randn(2, 3, 96, 96))  # (B, C, S, S): B = 2
    assert enc.blocks[0].window_size == 14
    assert seen == {"qkv": [2 * 36, 1], "proj": [2 * 36]}


def test_only_real_tokens_ask_in_padded_windows(monkeypatch):
    """tiny at 240 px: a 15 x 15 grid in 8-wide windows (padded to 16 x 16) is cut into four
    regions whose windows ask with their real 8 x 8, 8 x 7, 7 x 8 and 7 x 7 tokens."""
    enc = _fused(_official_encoder(VARIANTS["tiny"], 240), "auto")
    calls = []
    original = FusedAttention.attend

    def attend(self, qkv, *, queries=None):
        if self is enc.blocks[0].attn:
            calls.append((qkv.shape[0], tuple(qkv.shape[1:3]), queries))
        return original(self, qkv, queries=queries)

    monkeypatch.setattr(FusedAttention, "attend", attend)
    enc(torch.randn(2, 3, 240, 240))
    assert calls == [(2, (8, 8), (8, 8)), (2, (8, 8), (8, 7)), (2, (8, 8), (7, 8)),
                     (2, (8, 8), (7, 7))]  # (windows, window, real part) per region, B = 2


@pytest.mark.parametrize("mode", ["bias", "fold", "explicit"])
def test_fewer_queries_are_the_full_attention_cropped(mode):
    torch.manual_seed(0)
    attn = Attention(96, num_heads=3, use_rel_pos=True, input_size=(6, 6))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    fused = FusedAttention(attn, grid=(6, 6), mode=mode)
    qkv = torch.randn(4, 6, 6, 3 * 96, requires_grad=True)  # (B, H, W, 3 dim)
    got = fused.attend(qkv, queries=(4, 5))
    full = fused.attend(qkv)
    torch.testing.assert_close(got, full[:, :4, :5], rtol=1e-5, atol=1e-5)
    assert got.shape == (4, 4, 5, 96)
    weight = torch.randn(got.shape)
    (grad_got,) = torch.autograd.grad((got * weight).sum(), qkv)
    (grad_full,) = torch.autograd.grad((full[:, :4, :5] * weight).sum(), qkv)
    torch.testing.assert_close(grad_got, grad_full, rtol=1e-5, atol=1e-5)


def test_spans_cut_a_padded_axis_into_inner_windows_and_the_edge():
    assert _spans(64, 14) == [(0, 56, 14), (56, 14, 8)]  # vit_b at 1024 px
    assert _spans(16, 14) == [(0, 14, 14), (14, 14, 2)]  # vit_b at 256 px
    assert _spans(6, 14) == [(0, 14, 6)]
    assert _spans(28, 14) == [(0, 28, 14)]
    assert all(isinstance(b, FusedBlock) for b in _fused(_official_encoder(
        VARIANTS["tiny"], 128), "auto").blocks)


@pytest.mark.parametrize("mode", ["bias", "fold", "explicit"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("grid", [(9, 20), (16, 5), (3, 3), (16, 24)])
def test_fused_block_is_the_official_block(grid, lora, mode):
    """Block level, where grids need not be square: padded along one axis or both, smaller than
    the window, whole windows; with a LoRA-wrapped qkv (its padding is qkv of a zero token)."""
    from segment_anything.modeling.image_encoder import Block

    from scrollsam.model.lora import LoRALinear

    torch.manual_seed(0)
    official = Block(32, 2, use_rel_pos=True, window_size=8, input_size=(8, 8))
    with torch.no_grad():
        official.attn.rel_pos_h.normal_()
        official.attn.rel_pos_w.normal_()
    if lora:
        official.attn.qkv = LoRALinear(official.attn.qkv, rank=2, alpha=4.0)
        with torch.no_grad():
            official.attn.qkv.lora_b.normal_()  # zero at init: make it count
    fused = FusedBlock(copy.deepcopy(official), grid=64, mode=mode)
    x = torch.randn(2, *grid, 32, generator=torch.Generator().manual_seed(1))  # (B, H, W, C)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ref, got = official(xs[0]), fused(xs[1])

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:  # largest error / largest value
        a, b = a.detach(), b.detach()
        return float((a - b).abs().max() / b.abs().max())

    assert relative(got, ref) < 1e-6
    weight = torch.randn(ref.shape)
    (ref * weight).sum().backward()
    (got * weight).sum().backward()
    assert relative(xs[1].grad, xs[0].grad) < 1e-5
    grads = dict(fused.named_parameters())
    for name, p in official.named_parameters():
        if p.grad is not None:
            assert relative(grads[name].grad, p.grad) < 1e-5, name


def test_unpadded_windows_need_no_padding_token():
    enc = _fused(_official_encoder(VARIANTS["tiny"], 128), "auto")  # 8 x 8 grid, window 8
    calls = []
    enc.blocks[0].attn.qkv.register_forward_hook(
        lambda mod, args, out: calls.append(args[0][..., 0].numel()))
    enc(torch.randn(1, 3, 128, 128))
    assert calls == [64]


def test_auto_mode_takes_sdpa_for_inference_and_explicit_for_training_on_cpu():
    attn = build_model("tiny", image_size=128).sam.image_encoder.blocks[0].attn
    assert attn.mode == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    shape = {"dtype": torch.float32, "keys": 64, "head_dim": 32}
    assert attn.resolved_mode(cpu, grad=False, **shape) == "bias"
    assert attn.resolved_mode(cpu, grad=True, **shape) == "explicit"
    assert attn.resolved_mode(cuda, grad=True, **shape) == "fold"
    assert attn.resolved_mode(cuda, grad=False, **shape) == "fold"
    seen = []
    original = FusedAttention.resolved_mode
    attn.resolved_mode = lambda dev, grad, **kw: seen.append(grad) or original(attn, dev,
                                                                               grad=grad, **kw)
    x = torch.randn(1, 8, 8, 96)
    with torch.no_grad():
        attn(x)
    attn(x)
    assert seen == [False, True]


@pytest.mark.parametrize(("triton_runs", "capability"), [(True, (9, 0)), (True, (7, 5)),
                                                         (False, (9, 0))])
def test_auto_mode_on_cuda_takes_the_triton_kernel_for_wide_16_bit_attention(
        triton_runs, capability, monkeypatch):
    """H100: the Triton kernel beat fold on the 64 x 64 global grid (6.0 against 8.3 ms a
    block) and lost on windows and at 256 px; float32 runs its slow exact products, head dims
    other than 64 are untimed, and GPUs before compute capability 8.0 have no bf16 in Triton."""
    from scrollsam.model import attention

    monkeypatch.setattr(attention, "triton_available", lambda device: triton_runs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    attn = build_model("tiny", image_size=128).sam.image_encoder.blocks[0].attn
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    wide = "triton" if triton_runs and capability >= (8, 0) else "fold"

    def mode(dtype: torch.dtype = bf16, keys: int = 64 * 64, head_dim: int = 64,
             device: torch.device = cuda) -> str:
        return attn.resolved_mode(device, grad=True, dtype=dtype, keys=keys, head_dim=head_dim)

    assert mode() == wide
    assert mode(torch.float16, keys=96 * 96) == wide
    assert mode(keys=14 * 14) == "fold"
    assert mode(keys=16 * 16) == "fold"
    assert mode(torch.float32) == "fold"
    assert mode(head_dim=80) == "fold"  # vit_h: untimed
    assert mode(device=torch.device("cpu")) == "explicit"


@pytest.mark.parametrize("mode", ["bias", "fold", "explicit"])
@pytest.mark.parametrize("size", [128, 80])  # 80: padded windows (the fill under autocast)
def test_bf16_autocast_close_to_official(mode, size):
    official = _official_encoder(VARIANTS["tiny"], size)
    fused = _fused(official, mode)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = official(x).float(), fused(x).float()
    assert got.dtype == torch.float32
    err = (got - ref).norm() / ref.norm()
    assert err < 0.02, f"bf16 relative difference {err:.4f}"


def test_state_dict_is_official_and_official_weights_load_unchanged():
    official = _official_encoder(VARIANTS["tiny"], 128)
    model = build_model("tiny", image_size=128)
    enc = model.sam.image_encoder
    assert list(enc.state_dict()) == list(official.state_dict())  # no index buffers saved
    enc.load_state_dict(official.state_dict())  # strict
    x = torch.randn(1, 3, 128, 128)
    torch.testing.assert_close(enc(x), official(x), rtol=1e-4, atol=1e-4)


def test_other_grid_falls_back_to_the_official_lookup():
    torch.manual_seed(0)
    attn = Attention(96, num_heads=3, use_rel_pos=True, input_size=(8, 8))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    fused = FusedAttention(copy.deepcopy(attn), grid=(8, 8), mode="bias")
    x = torch.randn(2, 6, 10, 96)  # a 6 x 10 grid: the tables are interpolated, as officially
    torch.testing.assert_close(fused(x), attn(x), rtol=1e-4, atol=1e-4)


def test_relative_index_is_the_official_one():
    assert relative_index(3, 3).tolist() == [[2, 1, 0], [3, 2, 1], [4, 3, 2]]


def test_official_attention_option_keeps_segment_anything_modules():
    enc = build_model("tiny", image_size=128, attention="official").sam.image_encoder
    assert all(type(b.attn) is Attention for b in enc.blocks)
    with pytest.raises(InputError, match="attention"):
        build_model("tiny", image_size=128, attention="flash")


# --- window size -------------------------------------------------------------------------------


def test_window_size_option_builds_unpadded_windows():
    model = build_model("tiny", image_size=256, window_size=16)
    blocks = model.sam.image_encoder.blocks
    assert [b.window_size for b in blocks] == [16, 0, 16, 0]  # 16 x 16 grid: one window
    assert blocks[0].attn.rel_pos_h.shape == (2 * 16 - 1, 32)
    with pytest.raises(InputError, match="window_size"):
        build_model("tiny", image_size=256, window_size=0)


def test_window_tables_are_interpolated_from_pretrained_ones(tmp_path):
    torch.manual_seed(0)
    sam = build_model("tiny", image_size=1024).sam  # window 8, as saved
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    path = tmp_path / "tiny_1024.pth"
    torch.save(sam.state_dict(), path)
    model = build_model("tiny", checkpoint=path, image_size=256, window_size=16)
    key = "image_encoder.blocks.0.attn.rel_pos_h"  # a windowed block: 15 -> 31 rows
    torch.testing.assert_close(model.sam.state_dict()[key],
                               resize_rel_pos(sam.state_dict()[key], 31))
    x = torch.randn(1, 3, 256, 256)
    assert torch.isfinite(model.encode(x)).all()


@pytest.mark.parametrize("mode", ["fold", "explicit"])
def test_buffers_live_beside_the_parameters_of_a_block_already_on_a_device(mode):
    # The GPU benchmark fuses blocks built on the GPU; "meta" stands in for it here. The
    # key one-hot buffer was made on the CPU and the fold form's concatenation failed.
    with torch.device("meta"):
        official = Block(64, num_heads=2, use_rel_pos=True, window_size=0, input_size=(8, 8))
    fused = FusedAttention(official.attn, grid=(8, 8), mode=mode)
    assert {b.device.type for b in fused.buffers()} == {"meta"}
    out = fused(torch.empty(2, 8, 8, 64, device="meta"))
    assert out.shape == (2, 8, 8, 64) and out.device.type == "meta"


def test_key_onehot_marks_each_keys_row_and_column():
    onehot = key_onehot(2, 3)  # keys (0, 0) (0, 1) (0, 2) (1, 0) (1, 1) (1, 2)
    assert onehot.dtype == torch.bool and onehot.shape == (6, 5)
    assert onehot.int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1],
                                     [0, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 0, 1]]


class _Outputs(TorchDispatchMode):
    """Every ATen operator run inside, with its output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, torch.Size]] = []  # (operator packet, output shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.seen.append((func.overloadpacket, out.shape))
        return out


def _padded_block() -> FusedBlock:
    """A windowed block (dim 32, 2 heads, 8-wide windows), explicit attention."""
    torch.manual_seed(0)
    return FusedBlock(Block(32, 2, use_rel_pos=True, window_size=8, input_size=(8, 8)),
                      grid=64, mode="explicit")


@pytest.mark.parametrize("grid", [(9, 20), (16, 20)])
def test_padded_windows_backward_writes_no_whole_grid_slices(grid):
    """A padded windowed block cuts its qkv into regions whose backward joins the parts with one
    cat per cut, not a zero-filled whole-grid tensor per region and slice that autograd then
    adds (the slicing form: 8 slice_backward and 3 adds of qkv's size per block at 1024 px)."""
    block = _padded_block()
    x = torch.randn(2, *grid, 32, requires_grad=True)  # (B, H, W, C): padded both ways, or W
    out = block(x)
    with _Outputs() as ops:
        out.square().sum().backward()
    # last dim of every slice_backward's output
    widths = [shape[-1] for op, shape in ops.seen if op is torch.ops.aten.slice_backward]
    assert 3 * 32 not in widths  # qkv's width: small slices of q and the tables remain
    assert widths  # (the counter sees them)


def test_padded_windows_copy_qkv_about_once_forward():
    """Forward copies a padded windowed block's qkv into windows once, padding only the regions
    with a partial window (padding the whole grid first copied it twice more)."""
    block = _padded_block()
    x = torch.randn(1, 9, 20, 32)  # 16 x 24 padded, in regions of 8 x 16, 8 x 8, 8 x 16, 8 x 8
    with torch.no_grad(), _Outputs() as ops:
        block(x)
    copies = (torch.ops.aten.cat, torch.ops.aten.clone, torch.ops.aten.constant_pad_nd)
    # tokens of qkv's width written by copies and cats
    tokens = sum(shape.numel() // 96 for op, shape in ops.seen
                 if op in copies and shape[-1] == 96)
    # the three partial regions padded (8 x 8 + 8 x 16 + 1 x 8 then 8 x 8 tokens), the two
    # regions two windows wide put in window order (8 x 16 each; one window is in order
    # already); padding the grid, then copying each region into windows, wrote 984
    assert tokens == 264 + 256
