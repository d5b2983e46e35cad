"""The Llama 4 vision tower, pixel shuffle and multi-modal projector, in plain tensors.

Llama 4 fuses images early: each 336 x 336 tile becomes a few hundred embeddings that take the
places of the `<|patch|>` tokens in the prompt, and the text model reads them like any other token.
One tile goes

    patches = linear(unfold(tile))                       24 x 24 patches of 14 x 14 x 3 pixels
    x = layer_norm([patches, class] + positions)         the class token is appended *last*
    x = encoder layers                                   pre-norm ViT blocks, 2-D RoPE, no mask
    x = layer_norm(x)[:-1]                               the class token is dropped again
    x = gelu(fc2(gelu(fc1(pixel_shuffle(x)))))           2 x 2 neighbours -> one token: 576 -> 144
    out = linear(x)                                      into the text model's width

An encoder block is  h = x + attention(layer_norm(x));  out = h + fc2(gelu(fc1(layer_norm(h))))
with biases everywhere (unlike the text model), exact (erf) GELU whatever `hidden_act` says, and
LayerNorm at eps 1e-5 whatever `norm_eps` says: that is what transformers' modeling_llama4.py runs,
and the checkpoints were trained with it. The RoPE is 2-D: the first half of each head's rotation
pairs turns with the patch's column, the second half with its row; the class token is not rotated.

Weights are Llama4ForConditionalGeneration's `vision_model.*` and `multi_modal_projector.*`,
read through a `read(name) -> tensor` function (the Checkpoint's), checked against the config.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoestreamError
from . import images
from .config import _Fields, read_config_json
from .llama4 import apply_rope

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default: transformers never passes norm_eps to the vision norms
TILES_PER_PASS = 16  # tiles encoded together: bounds the activations (a full image is at most 17 tiles)


@dataclass(frozen=True)
class VisionConfig:
    """config.json's `vision_config`, plus the two facts of the outer config the tower needs."""

    hidden_size: int
    intermediate_size: int  # the encoder MLP width; also the adapter's input (hidden / ratio^2)
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int  # a tile's side in pixels
    patch_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    text_hidden_size: int  # the projector's output: text_config.hidden_size
    image_token_id: int  # the <|patch|> token whose embeddings the image replaces (image_token_index)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def positions(self) -> int:
        """Tokens the encoder sees per tile: every patch, then the class token."""
        return self.patches_per_side ** 2 + 1

    @property
    def tokens_per_tile(self) -> int:
        """Embeddings one tile yields after pixel shuffle: the `<|patch|>` tokens per tile (144 for Scout)."""
        return round(self.patches_per_side * self.pixel_shuffle_ratio) ** 2

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every vision tensor of a Llama4ForConditionalGeneration checkpoint, by name, with the shape
        this config implies: what load_vision reads and checks, and what the planner counts."""
        d, i, v = self.hidden_size, self.intermediate_size, "vision_model."
        shapes = {v + "patch_embedding.linear.weight": (d, self.num_channels * self.patch_size ** 2),
                  v + "class_embedding": (d,), v + "positional_embedding_vlm": (self.positions, d)}
        for norm in ("layernorm_pre", "layernorm_post"):
            shapes |= {v + f"{norm}.weight": (d,), v + f"{norm}.bias": (d,)}
        for n in range(self.num_hidden_layers):
            p = v + f"model.layers.{n}."
            for proj in "qkvo":
                shapes |= {p + f"self_attn.{proj}_proj.weight": (d, d), p + f"self_attn.{proj}_proj.bias": (d,)}
            shapes |= {p + "mlp.fc1.weight": (i, d), p + "mlp.fc1.bias": (i,), p + "mlp.fc2.weight": (d, i),
                       p + "mlp.fc2.bias": (d,)}
            for norm in ("input_layernorm", "post_attention_layernorm"):
                shapes |= {p + f"{norm}.weight": (d,), p + f"{norm}.bias": (d,)}
        shapes[v + "vision_adapter.mlp.fc1.weight"] = (self.projector_input_dim, i)
        shapes[v + "vision_adapter.mlp.fc2.weight"] = (self.projector_output_dim, self.projector_output_dim)
        shapes["multi_modal_projector.linear_1.weight"] = (self.text_hidden_size, self.vision_output_dim)
        return shapes

    @property
    def numel(self) -> int:
        """Elements of every vision weight (tower, adapter, projector), from the config alone."""
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())

    def resident_bytes(self, dtype: torch.dtype) -> int:
        """Bytes the vision weights hold on the device in `dtype`, with the RoPE table (complex64): for the planner."""
        element = torch.empty((), dtype=dtype).element_size()
        return self.numel * element + self.positions * (self.head_dim // 2) * 8

    @classmethod
    def from_file(cls, path: str | Path) -> "VisionConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "VisionConfig | None":
        """The tower of a checkpoint's config.json, or None for a text-only one. A bad vision_config is
        one line that also offers --no-vision, which loads the text model without it."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # ModelConfig has read this file already and says what is wrong with it
        if not isinstance(raw, dict) or raw.get("vision_config") is None:
            return None
        try:
            return cls.from_dict(raw, source=str(path))
        except MoestreamError as e:
            raise MoestreamError(f"{e} (or --no-vision to load the text model alone)") from None

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "VisionConfig":
        """The whole config.json of a Llama4ForConditionalGeneration, either dialect (transformers 4.51
        writes `rope_theta` in vision_config, 5 writes `rope_parameters`); defaults are transformers'."""
        top = _Fields(raw if isinstance(raw, dict) else {}, source)
        if "vision_config" not in top.raw:
            raise MoestreamError(f"{source} has no vision_config: this checkpoint is text-only, it cannot read images")
        v = _Fields(top.dict("vision_config"), f"{source} vision_config")
        text = _Fields(top.dict("text_config"), f"{source} text_config")
        rope = _Fields(v.dict("rope_parameters"), f"{source} vision_config.rope_parameters")

        def side(key: str, default: int) -> int:  # an int, or a square [h, w]
            value = v.raw.get(key)
            if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
                return _Fields({key: value[0]}, v.source).int(key)
            if isinstance(value, list):
                raise v.bad(key, "a whole number (a square tile)")
            return v.int(key, default)

        c = cls(
            hidden_size=v.int("hidden_size", 768), intermediate_size=v.int("intermediate_size", 5632),
            num_hidden_layers=v.int("num_hidden_layers", 34, minimum=0), num_attention_heads=v.int("num_attention_heads", 16),
            num_channels=v.int("num_channels", 3), image_size=side("image_size", 448), patch_size=side("patch_size", 14),
            pixel_shuffle_ratio=v.float("pixel_shuffle_ratio", 0.5), projector_input_dim=v.int("projector_input_dim", 4096),
            projector_output_dim=v.int("projector_output_dim", 4096), vision_output_dim=v.int("vision_output_dim", 7680),
            rope_theta=rope.float("rope_theta", v.float("rope_theta", 10000.0)),
            text_hidden_size=text.int("hidden_size", 5120),
            image_token_id=top.int("image_token_index", top.int("image_token_id", 200092), minimum=0),
        )
        c._check(v)
        return c

    def _check(self, v: _Fields) -> None:
        """The shape rules the tower's arithmetic relies on, each one line naming the field."""
        if self.hidden_size % self.num_attention_heads or self.head_dim % 4:
            raise v.bad("num_attention_heads", f"a divisor of hidden_size ({self.hidden_size}) leaving heads of a "
                                               "multiple of 4 (2-D RoPE: x and y halves of rotation pairs)")
        if self.image_size % self.patch_size:
            raise v.bad("patch_size", f"a divisor of image_size ({self.image_size})")
        r = self.pixel_shuffle_ratio
        shuffled = self.patches_per_side * r
        if r > 1 or abs(shuffled - round(shuffled)) > 1e-9 or abs(self.hidden_size / r - round(self.hidden_size / r)) > 1e-9:
            raise v.bad("pixel_shuffle_ratio", f"at most 1, turning {self.patches_per_side} patches a side and "
                                               f"{self.hidden_size} channels into whole numbers")
        if self.intermediate_size != round(self.hidden_size / r ** 2):
            raise v.bad("intermediate_size", f"hidden_size / pixel_shuffle_ratio^2 = {round(self.hidden_size / r ** 2)} "
                                             "(the adapter after pixel shuffle reads that many channels)")
        if self.projector_output_dim != self.projector_input_dim or self.vision_output_dim != self.projector_output_dim:
            raise v.bad("vision_output_dim", f"equal to projector_input_dim and projector_output_dim "
                                             f"({self.projector_input_dim}, {self.projector_output_dim})")


# --- building blocks -----------------------------------------------------------------------------
def vision_rotations(c: VisionConfig) -> torch.Tensor:
    """2-D RoPE rotations [positions, head_dim/2] complex64: pairs 0..n-1 turn by the patch's column
    (x + 1) * freq, pairs n..2n-1 by its row (y + 1) * freq; the class token (last) by nothing."""
    side = c.patches_per_side
    index = torch.arange(side * side)
    freq_dim = c.head_dim // 2
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    angles = torch.cat([(index % side + 1)[:, None] * freqs, (index // side + 1)[:, None] * freqs], dim=-1)
    angles = torch.cat([angles, torch.zeros(1, angles.shape[1])])  # the class token
    return torch.complex(torch.cos(angles), torch.sin(angles))


def patchify(tiles: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, patches, C * patch * patch], row-major patches, each flattened channel-first:
    the layout of nn.Unfold(patch, stride=patch), which the patch embedding's weight was trained on."""
    N, C, H, W = tiles.shape
    x = tiles.view(N, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(N, (H // patch) * (W // patch), C * patch * patch)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, P, D] -> [N, P * ratio^2, D / ratio^2]: each 2 x 2 block of neighbouring patches (ratio 0.5)
    becomes one token. The two transposes are transformers' own, so channels land in its order."""
    N, P, D = x.shape
    side = math.isqrt(P)
    x = x.reshape(N, side, int(side * ratio), int(D / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(N, int(side * ratio), int(side * ratio), int(D / ratio ** 2)).permute(0, 2, 1, 3)
    return x.reshape(N, -1, x.shape[-1])


# --- weights -------------------------------------------------------------------------------------
@dataclass
class VisionLayer:
    attn_norm: tuple[torch.Tensor, torch.Tensor]  # LayerNorm (weight, bias)
    qkv: torch.Tensor  # q, k, v stacked [3D, D]: one matmul instead of three
    qkv_bias: torch.Tensor
    o: torch.Tensor
    o_bias: torch.Tensor
    mlp_norm: tuple[torch.Tensor, torch.Tensor]
    fc1: torch.Tensor
    fc1_bias: torch.Tensor
    fc2: torch.Tensor
    fc2_bias: torch.Tensor


@dataclass
class VisionWeights:
    config: VisionConfig
    patch_embed: torch.Tensor  # [D, C * p * p]
    class_embed: torch.Tensor  # [D]
    positions: torch.Tensor  # [patches + 1, D]
    pre_norm: tuple[torch.Tensor, torch.Tensor]
    layers: list[VisionLayer]
    post_norm: tuple[torch.Tensor, torch.Tensor]
    adapter_fc1: torch.Tensor  # [projector_input_dim, intermediate_size], no bias
    adapter_fc2: torch.Tensor  # [projector_output_dim, projector_output_dim], no bias
    projector: torch.Tensor  # [text hidden, vision_output_dim], no bias
    rotations: torch.Tensor  # the 2-D RoPE table [patches + 1, head_dim/2], complex64

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for value in vars(self).values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, torch.Tensor):
                    out.append(item)
                elif isinstance(item, VisionLayer):
                    out += [t for v in vars(item).values() for t in (v if isinstance(v, tuple) else (v,))]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def load_vision(read, config: VisionConfig, device, dtype) -> VisionWeights:
    """The vision weights from `read(checkpoint name) -> tensor`, each checked against the shape the
    config implies, on `device` in `dtype`."""
    shapes = config.tensor_shapes()

    def w(name: str) -> torch.Tensor:
        t = read(name)
        if tuple(t.shape) != shapes[name]:
            raise MoestreamError(f"checkpoint tensor {name} has shape {list(t.shape)} but config.json's vision_config "
                                 f"implies {list(shapes[name])}: the weights and config.json disagree; re-download them")
        return t.to(device=device, dtype=dtype)

    def norm(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        return w(prefix + ".weight"), w(prefix + ".bias")

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"vision_model.model.layers.{i}."
        a = p + "self_attn."
        layers.append(VisionLayer(
            attn_norm=norm(p + "input_layernorm"),
            qkv=torch.cat([w(a + f"{n}_proj.weight") for n in "qkv"]),
            qkv_bias=torch.cat([w(a + f"{n}_proj.bias") for n in "qkv"]),
            o=w(a + "o_proj.weight"), o_bias=w(a + "o_proj.bias"),
            mlp_norm=norm(p + "post_attention_layernorm"),
            fc1=w(p + "mlp.fc1.weight"), fc1_bias=w(p + "mlp.fc1.bias"),
            fc2=w(p + "mlp.fc2.weight"), fc2_bias=w(p + "mlp.fc2.bias"),
        ))
    v = "vision_model."
    return VisionWeights(
        config=config,
        patch_embed=w(v + "patch_embedding.linear.weight"),
        class_embed=w(v + "class_embedding"),
        positions=w(v + "positional_embedding_vlm"),
        pre_norm=norm(v + "layernorm_pre"),
        layers=layers,
        post_norm=norm(v + "layernorm_post"),
        adapter_fc1=w(v + "vision_adapter.mlp.fc1.weight"),
        adapter_fc2=w(v + "vision_adapter.mlp.fc2.weight"),
        projector=w("multi_modal_projector.linear_1.weight"),
        rotations=vision_rotations(config).to(device),
    )


# --- the tower -----------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], norm[0], norm[1], LAYER_NORM_EPS)


def encoder_layer(x: torch.Tensor, layer: VisionLayer, rotations: torch.Tensor, heads: int) -> torch.Tensor:
    """One pre-norm ViT block over [N, T, D]: every token of a tile sees every other (no mask)."""
    N, T, D = x.shape
    qkv = F.linear(layer_norm(x, layer.attn_norm), layer.qkv, layer.qkv_bias).view(N, T, 3 * heads, D // heads)
    qk = apply_rope(qkv[:, :, :2 * heads], rotations)  # queries and keys turn alike: one call for both
    q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, 2 * heads:]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    h = x + F.linear(out.transpose(1, 2).reshape(N, T, D), layer.o, layer.o_bias)
    mlp = F.linear(F.gelu(F.linear(layer_norm(h, layer.mlp_norm), layer.fc1, layer.fc1_bias)), layer.fc2, layer.fc2_bias)
    return h + mlp


def encode_tiles(weights: VisionWeights, tiles: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] tiles -> [N, tokens_per_tile, text hidden] embeddings."""
    c = weights.config
    x = F.linear(patchify(tiles, c.patch_size), weights.patch_embed)
    x = torch.cat([x, weights.class_embed.expand(x.shape[0], 1, -1)], dim=1) + weights.positions
    x = layer_norm(x, weights.pre_norm)
    for layer in weights.layers:
        x = encoder_layer(x, layer, weights.rotations, c.num_attention_heads)
    x = layer_norm(x, weights.post_norm)[:, :-1]  # the class token has done its work
    x = pixel_shuffle(x, c.pixel_shuffle_ratio)
    x = F.gelu(F.linear(F.gelu(F.linear(x, weights.adapter_fc1)), weights.adapter_fc2))
    return F.linear(x, weights.projector)


@torch.inference_mode()
def encode_images(weights: VisionWeights, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pixel values [N_tiles, 3, H, W] (images.preprocess's, tiles of every image in prompt order) ->
    [N_tiles * tokens_per_tile, text hidden]: the embeddings that replace the `<|patch|>` tokens, in order."""
    c = weights.config
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
        raise MoestreamError(f"pixel values of shape {list(pixel_values.shape)}, but this model reads tiles of "
                             f"[{c.num_channels}, {c.image_size}, {c.image_size}]: preprocess images with "
                             f"size={c.image_size}")
    device, dtype = weights.patch_embed.device, weights.patch_embed.dtype
    tiles = pixel_values.to(device=device, dtype=dtype)
    out = [encode_tiles(weights, chunk) for chunk in tiles.split(TILES_PER_PASS)]
    return torch.cat(out).reshape(-1, c.text_hidden_size)


# --- one image, kept with the conversation -------------------------------------------------------
@dataclass(frozen=True)
class EncodedImage:
    """One image as the text model reads it. A conversation keeps these (scheduler/generate.py Sequence),
    so a later turn, or a prompt prefilled again, never runs the tower twice for the same picture."""

    key: str  # sha256 of the image file's bytes: a path and the same file as base64 are one image
    aspect_ratio: tuple[int, int]  # tiles (rows, cols): the layout of its tokens in the prompt
    embeddings: torch.Tensor  # [tiles * tokens_per_tile, text hidden], on the CPU (no device memory between turns)

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[0]


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_image(weights: VisionWeights, data: bytes, key: str | None = None, name: str | None = None) -> EncodedImage:
    """Decode, preprocess (tiles of the tower's side) and encode one image file's bytes; `name` is how
    an error names the image (its path)."""
    pixels, ratio = images.preprocess(data, size=weights.config.image_size, name=name)
    return EncodedImage(key or image_key(data), ratio, encode_images(weights, pixels).cpu())
