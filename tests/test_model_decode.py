"""Batched decoding equals official SAM decoding one image at a time (the seed's batching bug)."""

from __future__ import annotations

import pytest
import torch

from scrollsam import build_model
from scrollsam.errors import InputError
from scrollsam.model.segmenter import SamSegmenter

# Model input sides S: 1024 (official SAM: 64 x 64 embeddings, 256 x 256 mask logits), 256 (the
# training default) and 64 (a 4 x 4 grid). The decoder is the same official one in every variant,
# so the smaller sizes use the tiny encoder.
SIZES = {1024: "vit_b", 256: "tiny", 64: "tiny"}
B = 3  # an odd batch size, as the seed recommends, so batch mix-ups show


@pytest.fixture(scope="module", params=list(SIZES), ids=lambda s: f"S{s}")
def model(request) -> SamSegmenter:
    torch.manual_seed(0)
    m = build_model(SIZES[request.param], image_size=request.param).eval()
    return m


def _sizes(model: SamSegmenter) -> tuple[int, int, int]:
    """(S, S/16, S/4) of ``model``."""
    return model.image_size, model.embed_grid, model.mask_size


@pytest.fixture(scope="module")
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _embeddings(g: torch.Generator, s: int, b: int = B) -> torch.Tensor:
    return torch.randn(b, 256, s // 16, s // 16, generator=g)


def _points(g: torch.Generator, s: int, p: int, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.randint(0, s, (p, n, 2), generator=g).float()  # (P, N, 2) as (x, y)
    labels = torch.randint(0, 2, (p, n), generator=g)
    labels[:, -2:] = -1  # ragged sets padded with -1
    labels[0, 1:] = -1
    return coords, labels


def _boxes(g: torch.Generator, s: int, p: int) -> torch.Tensor:
    xy = torch.randint(0, s // 2, (p, 2), generator=g).float()
    wh = torch.randint(10, s // 2, (p, 2), generator=g).float()
    return torch.cat([xy, xy + wh], dim=1)  # (P, 4) XYXY


def _official(model: SamSegmenter, emb: torch.Tensor, index: torch.Tensor, *, points=None,
              boxes=None, masks=None, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Official prompt encoder + mask decoder, called once per image with its own prompt sets."""
    sam = model.sam
    p, low = index.shape[0], model.mask_size
    logits = torch.zeros(p, 3 if multimask else 1, low, low)
    iou = torch.zeros(p, 3 if multimask else 1)
    for b in range(emb.shape[0]):
        sel = (index == b).nonzero().flatten()
        if not len(sel):
            continue
        if points is None and boxes is None and masks is None:
            sparse, dense = sam.prompt_encoder(None, None, None)  # one set
            assert len(sel) == 1
        else:
            pts = (points[0][sel], points[1][sel]) if points is not None else None
            sparse, dense = sam.prompt_encoder(
                points=pts, boxes=None if boxes is None else boxes[sel],
                masks=None if masks is None else masks[sel])
        lg, io = sam.mask_decoder(
            image_embeddings=emb[b:b + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask)
        logits[sel], iou[sel] = lg, io
    return logits, iou


CASES = {  # (generator, S, P) -> prompts
    "points": lambda g, s, p: dict(points=_points(g, s, p)),
    "boxes": lambda g, s, p: dict(boxes=_boxes(g, s, p)),
    "points+boxes": lambda g, s, p: dict(points=_points(g, s, p), boxes=_boxes(g, s, p)),
    "masks": lambda g, s, p: dict(mask_inputs=torch.randn(p, 1, s // 4, s // 4, generator=g)),
    "points+masks": lambda g, s, p: dict(
        points=_points(g, s, p), mask_inputs=torch.randn(p, 1, s // 4, s // 4, generator=g)),
}


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_batched_decode_equals_official_per_image(model, gen, case, multimask):
    s, _, low = _sizes(model)
    emb = _embeddings(gen, s)
    prompts = CASES[case](gen, s, B)
    logits, iou = model.decode(emb, multimask=multimask, **prompts)
    want_logits, want_iou = _official(
        model, emb, torch.arange(B), points=prompts.get("points"), boxes=prompts.get("boxes"),
        masks=prompts.get("mask_inputs"), multimask=multimask)
    assert logits.shape == (B, 3 if multimask else 1, low, low)
    assert iou.shape == (B, 3 if multimask else 1)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["points", "boxes", "masks"])
@torch.no_grad()
def test_several_prompt_sets_per_image_via_image_index(model, gen, case):
    s = model.image_size
    emb = _embeddings(gen, s)
    index = torch.tensor([2, 0, 1, 0, 2, 2])  # unsorted, image 2 has three sets
    prompts = CASES[case](gen, s, len(index))
    logits, iou = model.decode(emb, image_index=index, multimask=True, **prompts)
    want_logits, want_iou = _official(
        model, emb, index, points=prompts.get("points"), boxes=prompts.get("boxes"),
        masks=prompts.get("mask_inputs"), multimask=True)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)


@torch.no_grad()
def test_boxes_as_corner_points_equal_official_boxes_and_share_a_call_with_point_sets(model, gen):
    """Box corners as points labelled 2 / 3 (``pad=False``: every sparse token given) decode as
    the official box prompt, with or without points, and point sets (their padding point given)
    and box sets with as many tokens share one call (what the training step does)."""
    from scrollsam.train.prompt_sets import corner_points

    s = model.image_size
    emb = _embeddings(gen, s)
    (coords, labels), boxes = _points(gen, s, B, n=3), _boxes(gen, s, B)
    corners = corner_points(boxes)
    want_box, want_box_iou = _official(model, emb, torch.arange(B), boxes=boxes, multimask=True)
    logits, iou = model.decode(emb, points=corners, pad=False, multimask=True)
    torch.testing.assert_close(logits, want_box, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_box_iou, atol=1e-4, rtol=0)
    # points, then corners (official order) and corners, then points (the step's order)
    want, _ = _official(model, emb, torch.arange(B), points=(coords, labels), boxes=boxes,
                        multimask=False)
    for order in ((coords, corners[0]), (corners[0], coords)):
        lab = (labels, corners[1]) if order[0] is coords else (corners[1], labels)
        got, _ = model.decode(emb, points=(torch.cat(order, 1), torch.cat(lab, 1)), pad=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # point sets with their padding point (3 + 1 tokens) beside box sets with a point (2 + 2)
    padded = (torch.cat([coords, torch.zeros(B, 1, 2)], 1),
              torch.cat([labels, torch.full((B, 1), -1)], 1))  # (B, 4, 2), (B, 4)
    box_sets = (torch.cat([coords[:, :2], corners[0]], 1),
                torch.cat([labels[:, :2], corners[1]], 1))  # (B, 4, 2), (B, 4)
    both = tuple(torch.cat(pair) for pair in zip(padded, box_sets, strict=True))
    got, _ = model.decode(emb, points=both, pad=False, image_index=torch.arange(2 * B) % B)
    want_points, _ = _official(model, emb, torch.arange(B), points=(coords, labels),
                               multimask=False)
    want_boxes, _ = _official(model, emb, torch.arange(B), boxes=boxes, multimask=False,
                              points=(coords[:, :2], labels[:, :2]))
    torch.testing.assert_close(got, torch.cat([want_points, want_boxes]), atol=1e-4, rtol=0)


@torch.no_grad()
def test_absent_tokens_are_never_attended_to(model, gen):
    """A set whose sparse tokens are all absent decodes as the prompt-free set; a set with
    absent tokens as the set without them: prompted and prompt-free sets share one call."""
    s = model.image_size
    emb = _embeddings(gen, s)
    coords, labels = _points(gen, s, B, n=3)
    free, free_iou = model.decode(emb)  # (B, 1, S/4, S/4): no prompt
    fewer, _ = model.decode(emb, points=(coords[:, :1], labels[:, :1]), pad=False)
    present = torch.tensor([[True, False, False]] * B + [[False] * 3] * B)  # (2B, 3)
    both = (torch.cat([coords, torch.full_like(coords, 7.0)]),
            torch.cat([labels, torch.ones_like(labels)]))  # absent tokens' values: anything
    got, iou = model.decode(emb, points=both, pad=False, present=present,
                            image_index=torch.arange(2 * B) % B)
    torch.testing.assert_close(got[:B], fewer, atol=1e-4, rtol=0)
    torch.testing.assert_close(got[B:], free, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou[B:], free_iou, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match=r"present: expected bool \[P, T\] = \[6, 3\]"):
        model.decode(emb, points=both, pad=False, present=present[:, :2],
                     image_index=torch.arange(2 * B) % B)


@torch.no_grad()
def test_all_masks_are_the_single_mask_output_then_the_three_multimask_ones(model, gen):
    s = model.image_size
    emb = _embeddings(gen, s)
    points = _points(gen, s, B)
    every, every_iou = model.decode(emb, points=points, all_masks=True)
    assert every.shape[1] == 4 and every_iou.shape[1] == 4
    for multimask, masks in ((False, slice(0, 1)), (True, slice(1, 4))):
        logits, iou = model.decode(emb, points=points, multimask=multimask)
        torch.testing.assert_close(every[:, masks], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(every_iou[:, masks], iou, atol=1e-5, rtol=0)


@torch.no_grad()
def test_prompt_free_is_one_mask_per_image(model, gen):
    s, _, low = _sizes(model)
    emb = _embeddings(gen, s)
    logits, iou = model.decode(emb)
    want_logits, want_iou = _official(model, emb, torch.arange(B), multimask=False)
    assert logits.shape == (B, 1, low, low)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)


@torch.no_grad()
def test_chunked_decode_is_the_same(model, gen):
    s = model.image_size
    emb = _embeddings(gen, s)
    index = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    pts = _points(gen, s, len(index))
    whole = model.decode(emb, points=pts, image_index=index)
    for chunk in (1, 2, 3, 100):
        parts = model.decode(emb, points=pts, image_index=index, chunk=chunk)
        torch.testing.assert_close(parts[0], whole[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(parts[1], whole[1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_official_decoder_cannot_batch_images_but_ours_can(model, gen):
    """Reproduces the seed: official MaskDecoder with B images and B prompt sets breaks."""
    s, _, low = _sizes(model)
    emb = _embeddings(gen, s)
    coords, labels = _points(gen, s, B)
    sparse, dense = model.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape == (B, coords.shape[1] + 1, 256)  # the "65": one padding point added
    with pytest.raises(RuntimeError):
        model.sam.mask_decoder(emb, model.sam.prompt_encoder.get_dense_pe(), sparse, dense,
                               multimask_output=False)
    logits, _ = model.decode(emb, points=(coords, labels))
    assert logits.shape == (B, 1, low, low)
    # each set really is decoded against its own image: swapping images changes the answer
    swapped, _ = model.decode(emb, points=(coords, labels), image_index=torch.tensor([1, 2, 0]))
    assert not torch.allclose(logits, swapped)


def test_embed_prompts_shapes(model, gen):
    s, grid, _ = _sizes(model)
    coords, labels = _points(gen, s, 4, n=64)
    sparse, dense = model.embed_prompts((coords, labels))
    assert sparse.shape == (4, 65, 256)  # 64 points + the official padding point
    assert dense.shape == (4, 256, grid, grid)
    sparse, _ = model.embed_prompts((coords, labels), _boxes(gen, s, 4))
    assert sparse.shape == (4, 66, 256)  # no padding point with a box: 64 + 2 corners
    sparse, dense = model.embed_prompts(num_sets=5)
    assert sparse.shape == (5, 0, 256) and dense.shape == (5, 256, grid, grid)


@pytest.mark.parametrize("case", ["points", "masks"])  # first block per image / per set
def test_gradients_equal_official(model, gen, case):
    """Training sees the official gradients: every trainable parameter and the embeddings."""
    s, _, low = _sizes(model)
    emb = _embeddings(gen, s).requires_grad_(True)
    index = torch.tensor([2, 0, 0, 2, 1, 2])  # unsorted, several sets per image
    prompts = CASES[case](gen, s, len(index))
    w_logits = torch.randn(len(index), 3, low, low, generator=gen)
    w_iou = torch.randn(len(index), 3, generator=gen)
    params = [p for n, p in model.named_parameters() if "image_encoder" not in n]

    def grads(logits: torch.Tensor, iou: torch.Tensor) -> list[torch.Tensor]:
        loss = (logits * w_logits).sum() + (iou * w_iou).sum()
        return torch.autograd.grad(loss, [emb, *params], allow_unused=True)

    ours = grads(*model.decode(emb, image_index=index, multimask=True, chunk=4, **prompts))
    want = grads(*_official(model, emb, index, points=prompts.get("points"),
                            masks=prompts.get("mask_inputs"), multimask=True))
    names = ["embeddings", *[n for n, _ in model.named_parameters() if "image_encoder" not in n]]
    top = max(float(b.abs().max()) for b in want if b is not None)
    checked = 0
    for name, a, b in zip(names, ours, want, strict=True):
        if b is None:  # unused by official SAM too: the box corners
            assert a is None or not a.any(), name
            continue
        # Unused here (None) where official SAM's gradient is zero: mask token 0 with
        # multimask; attention key biases, which shift all of a query's scores alike and so
        # are rounding noise there. Tolerance relative to the largest gradient for those.
        a = torch.zeros_like(b) if a is None else a
        atol = 2e-4 * float(b.abs().max()) + 1e-6 * top
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
        checked += 1
    assert checked > 30


def test_token_attention_never_asks_for_cudnn_kernels(model, gen, monkeypatch):
    """cuDNN builds an execution plan on the host for every new shape, and the prompt tokens'
    shapes change every training step: their attention must run with cuDNN's SDPA kernel
    switched off (and the other kernels on), whatever the global setting."""
    from scrollsam.model import decoder_ops

    seen = []
    real = decoder_ops.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_ops.F, "scaled_dot_product_attention", spy)
    _, grid, _ = _sizes(model)
    emb = torch.randn(2, 256, grid, grid, generator=gen)
    coords = torch.tensor([[[10.0, 20.0]], [[30.0, 5.0]]])
    model.decode(emb, points=(coords, torch.ones(2, 1, dtype=torch.long)))
    assert seen and all(s == (False, True, True) for s in seen), seen
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the global setting is back
