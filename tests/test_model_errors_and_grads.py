"""Clear errors at the model boundary, and gradients that reach exactly the trainable parts."""

from __future__ import annotations

import pytest
import torch

from scrollsam import build_model
from scrollsam.errors import InputError
from scrollsam.model.segmenter import SamSegmenter
from scrollsam.model.trainable import PARTS, count_parameters, set_trainable

S = 64


@pytest.fixture(scope="module")
def model() -> SamSegmenter:
    torch.manual_seed(0)
    return build_model("tiny", image_size=S)


@pytest.fixture()
def emb() -> torch.Tensor:
    return torch.randn(3, 256, S // 16, S // 16, generator=torch.Generator().manual_seed(0))


def _pts(p: int = 3, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.tensor([[10.0, 20.0], [30.0, 5.0], [63.0, 0.0], [0.0, 0.0]]).repeat(p, 1, 1)
    return coords[:, :n], torch.tensor([1, 0, 1, -1][:n]).repeat(p, 1)


@pytest.mark.parametrize("call, match", [
    (lambda m, e: m.decode(e, points=(torch.zeros(3, 2), torch.ones(3, dtype=torch.long))),
     r"points coords: expected float32 \[P, N, 2\].*got torch.float32 \[3, 2\]"),
    (lambda m, e: m.decode(e, points=(_pts()[0], _pts()[1].float())),
     r"points labels: expected an integer tensor.*float32"),
    (lambda m, e: m.decode(e, points=(_pts()[0].long(), _pts()[1])),
     r"points coords: expected float32.*int64.*\.float\(\)"),
    (lambda m, e: m.decode(e, points=(_pts()[0] / 64.0, _pts()[1])),
     r"normalised 0\.\.1 coordinates\? multiply by 64"),
    (lambda m, e: m.decode(e, points=(_pts()[0] + 10, _pts()[1])),
     r"pixels of the 64 x 64 input frame in \[0, 64\) \(box corners: \[0, 64\]\), got "
     r"values in \[10, 73\]"),
    (lambda m, e: m.decode(e, points=(_pts()[0], _pts()[1] * 4)),
     r"points labels: expected values in \{-1, 0, 1\} \(2 / 3: box corners\), got \[-4, 4\]"),
    (lambda m, e: m.decode(e, points=_pts(p=5)),
     r"image_index: 5 prompt sets for 3 images; pass image_index"),
    (lambda m, e: m.decode(e, points=_pts(), image_index=torch.tensor([0, 1, 3])),
     r"image_index: expected int \[P\] with values in \[0, 3\), got values in \[0, 3\]"),
    (lambda m, e: m.decode(e, boxes=torch.tensor([[30.0, 0, 10, 10]] * 3)),
     r"boxes: expected .* x0 <= x1 and y0 <= y1"),
    (lambda m, e: m.decode(e, mask_inputs=torch.zeros(3, 1, 64, 64)),
     r"mask_inputs: expected float logits \[P, 1, 16, 16\], got torch.float32 \[3, 1, 64, 64\]"),
    (lambda m, e: m.decode(e[:, :, :2]),
     r"embeddings: expected float \[B, 256, 4, 4\]"),
    (lambda m, e: m.decode(e, points=_pts(), boxes=torch.tensor([[0.0, 0, 1, 1]] * 2)),
     r"same number of prompt sets P"),
    (lambda m, e: m.encode(torch.rand(2, 3, S, S) * 255),
     r"images: expected normalised values.*raw 0\.\.255"),
    (lambda m, e: m.encode(torch.zeros(2, 1, S, S)),
     r"images: expected float \[B, 3, 64, 64\] normalised images, got torch.float32 \[2, 1"),
])
def test_boundary_errors_name_argument_form_and_value(model, emb, call, match):
    with pytest.raises(InputError, match=match):
        call(model, emb)


def test_pixel_points_at_frame_edges_are_accepted(model, emb):
    logits, _ = model.decode(emb, points=_pts())
    assert logits.shape == (3, 1, 16, 16)


def test_box_corners_as_points_reach_the_far_edge_as_boxes_do(model, emb):
    """check_boxes takes x1 = S; the same box as corner points (labels 2, 3) is accepted too,
    while an ordinary point at S is outside the frame."""
    from scrollsam.train.prompt_sets import corner_points

    boxes = torch.tensor([[0.0, 10.0, S, S]] * 3)  # (3, 4) touching the right and bottom edges
    want, _ = model.decode(emb, boxes=boxes)
    got, _ = model.decode(emb, points=corner_points(boxes), pad=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(InputError, match=r"box corners: \[0, 64\]\), got values in \[0, 64\]"):
        model.decode(emb, points=(boxes.reshape(3, 2, 2), torch.ones(3, 2, dtype=torch.long)))


def _loss(model: SamSegmenter) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = model.image_size
    images = torch.randn(2, 3, s, s, generator=g)
    emb = model.encode(images)
    coords, labels = _pts(p=2)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 50.0]] * 2)
    a, ia = model.decode(emb, points=(coords, labels), boxes=boxes, multimask=True)
    b, ib = model.decode(emb, points=(coords, labels),
                         mask_inputs=torch.randn(2, 1, s // 4, s // 4, generator=g))
    c, ic = model.decode(emb)
    return sum(t.square().mean() for t in (a, ia, b, ib, c, ic))


def _shifts_scores_only(name: str) -> bool:
    """The key bias of a token-to-image attention adds the same amount to all of a query's
    scores, which softmax ignores: its gradient is zero (scrollsam leaves it out)."""
    return "token_to_image.k_proj.bias" in name


@pytest.mark.parametrize("parts, size", [
    *[(parts, size) for size in (S, 256) for parts in (  # 256: the training default
        ("mask_decoder",), ("prompt_encoder", "mask_decoder"), ("image_encoder",), PARTS)],
    (PARTS, 1024),  # official SAM's size, once (about 10 s on a 2-core CPU)
])
def test_gradients_reach_exactly_the_trainable_parts(parts, size):
    torch.manual_seed(0)
    model = build_model("tiny", image_size=size)
    counts = set_trainable(model, parts)
    _loss(model).backward()
    for name, p in model.sam.named_parameters():
        part = name.split(".")[0]
        if part in parts and _shifts_scores_only(name):
            assert p.grad is None or not p.grad.any(), name
        elif part in parts:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    for part in PARTS:
        c = counts[part]
        assert c.trainable == (c.total if part in parts else 0)
    assert counts["total"].trainable == sum(counts[p].total for p in parts)


def test_count_parameters_matches_official_decoder_size(model):
    counts = count_parameters(model)
    assert counts["mask_decoder"].total == sum(
        p.numel() for p in model.sam.mask_decoder.parameters())
    assert counts["mask_decoder"].total > 3_000_000  # the full official decoder


def test_unknown_trainable_part_is_an_error(model):
    with pytest.raises(InputError, match="trainable parts"):
        set_trainable(model, ["decoder"])


class _WrappedLinear(torch.nn.Linear):
    """A stand-in for an adapter: same weights, a different forward that decoder_ops would skip."""


def test_decoder_ops_refuse_a_wrapped_layer_and_name_it():
    torch.manual_seed(0)
    model = build_model("tiny", image_size=S)
    attn = model.sam.mask_decoder.transformer.layers[1].cross_attn_token_to_image
    plain = attn.k_proj
    wrapped = _WrappedLinear(plain.in_features, plain.out_features)
    wrapped.load_state_dict(plain.state_dict())
    attn.k_proj = wrapped  # after the model was built: caught on the first decode
    with pytest.raises(TypeError, match=r"mask_decoder\.transformer\.layers\.1\."
                                        r"cross_attn_token_to_image\.k_proj: .* bypass this "
                                        r"_WrappedLinear"):
        model.decode(torch.zeros(1, 256, S // 16, S // 16))
    attn.k_proj = plain
    model.decode(torch.zeros(1, 256, S // 16, S // 16))  # the official layer again: fine
    up = model.sam.mask_decoder.output_upscaling
    up[1] = torch.nn.GroupNorm(1, up[1].weight.shape[0])
    with pytest.raises(TypeError, match=r"output_upscaling\.1: .*LayerNorm2d"):
        SamSegmenter(model.sam, model_type="tiny")  # and when a model is built


def test_check_values_off_keeps_form_checks_and_skips_value_reads(model, emb):
    bad_values = (_pts()[0] + 10, _pts()[1] * 2)  # out of the frame, labels outside -1..1
    model.decode(emb, points=bad_values, check_values=False)  # not read: no error
    with pytest.raises(InputError, match=r"points coords: expected float32 \[P, N, 2\]"):
        model.decode(emb, points=(torch.zeros(3, 2), torch.ones(3, dtype=torch.long)),
                     check_values=False)
    with pytest.raises(InputError, match="images: expected float"):
        model.encode(torch.zeros(2, 1, S, S), check_values=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pad", [True, False])
def test_point_tokens_equal_the_official_prompt_encoder(model, dtype, pad):
    from scrollsam.model.segmenter import embed_point_tokens

    pe = model.sam.prompt_encoder
    coords, labels = _pts()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = embed_point_tokens(pe, coords, labels, pad=pad)
        official = pe._embed_points(coords, labels, pad=pad)
    assert ours.dtype == official.dtype and ours.shape == official.shape
    torch.testing.assert_close(ours, official, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_images_and_mask_prompts_of_another_float_dtype_are_refused_naming_it(model, emb, dtype):
    # QA: these failed deep in torch ("mat1 and mat2 must have the same dtype")
    images = torch.randn(2, 3, S, S).to(dtype)
    with pytest.raises(InputError, match=rf"images: expected torch.float32, the model's dtype "
                       rf"\(16-bit only under torch.autocast\), got {dtype} \[2, 3, 64, 64\] "
                       r"on cpu \(convert with \.to\(torch.float32\)\)"):
        model.encode(images, check_values=False)  # a form check: on without value checks too
    with pytest.raises(InputError, match=rf"mask_inputs: expected torch.float32.*got {dtype}"):
        model.decode(emb, mask_inputs=torch.zeros(3, 1, S // 4, S // 4, dtype=dtype))


def test_float64_embeddings_are_refused_and_16_bit_ones_decode_as_float32(model, emb):
    with pytest.raises(InputError, match=r"embeddings: expected torch.float32, the model's dtype "
                       r"\(or 16-bit\), got torch.float64 \[3, 256, 4, 4\]"):
        model.decode(emb.double())
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):  # e.g. the training cache's float16 ones
            low = emb.to(dtype)
            torch.testing.assert_close(model.decode(low), model.decode(low.float()))


def test_under_autocast_float32_and_16_bit_inputs_work_and_float64_is_refused(model):
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 1, S // 4, S // 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            logits, _ = model.decode(model.encode(images.to(dtype)), mask_inputs=mask.to(dtype))
            assert logits.shape == (2, 1, S // 4, S // 4) and bool(logits.isfinite().all())
        with pytest.raises(InputError, match=r"images: expected torch.float32, the model's "
                           r"dtype \(or 16-bit under torch.autocast\), got torch.float64"):
            model.encode(images.double())
