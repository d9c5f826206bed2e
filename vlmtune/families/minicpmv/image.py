"""MiniCPM-V 2.6 image preparation: LLaVA-UHD style slicing, normalisation, patch strips and placeholders.

Implemented from the published algorithm in `image_processing_minicpmv.py` / `processing_minicpmv.py` of the
openbmb/MiniCPM-V-2_6 remote code (the same slicing is in OpenBMB/MiniCPM-V `finetune/dataset.py`). An image
becomes one *source* view (the whole image, resized to about `scale_resolution`² pixels) plus, when it is
larger than that, a grid of *slices* cut from a grid-aligned resize. Every view is a multiple of `patch_size`
on both sides and is resampled by the model into `query_num` (64) tokens.

Grids are `(cols, rows)`, i.e. `(along width, along height)`, exactly as published; `tgt_size`s are
`(rows, cols)` of patches, i.e. `(H // patch, W // patch)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class MiniCPMVImageTokens:
    """The marker strings of the 2.6 tokenizer (added special tokens), spelled as the published processor."""

    image_start: str = "<image>"
    image_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    unk: str = "<unk>"
    image_id_start: str = "<image_id>"
    image_id_end: str = "</image_id>"


def ensure_divide(length: float, patch_size: int) -> int:
    """Round `length` to the nearest multiple of `patch_size`, never below one patch.

    Uses Python's `round` (ties to even) like the published code: 245 px at patch 14 is 17.5 patches → 18.
    """
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Patch-aligned `(width, height)` for a view of `size`.

    If the view is larger than `scale_resolution`² pixels (or `allow_upscale`), it is rescaled to about that
    area keeping its aspect ratio: `height = int(S / sqrt(w / h))`, `width = int(height * w / h)` (both
    truncated, in that order, as published); otherwise its size is kept. Each side is then rounded by
    `ensure_divide`.
    """
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        aspect = width / height
        height = int(scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def find_best_grid(
    size: tuple[int, int], max_slice_nums: int = 9, scale_resolution: int = 448, never_split: bool = False
) -> tuple[int, int] | None:
    """The `(cols, rows)` slice grid for an image of `size = (width, height)`, or None when it is not sliced.

    `multiple = min(ceil(w * h / S²), max_slice_nums)`; no slicing when `multiple <= 1` (or `never_split`).
    Otherwise the slice counts `multiple - 1, multiple, multiple + 1` are candidates (a count of 1 and counts
    above `max_slice_nums` are skipped), every factorisation `(m, n)` of each count with `m` ascending is a
    candidate grid, and the grid with the smallest `|log(w / h) - log(m / n)|` wins; ties keep the earlier
    candidate.
    """
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    grids = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    log_ratio = math.log(width / height)
    best, best_error = None, float("inf")
    for cols, rows in grids:
        error = abs(log_ratio - math.log(cols / rows))
        if error < best_error:
            best, best_error = (cols, rows), error
    return best


def get_refine_size(
    size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int
) -> tuple[int, int]:
    """Size of the image that is cut into `grid`: each cell is a patch-aligned resize of one grid cell.

    The original is first rounded to a multiple of the grid (`ensure_divide(w, cols)`,
    `ensure_divide(h, rows)`), one cell is resized with `allow_upscale=True` (the published call), and the
    cell size is multiplied back.
    """
    width, height = size
    cols, rows = grid
    cell_width = ensure_divide(width, cols) / cols
    cell_height = ensure_divide(height, rows) / rows
    best_width, best_height = find_best_resize((cell_width, cell_height), scale_resolution, patch_size, True)
    return best_width * cols, best_height * rows


def split_to_patches(image: Image.Image, grid: tuple[int, int]) -> list[list[Image.Image]]:
    """Cut `image` into `grid = (cols, rows)` equal cells, returned as rows (top to bottom) of cells."""
    width, height = image.size
    cell_width, cell_height = width // grid[0], height // grid[1]
    return [
        [image.crop((left, top, left + cell_width, top + cell_height)) for left in range(0, width, cell_width)]
        for top in range(0, height, cell_height)
    ]


def slice_image(
    image: Image.Image,
    max_slice_nums: int = 9,
    scale_resolution: int = 448,
    patch_size: int = 14,
    never_split: bool = False,
) -> tuple[Image.Image, list[list[Image.Image]], tuple[int, int] | None]:
    """Split `image` into its source view and slice rows, as MiniCPM-V 2.6 does.

    Returns:
        `(source_image, rows, grid)`: the source view; `rows` (empty when not sliced) is a list of rows, each
        a list of slice images left to right; `grid` is `(cols, rows)` or None. An image that is not sliced is
        *upscaled* to about `scale_resolution`² (the published `allow_upscale=True`), so a 20×20 icon still
        becomes a 448×448 view.
    """
    grid = find_best_grid(image.size, max_slice_nums, scale_resolution, never_split)
    if grid is None:
        source_size = find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
        return image.resize(source_size, resample=Image.Resampling.BICUBIC), [], None
    source_size = find_best_resize(image.size, scale_resolution, patch_size)
    source = image.resize(source_size, resample=Image.Resampling.BICUBIC)
    refine_size = get_refine_size(image.size, grid, scale_resolution, patch_size)
    refine = image.resize(refine_size, resample=Image.Resampling.BICUBIC)
    return source, split_to_patches(refine, grid), grid


def normalize(image: Image.Image) -> torch.Tensor:
    """RGB image → float32 `(3, H, W)` in [-1, 1]: `(x / 255 - 0.5) / 0.5`, the 2.6 mean/std."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (pixels - mean) / std


def reshape_by_patch(image: torch.Tensor, patch_size: int = 14) -> torch.Tensor:
    """Lay the patches of a `(C, H, W)` view side by side: `(C, patch, (H // patch) * (W // patch) * patch)`.

    Patch `l` (row-major over the patch grid) occupies columns `[l * patch, (l + 1) * patch)`. This is the
    published "reshape by patch" strip; the vision tower's stride-`patch` convolution sees the same pixels per
    patch, and strips of different lengths pad on the right only.
    """
    channels, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"view of {height}x{width} is not a multiple of patch_size={patch_size}")
    rows, cols = height // patch_size, width // patch_size
    strips = image.reshape(channels, rows, patch_size, cols, patch_size).permute(0, 2, 1, 3, 4)
    return strips.reshape(channels, patch_size, rows * cols * patch_size)


def placeholder_text(
    grid: tuple[int, int] | None,
    image_idx: int = 0,
    use_image_id: bool = True,
    query_num: int = 64,
    tokens: MiniCPMVImageTokens = MiniCPMVImageTokens(),
) -> str:
    """The text an image expands to in the prompt (2.6 processor, `get_slice_image_placeholder`).

    `<image_id>{image_idx}</image_id>` (when `use_image_id`) + `<image>` + `<unk>` × query_num + `</image>`,
    then for a sliced image one line per grid row, each `cols` × (`<slice>` + `<unk>` × query_num +
    `</slice>`), rows joined by `"\\n"`. There is no newline between `</image>` and the first `<slice>`. The
    published processor numbers images per prompt from 0 and writes the image id whether or not the image is
    sliced.
    """
    text = tokens.image_start + tokens.unk * query_num + tokens.image_end
    if use_image_id:
        text = f"{tokens.image_id_start}{image_idx}{tokens.image_id_end}" + text
    if grid is not None:
        cols, rows = grid
        cell = tokens.slice_start + tokens.unk * query_num + tokens.slice_end
        text += "\n".join(cell * cols for _ in range(rows))
    return text


def image_bound(input_ids: torch.Tensor, start_ids: Iterable[int], end_ids: Iterable[int]) -> torch.Tensor:
    """`(k, 2)` LongTensor of `[first, end)` token ranges strictly between start and end markers.

    Args:
        input_ids: `(seq_len,)` token ids of one sample.
        start_ids: ids of `<image>` and `<slice>`; end_ids: ids of `</image>` and `</slice>`.

    Raises:
        ValueError: when start and end markers do not pair up (e.g. a truncation cut an image).
    """
    if input_ids.dim() != 1:
        raise ValueError(f"image_bound expects one sample's (seq_len,) ids, got shape {tuple(input_ids.shape)}")
    starts = torch.nonzero(torch.isin(input_ids, torch.tensor(list(start_ids))), as_tuple=True)[0] + 1
    ends = torch.nonzero(torch.isin(input_ids, torch.tensor(list(end_ids))), as_tuple=True)[0]
    if len(starts) != len(ends) or bool((ends < starts).any()) or bool((starts[1:] <= ends[:-1]).any()):
        raise ValueError(
            f"image markers do not pair up: starts at {(starts - 1).tolist()}, ends at {ends.tolist()}; "
            "an image placeholder was cut or malformed"
        )
    return torch.stack([starts, ends], dim=1).long()


def process_image(
    image: Image.Image,
    max_slice_nums: int = 9,
    scale_resolution: int = 448,
    patch_size: int = 14,
    never_split: bool = False,
    image_idx: int = 0,
    use_image_id: bool = True,
    query_num: int = 64,
    tokens: MiniCPMVImageTokens = MiniCPMVImageTokens(),
) -> dict:
    """One image → the model's pixel strips and the prompt text that reserves its tokens.

    `never_split=True` is how a config with `slice_mode=False` should be served: one patch-aligned source
    view. (The published processor then passes the image at its raw size instead; a raw size is rarely
    patch-aligned.)

    Returns:
        dict with `pixel_values`: list of `(3, patch, L_i * patch)` float32 strips, source first then slices
        row by row; `tgt_sizes`: `(n, 2)` LongTensor of `(H // patch, W // patch)` per view; `grid`: `(cols,
        rows)` or None; `placeholder`: the text with `query_num * n` `<unk>` tokens.
    """
    source, rows, grid = slice_image(image.convert("RGB"), max_slice_nums, scale_resolution, patch_size, never_split)
    views = [source] + [cell for row in rows for cell in row]
    pixel_values, tgt_sizes = [], []
    for view in views:
        tensor = normalize(view)
        pixel_values.append(reshape_by_patch(tensor, patch_size))
        tgt_sizes.append((tensor.shape[1] // patch_size, tensor.shape[2] // patch_size))
    return {
        "pixel_values": pixel_values,
        "tgt_sizes": torch.tensor(tgt_sizes, dtype=torch.long),
        "grid": grid,
        "placeholder": placeholder_text(grid, image_idx, use_image_id, query_num, tokens),
    }
