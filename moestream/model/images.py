"""Image preprocessing and the image token layout, exactly as Llama 4's processor defines them.

An image is cut into 336 x 336 tiles on the canvas that fits it best (transformers'
Llama4ImageProcessor "supported resolutions / best fit" rule): a grid of rows x cols tiles, at most
`max_patches` of them, chosen to upscale as little as possible or, failing that, to downscale as
little as possible. The image is resized into that canvas without distortion (never upscaled past
one tile's side), padded with black at the right and bottom, and split into tiles row by row; when
there is more than one tile, the whole image squeezed into one tile follows as a global view.
Pixels go [0, 255] -> [-1, 1] through (x / 255 - 0.5) / 0.5 computed in bfloat16, as the reference
does, so the float32 values returned are bfloat16 values.

The resize is torchvision's (what transformers' processor runs): torch's antialiased bilinear
interpolation, on the uint8 pixels where the CPU has the native uint8 kernel (AVX2 / AVX512 / ARM),
else on float32 then rounded. It is called here the same way, so the pixels are the processor's to
the bit; it is not Pillow's resize, whose rounding differs.

In the prompt one image is
    <|image_start|> [tile <|tile_x_separator|> tile ... <|tile_y_separator|>] per row  <|image|> global <|image_end|>
where a tile is `patches_per_tile` <|patch|> tokens (144 for a 336-px tile of 14-px patches after
pixel shuffle), and a one-tile image has only `<|image|>` and its tile. Pillow decodes; only the
first frame of an animation is read.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MoestreamError
from ..files import read_limited

SIZE = 336  # a tile's side
MAX_PATCHES = 16  # most tiles per image (the global view comes on top)
MEAN = STD = (0.5, 0.5, 0.5)
RESCALE = 1 / 255
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 89 megapixels): refused above it

IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"
IMAGE_PLACEHOLDER = IMAGE  # what a chat template writes for one image, before expand_image_tokens
FILE_LIMIT = 64 * 2**20  # bytes of one image file or base64 payload: more than any photo, less than RAM minds
PART_FORMS = ('{"type": "image", "path": FILE}, {"type": "image", "data": BASE64} or '
              '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}')


# --- where an image comes from -------------------------------------------------------------------
def image_source(part, where: str = "an image part") -> tuple[str, str]:
    """("path", FILE) or ("data", BASE64) of an image content part in one of PART_FORMS, checked for
    shape only (nothing is read): what /load checks and what image_bytes reads."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image" and isinstance(part.get("path"), str) and part["path"]:
        return "path", part["path"]
    if kind == "image" and isinstance(part.get("data"), str):
        return "data", part["data"]
    url = part.get("image_url") if kind == "image_url" else part.get("url") if kind == "image" else None
    url = url.get("url") if isinstance(url, dict) else url
    if isinstance(url, str) and url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise MoestreamError(f"{where} has a data: URL that is not base64 (data:image/png;base64,...): "
                                 "encode the image as base64")
        return "data", payload
    if isinstance(url, str):
        raise MoestreamError(f"{where} points at {url[:60]!r}: moestream fetches nothing from the network; "
                             'download the image and pass {"type": "image", "path": FILE}')
    raise MoestreamError(f"{where} is not an image part: use {PART_FORMS}")


def image_bytes(part, where: str = "an image part") -> bytes:
    """The encoded file bytes of an image content part: a regular file of at most FILE_LIMIT bytes, or the
    decoded base64. The bytes are also the image's identity (the conversation keeps its embeddings by
    their hash), so a path and the same file as base64 are one image."""
    kind, value = image_source(part, where)
    if kind == "path":
        return read_limited(value, FILE_LIMIT, "moestream", f"pass an image file of at most {FILE_LIMIT // 2**20} MiB")
    if len(value) > FILE_LIMIT * 4 // 3 + 4096:
        raise MoestreamError(f"{where} holds {len(value) / 2**20:.0f} MiB of base64, over the {FILE_LIMIT // 2**20} MiB "
                             "an image may take: downscale or recompress it")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MoestreamError(f"{where} holds data that is not valid base64: encode the image file with base64") from None


# --- decoding ------------------------------------------------------------------------------------
def open_image(image, name: str | None = None) -> Image.Image:
    """A decoded image from a PIL image (used as it is), bytes or a path (opened, and turned upright by
    its EXIF orientation as transformers' load_image does). Its size is checked from the header,
    before any pixel is decoded. Bad input is one MoestreamError line, naming the image as `name`
    (default: its path, or "the image bytes")."""
    if isinstance(image, Image.Image):
        im, name = image, name or "the image"
    elif isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
        binary = isinstance(image, (bytes, bytearray, memoryview))
        name = name or ("the image bytes" if binary else str(image))
        try:
            with warnings.catch_warnings():  # Pillow warns between 1x and 2x its limit; the check below refuses
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(bytes(image)) if binary else Path(image))  # lazy: the header only
        except UnidentifiedImageError:
            raise MoestreamError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...): "
                                 "pass an image file") from None
        except Image.DecompressionBombError:
            raise MoestreamError(f"{name} claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (a decompression "
                                 f"bomb?): refused before decoding; downscale it below {MAX_PIXELS:,} pixels") from None
        except OSError as e:
            raise MoestreamError(f"cannot read image {name}: {e.strerror or e}: check the path") from None
    else:
        raise MoestreamError(f"an image is a path, bytes or a PIL image, not a {type(image).__name__}")
    w, h = im.size
    if w * h > MAX_PIXELS:
        if im is not image:
            im.close()
        raise MoestreamError(f"{name} claims {w} x {h} pixels, more than the {MAX_PIXELS:,} allowed (a decompression "
                             "bomb?): refused before decoding; downscale it first")
    try:
        im.load()  # a no-op for an image already decoded
        return im if im is image else ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's words for truncated / corrupt data
        raise MoestreamError(f"{name} is truncated or corrupt ({e}): re-save or re-download it") from None


def to_rgb(image: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8; transparency is composited onto white, as transformers' convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


# --- the canvas ----------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def supported_resolutions(max_patches: int, size: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) canvas of rows x cols tiles with rows * cols <= max_patches, grouped by
    aspect ratio in the processor's order (its argmin breaks ties by this order)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_patches, 0, -1):
        for rows in sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return tuple((rows * size, cols * size) for group in by_ratio.values() for rows, cols in group)


def best_fit(height: int, width: int, resolutions, resize_to_max_canvas: bool = False) -> torch.Tensor:
    """The canvas [h, w] (int64) an image is fitted into: the smallest upscale if any canvas allows one
    (the largest with resize_to_max_canvas), else the mildest downscale; ties go to the least area.
    Scales are float32 tensors as in the processor, so equal scales compare equal the same way."""
    canvases = torch.tensor(resolutions)
    scale_h, scale_w = canvases[:, 0] / height, canvases[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)  # the limiting side
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    return candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]


def resized_size(height: int, width: int, canvas: torch.Tensor, size: int, resize_to_max_canvas: bool = False):
    """(h, w) the image is resized to inside `canvas`, keeping its aspect ratio; unless
    resize_to_max_canvas, a small image is not blown up past one tile's side (it is padded instead).
    The arithmetic mixes ints and 0-d tensors exactly as the processor does, so floor() agrees."""
    target_h, target_w = canvas[0], canvas[1]
    if not resize_to_max_canvas:
        target_h = min(max(height, size), target_h)
        target_w = min(max(width, size), target_w)
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(int(new_h), 1), max(int(new_w), 1)


def resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of [N, 3, H, W] uint8, called as torchvision's resize calls it."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    native_uint8 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    if native_uint8:
        return F.interpolate(pixels, size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    out = F.interpolate(pixels.float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    return out.round_().to(torch.uint8)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> (x / 255 - mean) / std, each step rounded to bfloat16 as the reference does; as float32."""
    x = pixels.to(torch.bfloat16) * RESCALE
    mean = torch.tensor(MEAN, dtype=torch.bfloat16).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=torch.bfloat16).view(-1, 1, 1)
    return x.sub(mean).div_(std).float()


def preprocess(image, size: int = SIZE, max_patches: int = MAX_PATCHES, resize_to_max_canvas: bool = False,
               name: str | None = None):
    """One image (a PIL image, bytes or a path) -> (pixel values [n_tiles, 3, size, size] float32,
    aspect ratio (rows, cols)). n_tiles is rows * cols, plus one global view when that is more than 1."""
    if size < 1 or max_patches < 1:
        raise MoestreamError(f"image size ({size}) and max_patches ({max_patches}) must be at least 1")
    pixels = to_rgb(open_image(image, name))[None]  # [1, 3, H, W] uint8
    H, W = pixels.shape[-2:]
    canvas = best_fit(H, W, supported_resolutions(max_patches, size), resize_to_max_canvas)
    h, w = resized_size(H, W, canvas, size, resize_to_max_canvas)
    canvas_h, canvas_w = int(canvas[0]), int(canvas[1])
    fitted = F.pad(resize(pixels, h, w), (0, canvas_w - w, 0, canvas_h - h))  # black at the right and bottom
    rows, cols = canvas_h // size, canvas_w // size
    tiles = normalize(fitted).view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
    if rows * cols > 1:
        tiles = torch.cat([tiles, normalize(resize(pixels, size, size))])  # the global view
    return tiles, (rows, cols)


# --- the prompt ----------------------------------------------------------------------------------
def patches_per_tile(size: int = SIZE, patch_size: int = 14, pixel_shuffle_ratio: float = 0.5) -> int:
    """<|patch|> tokens per tile, as the processor counts them (144 for Llama 4)."""
    return (size // patch_size) ** 2 // int(round(1.0 / pixel_shuffle_ratio ** 2))


def image_token_text(aspect_ratio: tuple[int, int], patches_per_tile: int) -> str:
    """The placeholder string the processor puts in the prompt for one image."""
    rows, cols = aspect_ratio
    tile = PATCH * patches_per_tile
    text = IMAGE_START
    if rows * cols > 1:
        text += "".join(TILE_X.join([tile] * cols) + TILE_Y for _ in range(rows))
    return text + IMAGE + tile + IMAGE_END


def expand_image_tokens(prompt: str, aspect_ratios: list[tuple[int, int]], patches_per_tile: int) -> str:
    """Replace the i-th `<|image|>` a chat template wrote with image i's placeholder string, in one
    pass (the replacement holds an `<|image|>` of its own, which is not replaced again)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(aspect_ratios):
        raise MoestreamError(f"the prompt has {len(parts) - 1} image placeholders for {len(aspect_ratios)} images: "
                             "give one image per <|image|>")
    out = [parts[0]]
    for ratio, rest in zip(aspect_ratios, parts[1:]):
        out += [image_token_text(ratio, patches_per_tile), rest]
    return "".join(out)
