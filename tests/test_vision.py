"""Llama 4 image input: preprocessing against transformers' Llama4Processor, the vision tower against
Llama4ForConditionalGeneration's own parts, and bad images refused in one line.

The preprocessing oracle (Llama4ImageProcessor) runs on torchvision; those tests skip where it is not
installed. The tower's oracle needs only transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from moestream.errors import MoestreamError
from moestream.model import images
from moestream.model.vision import VisionConfig, encode_images, load_vision, pixel_shuffle, patchify

from .conftest import LLAMA3_ROPE, TEXT, VISION, oracle_logits

# A vision tower at the real processor's tile geometry (336-px tiles, 14-px patches: 577 positions,
# 144 tokens per tile after pixel shuffle) but a narrow width, so a tile encodes in milliseconds.
# intermediate_size = hidden_size / pixel_shuffle_ratio^2: the adapter reads the shuffled channels.
VISION336 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 vision_output_dim=48, projector_input_dim=48, projector_output_dim=48, image_size=336, patch_size=14,
                 rope_parameters=dict(rope_type="default", rope_theta=1000.0))
PATCH_ID = 300  # the <|patch|> id inside the tiny text vocabulary
IMAGE_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
                "<|tile_y_separator|>")
EMBEDDED = Path(__file__).resolve().parents[1] / "moestream" / "data" / "default"


# --- the oracles ---------------------------------------------------------------------------------
def oracle_image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """transformers' path from tiles to the embeddings that replace the <|patch|> tokens: the first
    half of Llama4ForConditionalGeneration.forward (vision model, flatten, projector)."""
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values.to(model.dtype), return_dict=True).last_hidden_state
        return model.multi_modal_projector(features.reshape(-1, features.shape[-1]))


def oracle_multimodal_logits(model, ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Reference logits [T, V] of a Llama4ForConditionalGeneration for ids [T] with images, through its parts.

    transformers 5.24.0's own forward is broken (it reads `outputs.image_outputs`, which its text model
    does not return), so this is its forward written out: embed the ids, put the projected image
    embeddings at the image-token positions in order (masked_scatter, as it does), run the text model
    on inputs_embeds."""
    lm = model.language_model
    with torch.no_grad():
        embeds = lm.get_input_embeddings()(ids[None])
        if pixel_values is not None:
            image = oracle_image_embeddings(model, pixel_values).to(embeds.dtype)
            mask = (ids[None] == model.config.image_token_id)[..., None]
            assert int(mask.sum()) * embeds.shape[-1] == image.numel(), "image tokens and embeddings disagree"
            embeds = embeds.masked_scatter(mask, image)
        return lm(inputs_embeds=embeds).logits[0].float()


_TORCHVISION_OPS = None  # keeps the stand-in op schemas alive


def llama4_processing():
    """(Llama4ImageProcessor, Llama4Processor) from transformers, or skip without torchvision.

    PyPI's torchvision for this torch is a CUDA build: beside the CPU torch its C++ ops do not load,
    and its import then fails registering a fake kernel for `torchvision::nms`. The image processor
    uses none of those ops, so their schemas are declared and the import goes through."""
    global _TORCHVISION_OPS
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed: transformers' Llama4ImageProcessor (the oracle) needs it")
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401
    from transformers import Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))  # it has the chat tokens, not the image ones
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot|>")
    return Llama4ImageProcessor(), Llama4Processor(image_processor=Llama4ImageProcessor(), tokenizer=fast), tok


# --- test images ---------------------------------------------------------------------------------
def picture(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise, so resampling has edges and ramps to get right."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1), (x + y) % 97 * 2.6], axis=-1)
    rgb = np.clip(base + g.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(g.integers(0, 256, (h, w), dtype=np.uint8)))
    elif mode == "P":  # palette with a transparent index: composited onto white
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        im.info["transparency"] = 3
    elif mode != "RGB":
        im = im.convert(mode)
    return im


# (height, width, mode): one tile up- or downscaled, exact, tall, wide, 2 x 3, 4 x 4, odd sizes, tiny
SHAPES = [(200, 300, "RGB"), (336, 336, "RGB"), (1000, 250, "L"), (60, 1400, "RGBA"), (500, 700, "RGB"),
          (1300, 1400, "P"), (337, 1009, "RGB"), (1, 1, "RGB"), (700, 20, "LA"), (1500, 400, "CMYK")]


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# --- preprocessing against Llama4ImageProcessor / Llama4Processor --------------------------------
@pytest.mark.parametrize("h,w,mode", SHAPES)
def test_pixels_equal_the_image_processor(h, w, mode):
    processor, _, _ = llama4_processing()
    im = picture(h, w, mode, seed=h + w)
    want = processor(im, return_tensors="pt")
    pixels, ratio = images.preprocess(im)
    assert ratio == tuple(want["aspect_ratios"][0].tolist())
    assert pixels.dtype == torch.float32 and pixels.shape == want["pixel_values"].shape
    assert torch.equal(pixels, want["pixel_values"].float())  # bit for bit
    rows, cols = ratio
    assert pixels.shape[0] == rows * cols + (rows * cols > 1)


def test_pixels_equal_the_image_processor_without_the_uint8_kernel(monkeypatch):
    """Where the CPU lacks torch's native uint8 resize (no AVX2), torchvision resizes in float32 and
    rounds; so does preprocess, and the pixels still agree."""
    processor, _, _ = llama4_processing()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(images.platform, "machine", lambda: "x86_64")
    for h, w, mode in [(500, 700, "RGB"), (60, 1400, "RGBA"), (200, 300, "L")]:
        im = picture(h, w, mode, seed=h + w)
        assert torch.equal(images.preprocess(im)[0], processor(im, return_tensors="pt")["pixel_values"].float())


# sha256 of preprocess(picture(h, w, mode, seed=h + w)) pixels, checked against the processor when made:
# a regression check that needs no torchvision (the native uint8 resize kernel's values)
GOLDEN = {(500, 700, "RGB"): "b7bc6d85d6f5a350", (1000, 250, "L"): "a45d13021f3c9838",
          (60, 1400, "RGBA"): "67ec8e1e0826c571"}


@pytest.mark.parametrize("h,w,mode", list(GOLDEN))
def test_pixels_equal_their_checked_values(h, w, mode):
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the checked values are the native uint8 resize kernel's (AVX2 / AVX512)")
    pixels, _ = images.preprocess(picture(h, w, mode, seed=h + w))
    assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest()[:16] == GOLDEN[(h, w, mode)]


def test_canvas_rules_equal_the_processor_helpers():
    """best_fit / resized_size against transformers' get_best_fit / get_max_res_without_distortion over
    thousands of sizes, including the float32 floor() of the processor's tensor arithmetic."""
    llama4_processing()
    from transformers.image_utils import SizeDict
    from transformers.models.llama4.image_processing_llama4 import (
        find_supported_resolutions, get_best_fit, get_max_res_without_distortion)

    for max_patches in (1, 4, 16):
        theirs = find_supported_resolutions(max_patches, SizeDict(height=336, width=336))
        assert list(images.supported_resolutions(max_patches, 336)) == theirs
        possible = torch.tensor(theirs)
        g = np.random.default_rng(max_patches)
        sizes = [(int(a), int(b)) for a, b in g.integers(1, 6000, (1500, 2))] + [(336 * k, 336) for k in range(1, 9)]
        for H, W in sizes:
            for max_canvas in (False, True):
                canvas = get_best_fit((H, W), possible, resize_to_max_canvas=max_canvas)
                mine = images.best_fit(H, W, images.supported_resolutions(max_patches, 336), max_canvas)
                assert mine.tolist() == canvas.tolist(), (H, W, max_patches)
                target = canvas if max_canvas else (min(max(H, 336), canvas[0]), min(max(W, 336), canvas[1]))
                h, w = get_max_res_without_distortion((H, W), target)
                assert images.resized_size(H, W, mine, 336, max_canvas) == (max(int(h), 1), max(int(w), 1)), (H, W)


@pytest.mark.parametrize("n_images", [1, 2, 5])
def test_chat_token_ids_and_pixels_equal_the_processor(n_images):
    _, processor, tok = llama4_processing()
    shapes = [SHAPES[i] for i in (4, 0, 2, 5, 6)[:n_images]]  # 2x3, 1x1, 3x1, 4x4, 2x4 tiles
    ims = [picture(h, w, mode, seed=i) for i, (h, w, mode) in enumerate(shapes)]
    content = [{"type": "text", "text": "Compare these:"}]
    for i in range(n_images):
        content += [{"type": "image"}, {"type": "text", "text": f" picture {i}."}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count(images.IMAGE_PLACEHOLDER) == n_images
    want = processor(text=prompt, images=ims, return_tensors="pt")

    done = [images.preprocess(im) for im in ims]
    pixels = torch.cat([p for p, _ in done])
    text = images.expand_image_tokens(prompt, [r for _, r in done], images.patches_per_tile())
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(pixels, want["pixel_values"].float())
    patch = tok.token_to_id("<|patch|>")
    assert ids.count(patch) == pixels.shape[0] * images.patches_per_tile()


def test_image_token_text_layout():
    assert images.image_token_text((1, 1), 2) == "<|image_start|><|image|><|patch|><|patch|><|image_end|>"
    p = "<|patch|>"
    assert images.image_token_text((2, 2), 1) == (
        "<|image_start|>" + p + "<|tile_x_separator|>" + p + "<|tile_y_separator|>" + p + "<|tile_x_separator|>"
        + p + "<|tile_y_separator|>" + "<|image|>" + p + "<|image_end|>")
    assert images.patches_per_tile() == 144
    with pytest.raises(MoestreamError, match="2 image placeholders for 1 images"):
        images.expand_image_tokens("<|image|> and <|image|>", [(1, 1)], 144)


def test_bytes_and_paths_decode_like_the_pil_image(tmp_path):
    """Bytes and paths are opened by Pillow and turned upright by their EXIF orientation (what
    transformers' load_image does), then processed as that image."""
    processor, _, _ = llama4_processing()
    im = picture(300, 500, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "photo.jpg"
    im.save(path, format="JPEG", quality=90, exif=exif)
    upright = Image.open(path)
    from PIL import ImageOps
    upright = ImageOps.exif_transpose(upright)
    assert upright.size == (300, 500)
    want = processor(upright, return_tensors="pt")["pixel_values"].float()
    for source in (path, str(path), path.read_bytes()):
        pixels, ratio = images.preprocess(source)
        assert ratio == (2, 1) and torch.equal(pixels, want)


# --- bad input: one line each --------------------------------------------------------------------
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def one_line_error(source, match: str) -> str:
    with pytest.raises(MoestreamError, match=match) as e:
        images.preprocess(source)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300
    return message


def test_bad_images_are_one_line(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    one_line_error(text, "is not an image Pillow can read")
    one_line_error(b"GIF89a but not really", "is not an image Pillow can read")

    whole = png_bytes(picture(200, 300, seed=3))
    one_line_error(whole[: len(whole) // 2], "truncated or corrupt")

    one_line_error(png_claiming(50_000, 50_000), "decompression bomb")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(10_000, 10_000))  # 100 MP: above the limit, below Pillow's own error
    assert "10000 x 10000" in one_line_error(bomb, "decompression bomb")

    with pytest.warns(Image.DecompressionBombWarning):  # Pillow only warns at 1x-2x its limit
        lazy = Image.open(io.BytesIO(png_claiming(10_000, 10_000)))  # a PIL image not yet decoded: checked too
    one_line_error(lazy, "the image claims 10000 x 10000 pixels")
    one_line_error(Image.open(io.BytesIO(whole[: len(whole) // 2])), "the image is truncated or corrupt")

    one_line_error(tmp_path / "missing.png", "cannot read image .*missing.png.*check the path")
    one_line_error(tmp_path, "cannot read image")  # a directory
    one_line_error(12345, "an image is a path, bytes or a PIL image")


# --- the vision tower against transformers -------------------------------------------------------
@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    """A Llama4ForConditionalGeneration at VISION336, its norms and embeddings perturbed so that every
    weight matters; (directory, fp32 oracle model)."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(TEXT, use_qk_norm=True, interleave_moe_layer_step=2, rope_parameters=LLAMA3_ROPE)
    config = Llama4Config(text_config=text, vision_config=dict(VISION336, initializer_range=0.1),
                          image_token_index=PATCH_ID)
    model = Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vision_model.") and ("norm" in name or "embedding" in name) and p.ndim <= 2:
                p.add_(torch.randn_like(p) * 0.3)
            elif name.startswith(("vision_model.", "multi_modal_projector.")) and "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("vision336")
    model.save_pretrained(path)
    return path, model


def reader(path: Path):
    handle = safe_open(str(path / "model.safetensors"), "pt")
    return handle.get_tensor


def test_encode_images_equals_transformers(vision_checkpoint):
    path, model = vision_checkpoint
    config = VisionConfig.from_file(path / "config.json")
    assert (config.tokens_per_tile, config.positions, config.image_token_id) == (144, 577, PATCH_ID)
    weights = load_vision(reader(path), config, "cpu", torch.float32)
    pixels = torch.cat([images.preprocess(picture(500, 330, seed=1))[0],  # 2 x 1 tiles + the global view
                        images.preprocess(picture(90, 120, seed=2))[0]])  # one tile
    assert pixels.shape[0] == 4
    got = encode_images(weights, pixels)
    want = oracle_image_embeddings(model, pixels)
    assert got.shape == want.shape == (4 * 144, TEXT["hidden_size"])
    assert want.abs().mean() > 0.05  # not a vanishing signal that any code would match
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # random pixels too (not only what preprocessing makes), and more tiles than one pass encodes
    noise = torch.randn(18, 3, 336, 336)
    torch.testing.assert_close(encode_images(weights, noise), oracle_image_embeddings(model, noise), atol=1e-4, rtol=1e-4)


def test_encode_images_in_bfloat16_tracks_float32(vision_checkpoint):
    path, model = vision_checkpoint
    config = VisionConfig.from_file(path / "config.json")
    weights = load_vision(reader(path), config, "cpu", torch.bfloat16)
    pixels = images.preprocess(picture(400, 400, seed=5))[0]
    got = encode_images(weights, pixels)
    assert got.dtype == torch.bfloat16
    want = oracle_image_embeddings(model, pixels)
    assert (got.float() - want).norm() / want.norm() < 0.03


def test_the_building_blocks_are_transformers_own():
    """patchify = nn.Unfold(p, stride=p) then the transpose; pixel_shuffle = modeling_llama4.pixel_shuffle."""
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as theirs

    tiles = torch.randn(2, 3, 56, 56)
    unfold = torch.nn.Unfold(kernel_size=14, stride=14)(tiles).permute(0, 2, 1)
    assert torch.equal(patchify(tiles, 14), unfold)
    x = torch.randn(3, 16 * 16, 20)
    assert torch.equal(pixel_shuffle(x, 0.5), theirs(x, 0.5))


def test_resident_bytes_come_from_the_config_alone(vision_checkpoint):
    path, _ = vision_checkpoint
    config = VisionConfig.from_file(path / "config.json")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                 if k.startswith(("vision_model.", "multi_modal_projector."))}
    assert config.tensor_shapes() == saved  # every tensor named, none missing, shapes from the config
    assert config.numel == sum(int(np.prod(shape)) for shape in saved.values())
    for dtype in (torch.float32, torch.bfloat16):
        weights = load_vision(reader(path), config, "cpu", dtype)
        assert config.resident_bytes(dtype) == weights.nbytes
    scout = VisionConfig.from_dict({"text_config": {"hidden_size": 5120}, "vision_config": dict(
        hidden_size=1408, image_size=336, intermediate_size=5632, num_attention_heads=16, num_hidden_layers=34,
        patch_size=14, projector_input_dim=4096, projector_output_dim=4096, vision_output_dim=4096, rope_theta=10000)})
    assert scout.numel == 871_932_416  # Scout's vision side, tensor by tensor: 0.87 B parameters, 1.74 GB in bf16


def test_both_config_dialects_read_the_same(vision_checkpoint, tmp_path):
    path, _ = vision_checkpoint
    v5 = VisionConfig.from_file(path / "config.json")
    raw = json.loads((path / "config.json").read_text())
    vision = raw["vision_config"]
    vision["rope_theta"] = vision.pop("rope_parameters")["rope_theta"]  # the transformers 4.51 dialect
    vision["torch_dtype"], vision["vision_feature_layer"] = "bfloat16", -1
    raw["torch_dtype"] = raw.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert VisionConfig.from_file(tmp_path / "config.json") == v5
    assert v5.rope_theta == 1000.0


def test_bad_vision_configs_and_weights_are_one_line(vision_checkpoint):
    path, _ = vision_checkpoint
    raw = json.loads((path / "config.json").read_text())
    with pytest.raises(MoestreamError, match="no vision_config: this checkpoint is text-only"):
        VisionConfig.from_dict({"text_config": raw["text_config"]})
    with pytest.raises(MoestreamError, match=r"intermediate_size must be hidden_size / pixel_shuffle_ratio\^2 = 128"):
        VisionConfig.from_dict(dict(raw, vision_config=dict(VISION, intermediate_size=32)))  # the adapter could not read the shuffle
    with pytest.raises(MoestreamError, match="num_attention_heads must be"):
        VisionConfig.from_dict(dict(raw, vision_config=dict(raw["vision_config"], num_attention_heads=3)))
    config = VisionConfig.from_file(path / "config.json")
    read = reader(path)
    wide = VisionConfig(**dict(vars(config), text_hidden_size=96))
    with pytest.raises(MoestreamError, match=r"multi_modal_projector.linear_1.weight has shape \[64, 48\].*\[96, 48\]"):
        load_vision(read, wide, "cpu", torch.float32)
    weights = load_vision(read, config, "cpu", torch.float32)
    with pytest.raises(MoestreamError, match="preprocess images with size=336"):
        encode_images(weights, torch.zeros(1, 3, 224, 224))


def test_the_multimodal_oracle_is_the_text_oracle_without_images(vision_checkpoint):
    """The helper the end-to-end tests use: no image = the text model's logits; with images, the
    positions before the first <|patch|> are untouched (causal) and those after it move."""
    _, model = vision_checkpoint
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 290, (160,), generator=g)
    torch.testing.assert_close(oracle_multimodal_logits(model, ids), oracle_logits(model, ids))
    ids[8:8 + 144] = PATCH_ID
    pixels = images.preprocess(picture(100, 100, seed=9))[0]
    with_image = oracle_multimodal_logits(model, ids, pixels)
    plain = oracle_logits(model, ids)
    torch.testing.assert_close(with_image[:8], plain[:8])
    assert not torch.allclose(with_image[8:], plain[8:], atol=1e-3)


# --- end to end: tiny Llama4ForConditionalGeneration checkpoints with a tokenizer ----------------
# The embedded tokenizer plus the six image tokens (ids 4096..4101), Llama 4's own chat template, and
# a tower of 56-px tiles (4 x 4 patches -> 4 <|patch|> tokens a tile), so five images with up to 17
# tiles each stay a prompt of a few hundred tokens. The text configs are conftest's Scout-like and
# Maverick-like ones.
SMALL_VISION = dict(VISION336, image_size=56, vision_output_dim=48, projector_input_dim=48, projector_output_dim=48)
MM_TEXT = {
    "scout": dict(use_qk_norm=True, interleave_moe_layer_step=1, rope_parameters=LLAMA3_ROPE),
    "maverick": dict(use_qk_norm=False, interleave_moe_layer_step=2, num_hidden_layers=8,
                     rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
}
# (height, width) -> tiles at 56 px: 1 x 1, 1 x 2, 3 x 2, 3 x 4, 4 x 4 (plus the global view past one tile)
PICTURES = [(40, 50), (56, 112), (150, 60), (120, 170), (300, 300)]
TOL = 1e-4


def image_tokenizer():
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(EMBEDDED / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    return tok


def llama4_chat_template() -> str:
    from transformers.models.llama4 import processing_llama4

    return processing_llama4.chat_template


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """multimodal(name) -> (checkpoint dir with tokenizer and pictures/, fp32 oracle model); made once."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    made = {}

    def get(name: str):
        if name in made:
            return made[name]
        tok = image_tokenizer()
        torch.manual_seed(1)
        text = dict(TEXT, **MM_TEXT[name], vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=[1, 4, 5],
                    pad_token_id=6, max_position_embeddings=2048)
        config = Llama4Config(text_config=text, vision_config=dict(SMALL_VISION, initializer_range=0.1),
                              image_token_index=tok.token_to_id("<|patch|>"))
        model = Llama4ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for key, p in model.named_parameters():
                if key.startswith("vision_model.") and ("norm" in key or "embedding" in key) and p.ndim <= 2:
                    p.add_(torch.randn_like(p) * 0.3)
        path = tmp_path_factory.mktemp(f"mm_{name}")
        model.save_pretrained(path)
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "chat_template": llama4_chat_template()}))
        (path / "pictures").mkdir()
        for i, (h, w) in enumerate(PICTURES):
            picture(h, w, "RGBA" if i == 3 else "RGB", seed=10 + i).save(path / "pictures" / f"{i}.png")
        made[name] = (path, model)
        return made[name]

    return get


def pictures(path: Path, n: int) -> list[Path]:
    return [path / "pictures" / f"{i}.png" for i in (0, 4, 2, 1, 3)[:n]]


def chat_of(paths, text: str = " Which is brightest?") -> list[dict]:
    content = [{"type": "text", "text": "Look:"}] + [{"type": "image", "path": str(p)} for p in paths]
    return [{"role": "system", "content": "You see."}, {"role": "user", "content": content + [{"type": "text", "text": text}]}]


def oracle_pixels(paths) -> torch.Tensor:
    return torch.cat([images.preprocess(p, size=56)[0] for p in paths])


def oracle_greedy(model, ids: list[int], pixel_values: torch.Tensor, n: int, stop=()) -> list[int]:
    """transformers' greedy decode of a multimodal prompt, token by token through its parts (its own
    generate on Llama4ForConditionalGeneration is broken in 5.24): the image rows go to the prompt's
    <|patch|> positions only; a generated token is embedded as text."""
    lm = model.language_model
    with torch.no_grad():
        image = oracle_image_embeddings(model, pixel_values)
        prompt_mask = torch.tensor(ids) == model.config.image_token_id
        out: list[int] = []
        for _ in range(n):
            seq = torch.tensor(ids + out)
            mask = torch.cat([prompt_mask, torch.zeros(len(out), dtype=torch.bool)])[None, :, None]
            embeds = lm.get_input_embeddings()(seq[None]).masked_scatter(mask, image)
            token = int(lm(inputs_embeds=embeds).logits[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
        return out


@pytest.mark.parametrize("name", list(MM_TEXT))
@pytest.mark.parametrize("n_images", [1, 2, 5])
def test_multimodal_logits_equal_transformers(multimodal, name, n_images):
    import moestream

    path, model = multimodal(name)
    paths = pictures(path, n_images)
    llm = moestream.load(path, device="cpu")
    ids, encoded = llm.encode_chat(chat_of(paths))
    assert [im.tokens for im in encoded] == [4 * (r * c + (r * c > 1)) for r, c in (im.aspect_ratio for im in encoded)]
    ref = oracle_multimodal_logits(model, torch.tensor(ids), oracle_pixels(paths))
    assert (oracle_multimodal_logits(model, torch.tensor(ids)) - ref).abs().max() > 0.1  # the images matter
    assert (llm.logits(ids, encoded) - ref).abs().max().item() < TOL
    # micro-batches of 7 cut through images: each gets its own rows (the offset runs along)
    small = moestream.load(path, device="cpu", ubatch=7)
    assert (small.logits(ids, encoded) - ref).abs().max().item() < TOL
    if n_images == 2:
        assert (llm.decode_logits(ids, encoded) - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", list(MM_TEXT))
def test_greedy_generation_with_images_equals_transformers(multimodal, name):
    import moestream
    from moestream.model.sampling import SamplingParams

    path, model = multimodal(name)
    paths = pictures(path, 2)
    llm = moestream.load(path, device="cpu", ubatch=16)
    ids, encoded = llm.encode_chat(chat_of(paths))
    ours = llm.generate_ids(ids, SamplingParams(temperature=0, max_tokens=12), stop_ids=set(), images=encoded)
    assert ours == oracle_greedy(model, ids, oracle_pixels(paths), 12)


def test_the_vision_tower_at_scouts_tile_geometry_end_to_end(vision_checkpoint):
    """336-px tiles, 144 tokens a tile: an image given as base64 data, through llm.logits."""
    import base64

    import moestream

    path, model = vision_checkpoint
    llm = moestream.load(path, device="cpu", ubatch=50)
    data = png_bytes(picture(500, 330, seed=4))  # 2 x 1 tiles + the global view
    [encoded] = llm.encode_images([{"type": "image", "data": base64.b64encode(data).decode()}])
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(10, 290, (9,), generator=g), torch.full((3 * 144,), PATCH_ID),
                     torch.randint(10, 290, (20,), generator=g)])
    ref = oracle_multimodal_logits(model, ids, images.preprocess(data)[0])
    assert (llm.logits(ids, [encoded]) - ref).abs().max().item() < TOL


def test_chat_token_ids_and_pixels_equal_llama4processor(multimodal):
    _, processor, _ = llama4_processing()
    from transformers import Llama4ImageProcessor, Llama4Processor

    import moestream

    path, _ = multimodal("scout")
    llm = moestream.load(path, device="cpu")
    mine = Llama4Processor(image_processor=Llama4ImageProcessor(size={"height": 56, "width": 56}),
                           tokenizer=processor.tokenizer, chat_template=llama4_chat_template())
    for n in (1, 2, 5):
        paths = pictures(path, n)
        messages = chat_of(paths)
        prompt = mine.apply_chat_template([{**m, "content": [{"type": "text", "text": m["content"]}]}
                                           if isinstance(m["content"], str) else
                                           {**m, "content": [{"type": "image"} if p["type"] == "image" else p
                                                             for p in m["content"]]} for m in messages],
                                          add_generation_prompt=True, tokenize=False)
        want = mine(text=prompt, images=[Image.open(p) for p in paths], return_tensors="pt")
        ids, _ = llm.encode_chat(messages)
        assert ids == want["input_ids"][0].tolist()
        assert torch.equal(oracle_pixels(paths), want["pixel_values"].float())


def test_later_turns_reuse_the_kv_prefix_and_never_re_run_the_tower(multimodal, monkeypatch):
    import base64

    import moestream
    import moestream.llm
    from moestream.model import vision

    path, _ = multimodal("maverick")
    a, b = pictures(path, 2)
    calls = []
    monkeypatch.setattr(moestream.llm, "encode_image", lambda *args: calls.append(args[2]) or vision.encode_image(*args))
    llm = moestream.load(path, device="cpu")
    first = [{"role": "user", "content": [{"type": "image", "path": str(a)}, {"type": "text", "text": "What is it?"}]}]
    reply = llm.generate(first, temperature=0, max_tokens=6)
    assert len(calls) == 1
    # the same picture again, now as base64 data, and a new one: only the new one is encoded
    again = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(a.read_bytes()).decode()}}
    second = first + [{"role": "assistant", "content": reply},
                      {"role": "user", "content": [again, {"type": "image", "path": str(b)}, {"type": "text", "text": "And?"}]}]
    held = len(llm.conversation.ids)
    follow = llm.generate(second, temperature=0, max_tokens=6)
    assert calls == [calls[0], calls[1]] and calls[0] != calls[1]
    fresh = moestream.load(path, device="cpu")
    ids, _ = fresh.encode_chat(second)
    assert llm.turn.prompt_tokens == len(ids) - held  # the first turn (and its image) was not prefilled again
    assert fresh.generate(second, temperature=0, max_tokens=6) == follow  # reusing the prefix changes nothing


def test_offloaded_experts_and_spilled_kv_equal_resident_with_images(multimodal, tmp_path):
    import moestream
    from moestream.scheduler.plan import kv_token_bytes

    path, _ = multimodal("scout")
    paths = pictures(path, 5)
    resident = moestream.load(path, device="cpu", ubatch=16)
    ids, encoded = resident.encode_chat(chat_of(paths))
    want = resident.logits(ids, encoded)
    c, p = resident.config, resident.plan
    per_token = kv_token_bytes(c, "f32", "f32")
    n_global, n_rope = len(c.global_layers), c.num_hidden_layers - len(c.global_layers)
    offload = dict(expert_cache=p.n_experts // 4 * p.expert_bytes, cpu_mem=2 * p.expert_bytes, expert_dir=tmp_path,
                   cpu_experts="never")
    spill = dict(kv_block=8, kv_gpu_mem=(n_rope * c.attention_chunk_size + n_global * 32) * per_token,
                 kv_cpu_mem=n_global * 3 * 8 * per_token, kv_disk=tmp_path / "kv.bin")
    offloaded = moestream.load(path, device="cpu", ubatch=16, **offload)
    ids2, encoded2 = offloaded.encode_chat(chat_of(paths))
    assert ids2 == ids and all(torch.equal(x.embeddings, y.embeddings) for x, y in zip(encoded, encoded2))
    assert torch.equal(offloaded.logits(ids, encoded2), want)  # experts move, nothing else: bit for bit
    assert offloaded.stats().experts.fetches > 0
    offloaded.close()
    # KV spilled to host RAM and disk merges attention over tiers by log-sum-exp: equal up to rounding,
    # as without images (test_kv_tiers.py)
    llm = moestream.load(path, device="cpu", ubatch=16, **offload, **spill)
    assert (llm.logits(ids, encoded2) - want).abs().max().item() < TOL
    s = llm.stats()
    assert s.experts.fetches > 0 and s.kv.spilled_to_host_bytes > 0 and s.kv.spilled_to_disk_bytes > 0
    from moestream.model.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8)
    assert llm.generate_ids(ids, params, stop_ids=set(), images=encoded2) == \
        resident.generate_ids(ids, params, stop_ids=set(), images=encoded)
    llm.close()


def test_plan_counts_the_vision_tower_and_no_vision_skips_it(multimodal):
    import moestream
    from moestream import MoestreamError as Error

    path, _ = multimodal("scout")
    seeing, blind = moestream.load(path, device="cpu"), moestream.load(path, device="cpu", vision=False)
    vb = seeing.plan.vision_bytes
    assert vb == seeing.vision.nbytes == seeing.plan.vision.resident_bytes(torch.float32) > 0
    assert seeing.plan.resident_bytes == blind.plan.resident_bytes + vb
    assert seeing.plan.resident_bytes == seeing.stats().memory.resident_bytes
    assert blind.vision is None and blind.plan.vision_bytes == 0
    assert any("--no-vision" in note for note in blind.notes) and any("vision tower loaded" in n for n in seeing.notes)
    with pytest.raises(Error, match=r"^images are off \(--no-vision\): run without --no-vision to send images$"):
        blind.generate(chat_of(pictures(path, 1)))
    r = run_cli("plan", "--json", "-m", str(path), "--gpu-mem", "1GiB")
    r_blind = run_cli("plan", "--json", "-m", str(path), "--gpu-mem", "1GiB", "--no-vision")
    assert json.loads(r.stdout)["gpu"]["resident_bytes"] - json.loads(r_blind.stdout)["gpu"]["resident_bytes"] == \
        seeing.plan.vision.resident_bytes(torch.bfloat16)  # plan assumes bf16


def run_cli(*args):
    """The real command in this process (one torch import): stdout, stderr, exit status."""
    import subprocess

    from click.testing import CliRunner

    from moestream.cli.main import cli

    r = CliRunner().invoke(cli, list(map(str, args)))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(["moestream", *args], r.exit_code, r.stdout, r.stderr)


def test_generate_cli_prints_transformers_greedy_text(multimodal):
    import moestream

    path, model = multimodal("scout")
    [a] = pictures(path, 1)
    r = run_cli("generate", "-m", path, "--chat", "--image", a, "-p", "Describe it.", "--temp", "0", "-n", "12", "--json")
    assert r.returncode == 0, r.stderr
    llm = moestream.load(path, device="cpu")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(a)}, {"type": "text", "text": "Describe it."}]}]
    ids, _ = llm.encode_chat(messages)
    tokens = oracle_greedy(model, ids, oracle_pixels([a]), 12, stop=llm.stop_ids)
    text_of = llm.tokenizer.stream_decoder()
    out = json.loads(r.stdout)
    assert out["text"] == "".join(text_of(t) for t in tokens) and out["prompt_tokens"] == len(ids)


def bad_files(tmp_path: Path) -> dict[str, Path]:
    whole = png_bytes(picture(200, 300, seed=3))
    files = {"text": tmp_path / "notes.png", "truncated": tmp_path / "cut.png", "bomb": tmp_path / "bomb.png"}
    files["text"].write_text("this is not a picture\n")
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["bomb"].write_bytes(png_claiming(50_000, 50_000))
    return files


def test_generate_cli_bad_images_are_one_line(multimodal, tmp_path):
    path, _ = multimodal("scout")
    bad, good = bad_files(tmp_path), pictures(path, 2)
    chat = ["generate", "-m", path, "--chat", "-p", "hi", "-n", "2"]
    cases = [
        (chat + ["--image", bad["text"]], "notes.png is not an image Pillow can read"),
        (chat + ["--image", bad["truncated"]], "cut.png is truncated or corrupt"),
        (chat + ["--image", bad["bomb"]], "decompression bomb"),
        (chat + ["--image", tmp_path / "missing.png"], "missing.png: there is no such file"),
        (chat + ["--image", tmp_path], "is a directory"),
        (chat + ["--max-images", "1", "--image", good[0], "--image", good[1]], "2 images in the conversation, more than --max-images 1"),
        (chat + ["--no-vision", "--image", good[0]], "images are off (--no-vision)"),
        (["generate", "-m", path, "-p", "hi", "--image", good[0]], "--image needs --chat"),
        (["generate", "--chat", "-p", "hi", "--image", good[0]], "is a text-only checkpoint"),  # the embedded model
        (chat + ["--max-images", "0"], "--max-images must be positive"),
    ]
    for argv, words in cases:
        r = run_cli(*argv)
        lines = [line for line in r.stderr.splitlines() if not line.startswith("note:")]
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (argv, r.stderr)


def test_bad_images_in_the_chat_are_one_line_and_the_conversation_stays(multimodal, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import moestream
    from moestream.cli.chat import ChatSession, loop
    from moestream.model.sampling import SamplingParams

    path, _ = multimodal("scout")
    bad, (a, b) = bad_files(tmp_path), pictures(path, 2)
    changing = tmp_path / "changing.png"
    changing.write_bytes(a.read_bytes())
    llm = moestream.load(path, device="cpu", max_images=3)
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=4), None, Console(file=io.StringIO(), width=300), False)
    saved = tmp_path / "chat.json"
    lines = iter([f"/image {a}", "First?", f"/image {bad['text']}", f"/image {bad['truncated']}", f"/image {bad['bomb']}",
                  f"/image {tmp_path / 'missing.png'}", "/image", f"/image {b}", f"/image {changing}", f"/image {b}",
                  "and now?"])
    feed = []

    def fake_input(prompt=""):
        try:
            line = next(lines)
        except StopIteration:
            raise EOFError from None
        if line == "and now?":  # the file attached last turns into garbage before the message goes
            changing.write_text("gone")
        feed.append(line)
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    loop(session, session.console)
    shown = [line for line in session.console.file.getvalue().splitlines() if line.strip() and not line.startswith("[ ")]
    errors = [line for line in shown if line.startswith("error:")]
    assert [e.split(":")[0] for e in errors] == ["error"] * 7, shown
    assert "notes.png is not an image Pillow can read" in errors[0] and "cut.png is truncated" in errors[1]
    assert "decompression bomb" in errors[2] and "missing.png: there is no such file" in errors[3]
    assert errors[4] == "error: usage: /image FILE"
    assert "4 images in the conversation, more than --max-images 3" in errors[5]
    assert "changing.png is not an image" in errors[6] and errors[6].endswith("(the conversation is kept)")
    assert len(session.history) == 2 and session.history[0]["content"][0] == {"type": "image", "path": str(a)}
    assert [p["path"] for p in session.pending] == [str(b), str(changing)]  # still attached for the next message
    changing.write_bytes(a.read_bytes())
    held = len(llm.conversation.ids)
    assert session.reply("Again?") is False and len(session.history) == 4 and session.pending == []
    prompt, _ = llm.encode_chat(session.messages()[:-1])
    assert 0 < held and llm.turn.prompt_tokens == len(prompt) - held  # the first turn was not prefilled again

    # /save keeps the references; /load restores them, and the next reply reads them again
    session.save(str(saved))
    data = json.loads(saved.read_text())
    assert [p for p in data["messages"][2]["content"] if p["type"] == "image"][0] == {"type": "image", "path": str(b)}
    other = ChatSession(moestream.load(path, device="cpu"), SamplingParams(temperature=0, max_tokens=4), None,
                        Console(file=io.StringIO()), False)
    assert other.load(str(saved)) == f"loaded 4 messages from {saved}"
    assert other.history == session.history and other.reply("Once more?") is False


def test_a_saved_chat_may_hold_base64_images_and_bad_parts_are_refused(multimodal, tmp_path):
    import base64
    import io

    from rich.console import Console

    import moestream
    from moestream.cli.chat import SESSION_FORMAT, ChatError, ChatSession
    from moestream.model.sampling import SamplingParams

    path, _ = multimodal("scout")
    [a] = pictures(path, 1)
    session = ChatSession(moestream.load(path, device="cpu"), SamplingParams(temperature=0, max_tokens=3), None,
                          Console(file=io.StringIO()), False)
    data = base64.b64encode(a.read_bytes()).decode()
    good = {"role": "user", "content": [{"type": "image", "data": data}, {"type": "text", "text": "Seen?"}]}
    for i, content in enumerate([[{"type": "video", "path": "x"}], [{"type": "image"}],
                                 [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]]):
        f = tmp_path / f"bad{i}.json"
        f.write_text(json.dumps({"format": SESSION_FORMAT, "messages": [good, {"role": "user", "content": content}]}))
        with pytest.raises(ChatError, match="is not a saved moestream chat .*message 1 part 0.*; the conversation is unchanged"):
            session.load(str(f))
    f = tmp_path / "good.json"
    f.write_text(json.dumps({"format": SESSION_FORMAT, "messages": [good, {"role": "assistant", "content": "Aye."}]}))
    assert session.load(str(f)) == f"loaded 2 messages from {f}"
    assert session.reply("And the colour?") is False and len(session.history) == 4


def test_text_parts_for_a_text_only_template_are_joined(embedded):
    """The embedded model's template prints content as text: OpenAI-style text parts are joined for it."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Good morrow, "}, {"type": "text", "text": "sir."}]}]
    assert not embedded.tokenizer.renders_parts
    assert embedded.tokenizer.encode_chat(parts) == embedded.tokenizer.encode_chat([{"role": "user", "content": "Good morrow, sir."}])
    with pytest.raises(MoestreamError, match=r"is a text-only checkpoint \(config.json has no vision_config\)"):
        embedded.generate([{"role": "user", "content": [{"type": "image", "path": "x.png"}]}])
    with pytest.raises(MoestreamError, match=r'message 0 part 1 is not \{"type": "text", "text": TEXT\} or an image part'):
        embedded.generate([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}])


def test_the_server_takes_inline_images_and_answers_as_llm_generate(multimodal):
    """`moestream serve` reads OpenAI's image_url parts (data: URLs) and base64 image parts; the greedy
    reply equals llm.generate on the same chat; an image path, a web URL or bytes that are no image are
    each a 400, and the server lives on."""
    import base64

    import openai

    from moestream import load

    from .test_serve import Served

    path, _ = multimodal("scout")
    shots = pictures(path, 2)
    chat = chat_of(shots)
    local = load(path, threads=1)
    try:
        want = local.generate(chat, max_tokens=8, temperature=0, ignore_eos=True)
    finally:
        local.close()
    data = {str(p): base64.b64encode(p.read_bytes()).decode() for p in shots}
    inline = {
        "image_url": lambda p: {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data[p['path']]}"}},
        "image": lambda p: {"type": "image", "data": data[p["path"]]},
    }
    served = Served("-m", str(path), "-t", "1", "--temp", "0", "-ub", "16")  # image rows across micro-batches
    try:
        client = served.client(key="none")
        for form, part_of in inline.items():
            content = [p if p["type"] == "text" else part_of(p) for p in chat[1]["content"]]
            r = client.chat.completions.create(model="m", messages=[chat[0], {"role": "user", "content": content}],
                                               max_tokens=8, extra_body={"ignore_eos": True})
            assert r.choices[0].message.content == want, form
        for bad in ({"type": "image", "path": str(shots[0])}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "image", "data": base64.b64encode(b"not an image").decode()}):
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": [bad]}], max_tokens=2)
        assert served.get("/health").json() == {"status": "ok"}
    finally:
        assert served.stop() == 0, "".join(served.lines)
