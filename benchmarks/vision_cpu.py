"""Encoding one image on the CPU at Llama 4 Scout's vision shapes, one run: seconds per image; then
prompt t/s of a chat with 1 and 8 images through the runtime.

    python benchmarks/vision_cpu.py [-t 2] [--dtype float32] [--tiles 1,5] [--images 1,8] [--photo 640x480]

Random weights at the real Scout / Maverick vision_config (the released config.json's: 1408 wide,
34 layers, 16 heads, 336-px tiles of 14-px patches, 4096-wide adapter, projected to 5120): transformers'
Llama4VisionConfig defaults are not these (768 wide, 448-px tiles, 7680 out), so they are written out
here. An image of 1 tile (anything up to 336 px a side) and one of 2 x 2 tiles + its global view
(5 tiles, e.g. 672 x 672) are encoded, tower + pixel shuffle + projector, best of 3. Also timed:
preprocessing a 1024 x 768 photo (decode not included). Prints a markdown table.

Then the whole path, llm.generate on a chat of N photos (PNG files, --photo size: 640 x 480 is
2 x 2 tiles + the global view, 720 image tokens): the same random Scout tower inside a temporary
Llama4ForConditionalGeneration checkpoint whose text model is the embedded one (its weights, its
tokenizer plus the six image tokens), so the text side is small and the tower dominates. Reported:
image tokens, prompt tokens, tower seconds (encoding), prefill seconds, and prompt t/s over both.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moestream.config import DEFAULT_MODEL
from moestream.model import images
from moestream.model.checkpoint import Checkpoint
from moestream.model.vision import VisionConfig, encode_images, load_vision

SCOUT = {"image_token_index": 200092, "text_config": {"hidden_size": 5120}, "vision_config": dict(
    hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16, num_channels=3,
    image_size=336, patch_size=14, pixel_shuffle_ratio=0.5, projector_input_dim=4096, projector_output_dim=4096,
    vision_output_dim=4096, rope_theta=10000)}


def tile_flops(c: VisionConfig) -> float:
    """Multiply-adds x 2 of one tile: the encoder's matmuls and attention, the adapter and projector."""
    T, D, I = c.positions, c.hidden_size, c.intermediate_size
    encoder = c.num_hidden_layers * (T * (4 * D * D + 2 * D * I) + 2 * T * T * D)
    patches = T * D * c.num_channels * c.patch_size ** 2
    tokens = c.tokens_per_tile
    head = tokens * (c.projector_input_dim * I + c.projector_output_dim ** 2 + c.text_hidden_size * c.vision_output_dim)
    return 2.0 * (encoder + patches + head)


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def multimodal_checkpoint(directory: Path) -> Path:
    """The embedded model's text weights and tokenizer as a Llama4ForConditionalGeneration checkpoint with
    SCOUT's vision_config (its tower is drawn at read time, see RandomTower): the embeddings and lm_head
    get six zero rows for the image tokens, the context grows to 16k."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    text = json.loads((DEFAULT_MODEL / "config.json").read_text())
    tok = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (
        images.IMAGE_START, images.IMAGE_END, images.IMAGE, images.PATCH, images.TILE_X, images.TILE_Y)])
    vocab = tok.get_vocab_size()
    weights = {}
    for name, t in load_file(str(DEFAULT_MODEL / "model.safetensors")).items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, t.new_zeros(vocab - t.shape[0], t.shape[1])])
        weights["language_model." + name] = t.contiguous()
    save_file(weights, str(directory / "model.safetensors"))
    text.update(vocab_size=vocab, max_position_embeddings=16384)
    config = dict(SCOUT, architectures=["Llama4ForConditionalGeneration"], model_type="llama4", text_config=text,
                  image_token_index=tok.token_to_id(images.PATCH))
    (directory / "config.json").write_text(json.dumps(config))
    tok.save(str(directory / "tokenizer.json"))
    tokenizer_config = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


class RandomTower(Checkpoint):
    """The checkpoint, with the vision weights drawn at SCOUT's shapes instead of read (1.7 GB not written)."""

    @functools.cached_property
    def vision_shapes(self) -> dict:
        return VisionConfig.of_checkpoint(self.path / "config.json").tensor_shapes()

    def read_vision(self, name: str) -> torch.Tensor:
        shape = self.vision_shapes[name]
        g = torch.Generator().manual_seed(len(name) * 7919 + sum(map(ord, name)))
        return torch.randn(shape, generator=g) * 0.02


def prompt_rates(counts: list[int], photo: tuple[int, int], dtype: str, threads: int) -> None:
    from moestream.config import RuntimeConfig
    from moestream.llm import LLM
    from moestream.model.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        path = multimodal_checkpoint(Path(tmp))
        runtime = RuntimeConfig.build(model=path, device="cpu", dtype=dtype, threads=threads, ctx_size="16k")
        llm = LLM(runtime, checkpoint=RandomTower(path))
        w, h = photo
        print(f"\nchat with N photos of {w} x {h}, greedy, 1 token; text model: the embedded one "
              f"({llm.model.resident_bytes / 2**20:.0f} MiB); tower: Scout's ({llm.vision.nbytes / 2**30:.2f} GiB)")
        print("| images | image tokens | prompt tokens | tower s | prefill s | prompt t/s (tower + prefill) | prefill t/s |")
        print("|---|---|---|---|---|---|---|")
        rng = np.random.default_rng(1)
        for n in counts:
            files = []
            for i in range(n):
                files.append(Path(tmp) / f"photo{n}_{i}.png")
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
            content = [{"type": "image", "path": str(f)} for f in files] + [{"type": "text", "text": "Compare them."}]
            llm.reset()
            t = time.perf_counter()
            ids, encoded = llm.encode_chat([{"role": "user", "content": content}])
            tower = time.perf_counter() - t
            llm.generate_ids(ids, SamplingParams(temperature=0, max_tokens=1), images=encoded)
            turn = llm.turn
            tokens = sum(im.tokens for im in encoded)
            print(f"| {n} | {tokens} | {turn.prompt_tokens} | {tower:.2f} | {turn.prompt_seconds:.2f} | "
                  f"{turn.prompt_tokens / (tower + turn.prompt_seconds):.1f} | {turn.prompt_tps:.1f} |")
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tiles", default="1,5", help="comma-separated tile counts per image (1, or rows*cols + 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images", default="1,8", help="comma-separated image counts for the prompt t/s table (empty: skip)")
    ap.add_argument("--photo", default="640x480", help="WxH of each photo in the prompt t/s table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = VisionConfig.from_dict(SCOUT)
    gen = torch.Generator().manual_seed(0)
    shapes = config.tensor_shapes()
    weights = load_vision(lambda name: torch.randn(shapes[name], generator=gen) * 0.02, config, "cpu", dtype)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; Scout vision tower, {args.dtype}, random weights "
          f"({config.numel / 1e6:.0f} M parameters, {weights.nbytes / 2**30:.2f} GiB resident); best of {args.repeat}")
    print("| image | tiles | image tokens | seconds | s per tile | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for tiles in (int(n) for n in args.tiles.split(",")):
        side = math.isqrt(max(tiles - 1, 1))
        name = "one tile (<= 336 px)" if tiles == 1 else f"{side} x {side} tiles + global"
        pixels = torch.randn(tiles, 3, 336, 336, generator=gen).clamp_(-1, 1)
        encode_images(weights, pixels[:1])  # warm the allocator and kernels
        seconds = best_of(args.repeat, lambda: encode_images(weights, pixels))
        gflops = tiles * tile_flops(config) / seconds / 1e9
        print(f"| {name} | {tiles} | {tiles * config.tokens_per_tile} | {seconds:.2f} | {seconds / tiles:.2f} | {gflops:.0f} |")

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    pre = best_of(args.repeat, lambda: images.preprocess(photo))
    pixels, ratio = images.preprocess(photo)
    print(f"| preprocess 1024 x 768 photo -> {ratio[0]} x {ratio[1]} tiles + global | {pixels.shape[0]} | "
          f"{pixels.shape[0] * config.tokens_per_tile} | {pre:.3f} | {pre / pixels.shape[0]:.3f} | - |")
    if args.images:
        w, h = (int(x) for x in args.photo.lower().split("x"))
        prompt_rates([int(n) for n in args.images.split(",")], (w, h), args.dtype, args.threads)


if __name__ == "__main__":
    main()
