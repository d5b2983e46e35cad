"""LLM: a loaded model with its tokenizer and counters — the public Python API, and nothing more.

    llm = moestream.load()                  # the embedded default model
    llm.logits(ids)                         # whole prompt at once, fresh sequence -> [T, V]
    llm.decode_logits(ids)                  # one token at a time through the KV cache -> [T, V]
    llm.generate("To be, or", max_tokens=50, stream=print)
    llm.generate([{"role": "user", "content": [{"type": "image", "path": "cat.png"},
                                               {"type": "text", "text": "What is this?"}]}])
    llm.stats()                             # one snapshot of every counter

Loading builds the parts in dependency order and wires them by their constructors: the plan (what
sits where), the recorder and routing trace (when asked for), the resident weights, the expert
source (offload/build.py), the model, the generation loop (scheduler/generate.py). Chat turns that
extend the conversation reuse its KV cache (only the new tokens are prefilled); a step that fails or
is interrupted inside the model drops the conversation's cache, never leaving a half-written one.
A multimodal checkpoint also gets its vision tower (model/vision.py): each image of a chat is encoded
once and kept with the conversation's Sequence, and its embeddings take its <|patch|> tokens' places.
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .cache.kv import KVCache, KVDisk, KVStats
from .config import RuntimeConfig, resolve_device, resolve_dtype
from .errors import ContextFull, MoestreamError
from .model.checkpoint import Checkpoint
from .model.formats import expert_format
from .model.images import PATCH, image_bytes, image_source
from .model import native
from .model.llama4 import Llama4, load_weights
from .model.sampling import SamplingParams
from .model.tokenizer import Tokenizer, chat_parts
from .model.vision import EncodedImage, encode_image, image_key, load_vision
from .offload.build import build_experts
from .profiling.recorder import NULL, Recorder
from .profiling.report import Profile
from .profiling.routing import RoutingRecorder
from .scheduler.generate import Generator, Sequence, TurnStats
from .scheduler.plan import Plan, make_plan
from .stats import MemoryStats, Stats, Totals
from .units import fmt_bytes


class LLM:
    def __init__(self, runtime: RuntimeConfig, progress: Callable[[int, int], None] | None = None, checkpoint=None):
        """progress(bytes_done_now, bytes_total) is called while experts are placed in host RAM / on disk;
        checkpoint: read weights from this object instead of runtime.model (a SyntheticCheckpoint)."""
        t0 = time.perf_counter()
        self.runtime = runtime
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        self.device = resolve_device(runtime.device)
        self.checkpoint = checkpoint or Checkpoint(runtime.model, vision=runtime.vision)
        self.config = c = self.checkpoint.config
        self.dtype = resolve_dtype(runtime.dtype, self.device, self.checkpoint.dtype)
        if runtime.ctx_size > c.max_position_embeddings:
            raise MoestreamError(f"context size {runtime.ctx_size} exceeds this model's maximum of "
                                 f"{c.max_position_embeddings} tokens: use -c {c.max_position_embeddings} or less")
        self.expert_format = expert_format(runtime.expert_dtype, self.checkpoint.expert_dtype, self.dtype, self.device)
        self.plan: Plan = make_plan(c, runtime, self.device, self.dtype, self.expert_format)
        self.ctx_size = self.plan.ctx_size
        # opened and locked for the life of the LLM: an unwritable, foreign or busy --kv-disk fails now
        self.kv_disk = KVDisk(self.plan.kv.disk) if self.plan.kv.disk is not None else None
        self.rec = Recorder(self.device) if runtime.profile is not None else NULL
        self.trace = None
        if runtime.record_routing is not None:
            self.trace = RoutingRecorder(runtime.record_routing, {
                "model": str(runtime.model), "moe_layers": c.moe_layers, "num_experts": c.num_local_experts,
                "top_k": c.num_experts_per_tok, "expert_bytes": self.plan.expert_bytes})
        weights = load_weights(self.checkpoint, self.device, self.dtype, runtime.resident_dtype)
        p = self.plan
        self.experts = build_experts(self.checkpoint, runtime, self.expert_format, resident=p.resident, slots=p.cache_slots,
                                     host_experts=p.host_experts, cpu_layers=p.cpu_layers, routers=weights.routers(),
                                     device=self.device, dtype=self.dtype, rec=self.rec,
                                     guess_log=self.trace.buffer if self.trace else None, progress=progress)
        # the vision tower, resident beside the text weights (counted in the plan's resident bytes)
        self.vision = load_vision(self.checkpoint.read_vision, p.vision, self.device, self.dtype) if p.vision else None
        self.model = Llama4(c, weights, self.experts, self.device, self.dtype, rec=self.rec,
                            on_route=self.trace.hook if self.trace else None,
                            image_token_id=p.vision.image_token_id if p.vision else None)
        # one-token steps as replayed CUDA graphs (model/graphs.py), captured now, before any step runs;
        # not profiled runs, whose spans time each op
        self.graph_note = None
        if self.device.type == "cuda" and runtime.cuda_graphs and runtime.profile is None:
            self.graph_note = self.model.capture_graphs()
        self.profile = Profile(runtime.profile, self.rec, self.experts, weights.nbytes) if runtime.profile is not None else None
        self.generator = Generator(self.model, runtime.ubatch, self.rec, self.trace, self.profile)
        has_tokenizer = (Path(runtime.model) / "tokenizer.json").exists()
        self.tokenizer = Tokenizer(runtime.model, c.eos_token_ids) if has_tokenizer else None
        self.stop_ids = self.tokenizer.stop_ids if self.tokenizer else set(c.eos_token_ids)
        self.conversation: Sequence | None = None  # the chat's sequence, reused by turns that extend it
        self.last_kv = KVStats()  # the counters of the last KV cache dropped
        self.turn, self.totals = TurnStats(), Totals()
        # What exists now (torch's ~170k module objects, the model) lives on: freezing it keeps Python's
        # full collections, which would scan it all (~90 ms), out of token steps. Unfreezing first lets
        # this collection reclaim whatever an earlier, dropped model left in reference cycles.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.load_seconds = time.perf_counter() - t0

    @property
    def notes(self) -> list[str]:
        seeing = [f"vision tower loaded ({fmt_bytes(self.vision.nbytes)} on {self.device}): images work; --no-vision "
                  "skips it"] if self.vision is not None else []
        native_note = []
        if self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) and (kernels := native.status()) != "on":
            native_note = [f"decode steps through torch op by op, not moestream's C kernels: {kernels}"]
        return self.checkpoint.notes + seeing + ([self.graph_note] if self.graph_note else []) + native_note

    # --- sequences ---------------------------------------------------------------------------------
    def new_sequence(self) -> Sequence:
        """A fresh sequence with a KV cache laid out as planned. The conversation is dropped first: its
        cache holds the KV disk file, which the new one starts empty."""
        self.reset()
        return Sequence(KVCache(self.config, self.device, self.dtype, self.plan.kv, self.kv_disk, self.rec))

    def request_sequence(self, slot: int) -> Sequence:
        """A fresh sequence for one of several requests served at once (scheduler/batch.py), laid out as
        planned; the conversation is left alone. Its disk-tier KV blocks, if any, go to a file of its
        own, --kv-disk with `.slot` appended, made (exclusive, locked) and removed with it."""
        layout = self.plan.kv
        if layout.disk is not None:
            layout = replace(layout, disk=layout.disk.with_name(f"{layout.disk.name}.{slot}"))
        return Sequence(KVCache(self.config, self.device, self.dtype, layout, None, self.rec))

    def drop(self, seq: Sequence) -> None:
        """Let go of a sequence's cache, keeping its counters for stats()."""
        snap = seq.cache.snapshot()
        self.last_kv = replace(snap, tokens=0, tokens_device=0, tokens_host=0, tokens_disk=0, device_bytes=0,
                               host_bytes=0)
        seq.cache.close()

    def reset(self) -> None:
        """Forget the cached conversation (the next call prefills from scratch)."""
        if self.conversation is not None:
            self.drop(self.conversation)
            self.conversation = None

    def _ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise MoestreamError("no tokens given")
        if ids.numel() > self.ctx_size:
            raise MoestreamError(
                f"{ids.numel()} tokens exceed the context size of {self.ctx_size}: shorten the input or raise -c"
            )
        if int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0:
            raise MoestreamError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    # --- images ------------------------------------------------------------------------------------
    def check_images(self, count: int) -> None:
        """The one line why a conversation of `count` images cannot be read: no vision tower, or more
        images than --max-images (the chat asks before it attaches one)."""
        if count and self.vision is None:
            if self.config.is_multimodal and not self.runtime.vision:
                raise MoestreamError("images are off (--no-vision): run without --no-vision to send images")
            raise MoestreamError(f"{self.runtime.model} is a text-only checkpoint (config.json has no vision_config), so "
                                 "it cannot read images: send text, or use a Llama 4 checkpoint with its vision tower")
        if count > self.runtime.max_images:
            raise MoestreamError(f"{count} images in the conversation, more than --max-images {self.runtime.max_images}: "
                                 "start a new conversation (or raise --max-images)")
        if count and (self.tokenizer is not None and self.tokenizer.token_id(PATCH) != self.vision.config.image_token_id):
            raise MoestreamError(f"{self.runtime.model}/tokenizer.json has no {PATCH} token of id "
                                 f"{self.vision.config.image_token_id} (config.json's image_token_index), so images cannot "
                                 "be placed: re-download tokenizer.json")

    def encode_images(self, parts: list) -> list[EncodedImage]:
        """The images of content parts (model/images.py PART_FORMS), in order, each encoded once: one the
        conversation already holds (the same file bytes) is taken from it, not run through the tower again."""
        self.check_images(len(parts))
        kept = dict(self.conversation.images) if self.conversation is not None else {}
        out = []
        for i, part in enumerate(parts):
            data = image_bytes(part, f"image {i + 1}")
            key = image_key(data)
            if key not in kept:
                kind, source = image_source(part)
                with self.rec.span("encode image", image=i):
                    kept[key] = encode_image(self.vision, data, key, source if kind == "path" else f"image {i + 1}")
            out.append(kept[key])
        return out

    def encode_chat(self, messages) -> tuple[list[int], list[EncodedImage]]:
        """Token ids of a chat (list of {"role", "content"}: text, or a list of text and image parts) and
        its images, encoded, in order."""
        if self.tokenizer is None:
            raise MoestreamError(f"{self.runtime.model} has no tokenizer.json: pass token ids to generate_ids()")
        messages = list(messages)
        parts = chat_parts(messages)[1]
        if not parts:
            return self.tokenizer.encode_chat(messages), []
        encoded = self.encode_images(parts)
        ids = self.tokenizer.encode_chat(messages, aspect_ratios=[im.aspect_ratio for im in encoded],
                                         patches_per_tile=self.vision.config.tokens_per_tile)
        return ids, encoded

    def image_rows(self, ids: list[int], images: list[EncodedImage]) -> torch.Tensor | None:
        """The embeddings of every <|patch|> token of ids, in order; each image's layout checked first."""
        if not images:
            return None
        self.check_images(len(images))
        patches, rows = ids.count(self.model.image_token_id), sum(im.tokens for im in images)
        if patches != rows:
            raise MoestreamError(f"the prompt has {patches} {PATCH} tokens where its {len(images)} images take {rows}: "
                                 f"remove {PATCH} from the text (each image writes its own)")
        return torch.cat([im.embeddings for im in images])

    # --- logits ------------------------------------------------------------------------------------
    def logits(self, ids, images=()) -> torch.Tensor:
        """[T, V] float32 logits of a fresh sequence, the whole prompt at once (in -ub micro-batches).
        images: the EncodedImages (encode_chat's) whose <|patch|> tokens ids hold, in order."""
        return self._fresh_logits(ids, self.runtime.ubatch, images)

    def decode_logits(self, ids, images=()) -> torch.Tensor:
        """The same logits as `logits`, fed one token at a time through a fresh KV cache."""
        return self._fresh_logits(ids, 1, images)

    def _fresh_logits(self, ids, step: int, images=()) -> torch.Tensor:
        ids = self._ids(ids)
        rows = self.image_rows(ids.tolist(), list(images))
        seq = self.new_sequence()
        try:
            return self.generator.forward(ids, seq.cache, step, images=rows).cpu()
        finally:
            self.drop(seq)

    # --- generation --------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams | None = None,
                     stream: Callable[[int], None] | None = None, stop_ids: set[int] | None = None,
                     images=()) -> list[int]:
        """Generate token ids after `prompt_ids` in the conversation; `stream(id)` is called for every
        new token (not for the stop token that ends the reply). images: the prompt's EncodedImages
        (encode_chat's), kept with the conversation for its later turns."""
        params = params or SamplingParams()
        if stop_ids is None:
            stop_ids = set() if params.ignore_eos else self.stop_ids
        if len(prompt_ids) >= self.ctx_size:
            raise ContextFull(len(prompt_ids), self.ctx_size)
        prompt_ids = self._ids(prompt_ids).tolist()
        images = list(images)
        self.image_rows(prompt_ids, images)  # checked before the conversation changes
        seq = self.conversation
        if seq is None or seq.reusable(prompt_ids, images) == 0:
            seq = self.conversation = self.new_sequence()
        seq.images = {im.key: im for im in images}  # the images of this prompt, for the turns that extend it
        seq.start_reply(params, stop_ids)
        self.turn = turn = TurnStats()
        budget = min(params.max_tokens, self.ctx_size - len(prompt_ids))
        try:
            return self.generator.generate(seq, prompt_ids, budget, stream, turn, images)
        finally:
            self.totals.prompt_tokens += turn.prompt_tokens
            self.totals.generated_tokens += turn.generated_tokens
            if seq.broken:  # a step failed inside the model: its cache may be half-written
                self.reset()

    def generate(self, prompt_or_messages, stream: Callable[[str], None] | None = None, **sampling) -> str:
        """Text after a prompt (str, completed as is) or a chat (list of {"role", "content"}); sampling
        keywords are SamplingParams' (max_tokens, temperature, top_p, top_k, repetition_penalty, seed,
        ignore_eos), checked as the flags are."""
        return self.complete(prompt_or_messages, SamplingParams.build(**sampling), stream)

    def complete(self, prompt_or_messages, params: SamplingParams, stream: Callable[[str], None] | None = None) -> str:
        """`generate` with the sampling settings in one object (what the CLI passes down)."""
        if self.tokenizer is None:
            raise MoestreamError(f"{self.runtime.model} has no tokenizer.json: pass token ids to generate_ids()")
        if isinstance(prompt_or_messages, str):
            ids, images = self.tokenizer.encode(prompt_or_messages), []
        else:
            ids, images = self.encode_chat(prompt_or_messages)
        text_of = self.tokenizer.stream_decoder()
        pieces: list[str] = []

        def on_token(token: int) -> None:
            piece = text_of(token)
            if piece:
                pieces.append(piece)
                if stream is not None:
                    stream(piece)

        self.generate_ids(ids, params, on_token, images=images)
        return "".join(pieces)

    # --- counters ----------------------------------------------------------------------------------
    def stats(self) -> Stats:
        """A snapshot of every counter (copies: reading them never disturbs the runtime)."""
        experts = self.experts.snapshot()
        kv = self.conversation.cache.snapshot() if self.conversation is not None else self.last_kv
        resident = self.model.resident_bytes + (self.vision.nbytes if self.vision is not None else 0)
        memory = MemoryStats(resident, experts.device_bytes, kv.device_bytes, self.plan.gpu_mem)
        return Stats(self.load_seconds, replace(self.turn), replace(self.totals), experts, kv, memory,
                     self.checkpoint.snapshot())

    def close(self) -> None:
        """Write the profile, finish in-flight copies, stop the copy worker, flush the routing trace,
        remove the KV file."""
        if self.profile is not None:
            if self.trace is not None:
                self.trace.flush()
            self.profile.write(self.stats(), self.facts())
            self.profile = None
        self.reset()
        self.model.graphs = None  # their memory pool goes with them
        self.experts.close()
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        if self.kv_disk is not None:  # it held a conversation: removed, not left behind
            self.kv_disk.close()
            self.kv_disk = None

    def facts(self) -> dict:
        """What a profile says about the run it measured."""
        return {"model": str(self.runtime.model), "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "runtime": self.runtime, "config": self.config}


def load(path: str | Path | None = None, **settings) -> LLM:
    """Load a Hugging Face Llama 4 checkpoint directory (None = the embedded default model).

    Settings (all optional) are RuntimeConfig's, each spelled as its flag without dashes: device,
    dtype, ctx_size, threads; gpu_mem, cpu_mem, expert_cache (sizes like "40GiB", "512MiB" or bytes),
    cpu_experts, cache_policy, cache_split, prefetch, cpu_moe, n_cpu_moe, expert_dir, repack,
    record_routing; kv_gpu_mem, kv_cpu_mem, kv_disk, ubatch, cache_type_k, cache_type_v, kv_block;
    vision (False = --no-vision), max_images; profile. Each is checked as its flag is (one
    MoestreamError line).
    """
    return LLM(RuntimeConfig.build(model=path, **settings))
