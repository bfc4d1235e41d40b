"""Batched decoding equals official SAM decoding one image at a time (the seed's batching bug)."""

from __future__ import annotations

import pytest
import torch

from scrollsam import build_model
from scrollsam.model.segmenter import SamSegmenter

S = 1024  # vit_b prompt-encoder / decoder shapes: 64 x 64 embeddings, 256 x 256 mask logits
GRID, LOW = S // 16, S // 4
B = 3  # an odd batch size, as the seed recommends, so batch mix-ups show


@pytest.fixture(scope="module")
def model() -> SamSegmenter:
    torch.manual_seed(0)
    m = build_model("vit_b", image_size=S).eval()
    return m


@pytest.fixture(scope="module")
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _embeddings(g: torch.Generator, b: int = B) -> torch.Tensor:
    return torch.randn(b, 256, GRID, GRID, generator=g)


def _points(g: torch.Generator, p: int, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.randint(0, S, (p, n, 2), generator=g).float()  # (P, N, 2) as (x, y)
    labels = torch.randint(0, 2, (p, n), generator=g)
    labels[:, -2:] = -1  # ragged sets padded with -1
    labels[0, 1:] = -1
    return coords, labels


def _boxes(g: torch.Generator, p: int) -> torch.Tensor:
    xy = torch.randint(0, S // 2, (p, 2), generator=g).float()
    wh = torch.randint(10, S // 2, (p, 2), generator=g).float()
    return torch.cat([xy, xy + wh], dim=1)  # (P, 4) XYXY


def _official(model: SamSegmenter, emb: torch.Tensor, index: torch.Tensor, *, points=None,
              boxes=None, masks=None, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Official prompt encoder + mask decoder, called once per image with its own prompt sets."""
    sam = model.sam
    p = index.shape[0]
    logits = torch.zeros(p, 3 if multimask else 1, LOW, LOW)
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


CASES = {
    "points": lambda g, p: dict(points=_points(g, p)),
    "boxes": lambda g, p: dict(boxes=_boxes(g, p)),
    "points+boxes": lambda g, p: dict(points=_points(g, p), boxes=_boxes(g, p)),
    "masks": lambda g, p: dict(mask_inputs=torch.randn(p, 1, LOW, LOW, generator=g)),
    "points+masks": lambda g, p: dict(points=_points(g, p),
                                      mask_inputs=torch.randn(p, 1, LOW, LOW, generator=g)),
}


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_batched_decode_equals_official_per_image(model, gen, case, multimask):
    emb = _embeddings(gen)
    prompts = CASES[case](gen, B)
    logits, iou = model.decode(emb, multimask=multimask, **prompts)
    want_logits, want_iou = _official(
        model, emb, torch.arange(B), points=prompts.get("points"), boxes=prompts.get("boxes"),
        masks=prompts.get("mask_inputs"), multimask=multimask)
    assert logits.shape == (B, 3 if multimask else 1, LOW, LOW)
    assert iou.shape == (B, 3 if multimask else 1)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["points", "boxes", "masks"])
@torch.no_grad()
def test_several_prompt_sets_per_image_via_image_index(model, gen, case):
    emb = _embeddings(gen)
    index = torch.tensor([2, 0, 1, 0, 2, 2])  # unsorted, image 2 has three sets
    prompts = CASES[case](gen, len(index))
    logits, iou = model.decode(emb, image_index=index, multimask=True, **prompts)
    want_logits, want_iou = _official(
        model, emb, index, points=prompts.get("points"), boxes=prompts.get("boxes"),
        masks=prompts.get("mask_inputs"), multimask=True)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)


@torch.no_grad()
def test_prompt_free_is_one_mask_per_image(model, gen):
    emb = _embeddings(gen)
    logits, iou = model.decode(emb)
    want_logits, want_iou = _official(model, emb, torch.arange(B), multimask=False)
    assert logits.shape == (B, 1, LOW, LOW)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)


@torch.no_grad()
def test_chunked_decode_is_the_same(model, gen):
    emb = _embeddings(gen)
    index = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    pts = _points(gen, len(index))
    whole = model.decode(emb, points=pts, image_index=index)
    for chunk in (1, 2, 3, 100):
        parts = model.decode(emb, points=pts, image_index=index, chunk=chunk)
        torch.testing.assert_close(parts[0], whole[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(parts[1], whole[1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_official_decoder_cannot_batch_images_but_ours_can(model, gen):
    """Reproduces the seed: official MaskDecoder with B images and B prompt sets breaks."""
    emb = _embeddings(gen)
    coords, labels = _points(gen, B)
    sparse, dense = model.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape == (B, coords.shape[1] + 1, 256)  # the "65": one padding point added
    with pytest.raises(RuntimeError):
        model.sam.mask_decoder(emb, model.sam.prompt_encoder.get_dense_pe(), sparse, dense,
                               multimask_output=False)
    logits, _ = model.decode(emb, points=(coords, labels))
    assert logits.shape == (B, 1, LOW, LOW)
    # each set really is decoded against its own image: swapping images changes the answer
    swapped, _ = model.decode(emb, points=(coords, labels), image_index=torch.tensor([1, 2, 0]))
    assert not torch.allclose(logits, swapped)


def test_embed_prompts_shapes(model, gen):
    coords, labels = _points(gen, 4, n=64)
    sparse, dense = model.embed_prompts((coords, labels))
    assert sparse.shape == (4, 65, 256)  # 64 points + the official padding point
    assert dense.shape == (4, 256, GRID, GRID)
    sparse, _ = model.embed_prompts((coords, labels), _boxes(gen, 4))
    assert sparse.shape == (4, 66, 256)  # no padding point with a box: 64 + 2 corners
    sparse, dense = model.embed_prompts(num_sets=5)
    assert sparse.shape == (5, 0, 256) and dense.shape == (5, 256, GRID, GRID)


@pytest.mark.parametrize("case", ["points", "masks"])  # first block per image / per set
def test_gradients_equal_official(model, gen, case):
    """Training sees the official gradients: every trainable parameter and the embeddings."""
    emb = _embeddings(gen).requires_grad_(True)
    index = torch.tensor([2, 0, 0, 2, 1, 2])  # unsorted, several sets per image
    prompts = CASES[case](gen, len(index))
    w_logits = torch.randn(len(index), 3, LOW, LOW, generator=gen)
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
