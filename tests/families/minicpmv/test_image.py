"""MiniCPM-V 2.6 slicing against a table derived by hand from the published algorithm.

Run: `.venv/bin/python -m pytest tests/families/minicpmv/test_image.py -q`
"""

import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmtune.families.minicpmv.image import (
    MiniCPMVImageTokens,
    find_best_grid,
    image_bound,
    normalize,
    placeholder_text,
    process_image,
    reshape_by_patch,
    slice_image,
)

# S = scale_resolution = 448 (S² = 200704), max_slice_nums = 9, patch = 14. Notation: ratio = w*h / S²,
# multiple = min(ceil(ratio), 9); candidate counts multiple-1..multiple+1 minus 1 and >9; err(m, n) =
# |log(w/h) - log(m/n)|. Source: h' = int(S / sqrt(w/h)), w' = int(h' * w/h), each rounded to a multiple of 14
# with round-half-even (ensure_divide). Slice cell: the original rounded to a multiple of the grid, divided by
# it, then resized like a source with upscaling allowed.
# (width, height, grid (cols, rows), slices, query tokens, source (w, h), slice (w, h) or None)
TABLE = [
    # 20x20: ratio 0.002 → multiple 1 → not sliced. Upscaled: h' = int(448/1) = 448, w' = 448 → 448x448.
    (20, 20, None, 0, 64, (448, 448), None),
    # 448x448: ratio 1.0 → ceil 1 → not sliced; r = 1 → 448x448.
    (448, 448, None, 0, 64, (448, 448), None),
    # 10x1000 (1:100, small): ratio 0.0498 → not sliced. Upscaled: h' = int(448/0.1) = 4480, w' = int(44.8) =
    # 44 → 44/14 = 3.14 → 42; 4480/14 = 320 → 4480. A 3x320-patch strip, still one view of 64 tokens.
    (10, 1000, None, 0, 64, (42, 4480), None),
    # 448x449: ratio 1.0022 → multiple 2 → counts {2, 3}; log(w/h) = -0.0022: (1,2) err 0.6909, (2,1) 0.6954,
    # (1,3) 1.0964, (3,1) 1.1008 → (1,2). Source: h' = int(448/0.99889) = 448, w' = int(447.0) = 447 →
    # 448x448. Cell: 449 rounded to 2 rows = round(224.5)*2 = 448 (half-even) → cell 448x224, r = 2: h' =
    # int(316.78) = 316 → 322 (22.57 → 23), w' = 632 → 630 (45.14 → 45) → 630x322.
    (448, 449, (1, 2), 2, 192, (448, 448), (630, 322)),
    # 200x2000 (1:10): ratio 1.993 → multiple 2 → counts {2, 3}; log(0.1) = -2.3026: (1,2) 1.6094, (2,1)
    # 2.9957, (1,3) 1.2040, (3,1) 3.4012 → (1,3). Source: h' = int(448/0.31623) = int(1416.7) = 1416 → 1414
    # (101.1), w' = int(141.6) = 141 → 140 (10.07). Cell: 2000 → round(666.67)*3 = 2001 → cell 200x667,
    # r = 0.29985: h' = int(818.13) = 818 → 812 (58.4), w' = int(245.28) = 245 → 245/14 = 17.5 → 18 → 252,
    # so 252x812.
    (200, 2000, (1, 3), 3, 256, (140, 1414), (252, 812)),
    # 2000x200 (10:1): counts {2, 3}; log(10) = 2.3026 → (3,1) err 1.2040. Source: h' = int(448/3.1623) =
    # int(141.67) = 141 → 140, w' = 1410 → 1414 (100.7). Cell: 667x200, r = 3.335: h' = int(245.32) = 245 →
    # 252 (17.5 → 18), w' = int(817.08) = 817 → 812 (58.4) → 812x252.
    (2000, 200, (3, 1), 3, 256, (1414, 140), (812, 252)),
    # 800x600: ratio 2.39 → multiple 3 → counts {2, 3, 4}; log(4/3) = 0.2877: (1,2) 0.9808, (2,1) 0.4055,
    # (1,3) 1.3863, (3,1) 0.8109, (1,4) 1.6740, (2,2) 0.2877, (4,1) 1.0986 → (2,2). Source: h' =
    # int(448/1.1547) = int(387.98) = 387 → 392 (27.6), w' = int(516.0) = 516 → 518 (36.9).
    # Cell 400x300 has the same aspect → 518x392.
    (800, 600, (2, 2), 4, 320, (518, 392), (518, 392)),
    # 1344x448: ratio 3.0 exactly → multiple 3 → counts {2, 3, 4}; log 3 = 1.0986: (2,1) 0.4055, (3,1) 0 →
    # (3,1). Source: h' = int(448/1.7321) = int(258.65) = 258 → 252 (18.4), w' = 774 → 770 (55.3).
    # Cell: 1344/3 = 448 x 448 → 448x448.
    (1344, 448, (3, 1), 3, 256, (770, 252), (448, 448)),
    # 1000x1000: ratio 4.98 → multiple 5 → counts {4, 5, 6}; log 1 = 0 → (2,2) is the first with err 0.
    # Source 448x448. Cell 500x500 → r = 1 → 448x448.
    (1000, 1000, (2, 2), 4, 320, (448, 448), (448, 448)),
    # 2000x3000: ratio 29.9 → multiple min(30, 9) = 9 → counts {8, 9} (10 > 9); log(2/3) = -0.4055: (1,8)
    # 1.6740, (2,4) 0.2877, (4,2) 1.0986, (8,1) 2.4849, (1,9) 1.7918, (3,3) 0.4055, (9,1) 2.6027 → (2,4).
    # Source: h' = int(448/0.8165) = int(548.69) = 548 → 546 (39.1), w' = int(365.33) = 365 → 364 (26.07).
    # Cell: 2000/2 x 3000/4 = 1000x750, r = 4/3 → 518x392 (as 800x600).
    (2000, 3000, (2, 4), 8, 576, (364, 546), (518, 392)),
    # 4000x4000: ratio 79.7 → multiple 9 → counts {8, 9}; log 1 = 0: (1,8), (2,4), (4,2), (8,1) err ≥ 0.69,
    # (3,3) err 0 → (3,3). Source 448x448. Cell: round(1333.3)*3 = 3999 → 1333x1333 → 448x448.
    (4000, 4000, (3, 3), 9, 640, (448, 448), (448, 448)),
]


@pytest.mark.parametrize(("width", "height", "grid", "slices", "tokens", "source_size", "slice_size"), TABLE)
def test_slicing_matches_hand_derived_table(width, height, grid, slices, tokens, source_size, slice_size):
    image = Image.new("RGB", (width, height), (120, 30, 200))
    source, rows, found_grid = slice_image(image)
    assert found_grid == grid
    assert find_best_grid((width, height)) == grid
    assert sum(len(row) for row in rows) == slices
    assert source.size == source_size
    if grid is not None:
        assert len(rows) == grid[1] and all(len(row) == grid[0] for row in rows)
        assert {cell.size for row in rows for cell in row} == {slice_size}
    out = process_image(image)
    assert len(out["pixel_values"]) == 1 + slices
    assert out["placeholder"].count("<unk>") == tokens == 64 * (1 + slices)


@pytest.mark.parametrize(("width", "height"), [(w, h) for w, h, *_ in TABLE])
def test_views_are_patch_aligned_and_source_keeps_aspect(width, height):
    source, rows, _ = slice_image(Image.new("RGB", (width, height)))
    for view in [source] + [cell for row in rows for cell in row]:
        assert view.size[0] % 14 == 0 and view.size[1] % 14 == 0
    # Some side of the source is within one patch of the size that restores the original aspect exactly.
    src_w, src_h = source.size
    assert min(abs(src_h - src_w * height / width), abs(src_w - src_h * width / height)) <= 14


def test_never_split_gives_one_view():
    out = process_image(Image.new("RGB", (2000, 3000)), never_split=True)
    assert out["grid"] is None and len(out["pixel_values"]) == 1
    assert out["tgt_sizes"].tolist() == [[39, 26]]  # 546 / 14, 364 / 14


def test_tgt_sizes_and_strip_shapes():
    out = process_image(Image.new("RGB", (800, 600)))
    assert out["tgt_sizes"].tolist() == [[28, 37]] * 5  # source and the four cells are all 518x392
    assert all(strip.shape == (3, 14, 28 * 37 * 14) for strip in out["pixel_values"])


def test_normalize_maps_to_minus_one_one():
    image = Image.new("RGB", (14, 14), (0, 255, 51))
    pixels = normalize(image)
    assert pixels.shape == (3, 14, 14)
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_reshape_by_patch_matches_unfold_layout():
    # The published strip: unfold into (C*p*p, L) patches, then lay them side by side (3, p, L*p).
    image = torch.randn(3, 28, 42)
    patches = F.unfold(image, (14, 14), stride=(14, 14)).reshape(3, 14, 14, -1)
    reference = patches.permute(0, 1, 3, 2).reshape(3, 14, -1)
    assert torch.equal(reshape_by_patch(image, 14), reference)


def test_placeholder_string_layout():
    unk64 = "<unk>" * 64
    assert placeholder_text(None, image_idx=3) == f"<image_id>3</image_id><image>{unk64}</image>"
    assert placeholder_text(None, use_image_id=False) == f"<image>{unk64}</image>"
    cell = f"<slice>{unk64}</slice>"
    text = placeholder_text((3, 2), image_idx=0)
    assert text == f"<image_id>0</image_id><image>{unk64}</image>{cell * 3}\n{cell * 3}"
    assert text.count("\n") == 1 and text.count("<slice>") == 6


TOKENS = MiniCPMVImageTokens()
SPECIAL = [TOKENS.image_start, TOKENS.image_end, TOKENS.slice_start, TOKENS.slice_end, TOKENS.unk]
SPECIAL += [TOKENS.image_id_start, TOKENS.image_id_end]
VOCAB = {token: i for i, token in enumerate(SPECIAL)}


def toy_tokenize(text: str) -> torch.Tensor:
    """Special tokens are one id each; any other character is one id (offset past the specials)."""
    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL) + ")"
    ids = []
    for piece in re.split(pattern, text):
        ids.extend([VOCAB[piece]] if piece in VOCAB else [100 + ord(c) for c in piece])
    return torch.tensor(ids)


def test_image_bound_ranges_cover_exactly_the_placeholders():
    text = "Q: " + process_image(Image.new("RGB", (2000, 3000)))["placeholder"] + " what?"
    ids = toy_tokenize(text)
    starts = [VOCAB[TOKENS.image_start], VOCAB[TOKENS.slice_start]]
    ends = [VOCAB[TOKENS.image_end], VOCAB[TOKENS.slice_end]]
    bounds = image_bound(ids, starts, ends)
    assert bounds.shape == (9, 2)
    assert (bounds[:, 1] - bounds[:, 0]).tolist() == [64] * 9
    covered = torch.cat([torch.arange(s, e) for s, e in bounds.tolist()])
    assert torch.equal(covered, torch.nonzero(ids == VOCAB[TOKENS.unk]).flatten())


def test_image_bound_rejects_a_cut_placeholder():
    ids = toy_tokenize(placeholder_text((2, 1)))[:-10]  # truncation removed the last </slice>
    with pytest.raises(ValueError, match="do not pair up"):
        image_bound(ids, [VOCAB[TOKENS.image_start], VOCAB[TOKENS.slice_start]], [VOCAB[TOKENS.image_end]])


def test_grid_error_ties_keep_the_first_candidate():
    # 500x500: ratio 1.25 → multiple 2 → counts {2, 3}; log 1 = 0: (1,2) and (2,1) both err log 2 = 0.6931
    # (exactly, log(1/2) = -log 2), (1,3) and (3,1) err 1.0986. A strict `<` keeps the first: (1, 2).
    assert find_best_grid((500, 500)) == (1, 2)
