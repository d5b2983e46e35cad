"""LLM: a loaded model with its tokenizer, KV cache and counters — the public Python API.

    llm = moestream.load()                  # the embedded default model
    llm.logits(ids)                         # whole prompt at once, fresh sequence -> [T, V]
    llm.decode_logits(ids)                  # one token at a time through the KV cache -> [T, V]
    llm.generate("To be, or", max_tokens=50, stream=print)

Chat turns that extend the previous conversation reuse its KV cache: only the new tokens are
prefilled. A step that fails or is interrupted (Ctrl+C) drops the cache, never a half-written one.
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .cache.kv import KVCache
from .config import RuntimeConfig, resolve_device, resolve_dtype
from .errors import ContextFull, MoestreamError
from .model.checkpoint import Checkpoint
from .model.llama4 import Llama4
from .model.sampling import SamplingParams, sample
from .model.tokenizer import Tokenizer
from .offload.store import ResidentExperts
from .scheduler.plan import Plan, make_plan
from .profiling.recorder import NULL
from .stats import Stats


class LLM:
    def __init__(self, runtime: RuntimeConfig, progress: Callable[[int, int], None] | None = None, checkpoint=None):
        """progress(bytes_done_now, bytes_total) is called while experts are placed in host RAM / on disk;
        checkpoint: read weights from this object instead of runtime.model (a SyntheticCheckpoint)."""
        t0 = time.perf_counter()
        self.runtime = runtime
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        self.device = resolve_device(runtime.device)
        self.checkpoint = checkpoint or Checkpoint(runtime.model)
        self.config = self.checkpoint.config
        self.dtype = resolve_dtype(runtime.dtype, self.device, self.checkpoint.dtype)
        max_ctx = self.config.max_position_embeddings
        if runtime.ctx_size > max_ctx:
            raise MoestreamError(
                f"context size {runtime.ctx_size} exceeds this model's maximum of {max_ctx} tokens: use -c {max_ctx} or less"
            )
        self.plan: Plan = make_plan(self.config, runtime, self.device, self.dtype)
        self.ctx_size = self.plan.ctx_size
        self.kv_disk = None  # opened and locked for the life of the LLM: an unwritable, foreign or busy
        if self.plan.kv.disk is not None:  # --kv-disk fails now, not mid-conversation
            from .cache.kv import KVDisk

            self.kv_disk = KVDisk(self.plan.kv.disk)
        self.model = Llama4.from_checkpoint(self.checkpoint, None, self.device, self.dtype)
        self.experts = self._place_experts(progress)
        self.model.experts = self.experts
        has_tokenizer = (Path(runtime.model) / "tokenizer.json").exists()
        self.tokenizer = Tokenizer(runtime.model, self.config.eos_token_ids) if has_tokenizer else None
        self.stop_ids = self.tokenizer.stop_ids if self.tokenizer else set(self.config.eos_token_ids)
        self._cache: KVCache | None = None
        self._kv_counters = None  # of the last cache used (for stats after logits() / reset())
        self._cache_ids: list[int] = []  # the tokens whose keys/values the cache holds
        self._observe(runtime)
        # What exists now (torch's ~170k module objects, the model) lives on: freezing it keeps Python's
        # full collections, which would scan it all (~90 ms), out of token steps. Unfreezing first lets
        # this collection reclaim whatever an earlier, dropped model left in reference cycles.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._stats = Stats(load_seconds=time.perf_counter() - t0)

    def _observe(self, runtime: RuntimeConfig) -> None:
        """Routing trace (--record-routing) and profiling (--profile), when asked for."""
        self.routing_trace = None
        self.rec = NULL  # the profiling Recorder (profiling/recorder.py); NULL = off
        self.profile = None
        if runtime.profile is not None:
            from .profiling.report import Profile

            self.profile = Profile(self, runtime.profile)  # installs a Recorder in every part
            if runtime.record_routing is None:
                runtime = self.runtime = replace(runtime, record_routing=runtime.profile / "routing.jsonl")
        if runtime.record_routing is not None:
            from .scheduler.routing import RoutingRecorder

            c = self.config
            self.routing_trace = RoutingRecorder(runtime.record_routing, {
                "model": str(runtime.model), "moe_layers": c.moe_layers, "num_experts": c.num_local_experts,
                "top_k": c.num_experts_per_tok, "expert_bytes": self.plan.expert_bytes})
            self.model.on_route = self.routing_trace.hook
            if getattr(self.experts, "prefetcher", None) is not None:
                self.experts.route_log = self.routing_trace.pending  # the guesses go right after their records

    def _place_experts(self, progress=None):
        """Every expert resident (read on first use), or the offload engine the plan calls for."""
        if self.plan.resident:
            return ResidentExperts(self.checkpoint, self.device, self.dtype)
        from .cache.experts import ExpertCache
        from .offload.engine import OffloadedExperts
        from .offload.store import ExpertStore
        from .offload.transfer import TransferEngine
        from .scheduler.cost import CostModel
        from .scheduler.prefetch import Prefetcher

        c, rt, plan = self.config, self.runtime, self.plan
        gpu_layers = [layer for layer in c.moe_layers if layer not in plan.cpu_layers]
        # CPU-run layers first, so a short --cpu-mem keeps the experts the CPU reads in RAM
        keys = [(layer, e) for layer in sorted(plan.cpu_layers) + gpu_layers for e in range(c.num_local_experts)]
        total = len(keys) * plan.expert_bytes
        store = ExpertStore(self.checkpoint, keys, plan.host_experts, self.dtype, pin=self.device.type == "cuda",
                            expert_dir=rt.expert_dir, repack=rt.repack,
                            progress=(lambda n: progress(n, total)) if progress else None)
        cache = ExpertCache(plan.cache_slots, c.hidden_size, c.intermediate_size, self.device, self.dtype,
                            rt.cache_policy, rt.cache_split, gpu_layers)
        prefetcher = None
        if rt.prefetch > 0 and cache.slots > 0:
            routers = {b.index: b.ffn.router for b in self.model.blocks if b.index in gpu_layers}
            prefetcher = Prefetcher(c.moe_layers, routers, c.num_experts_per_tok, rt.prefetch)
        cost = None
        if rt.cpu_experts == "auto" and cache.slots > 0 and store.host_keys:
            cost = CostModel.calibrate(store.host_experts[0], cache.pool[0], cache.experts[0], self.device)
        return OffloadedExperts(store, cache, TransferEngine(store, cache, self.device), prefetcher, cost,
                                rt.cpu_experts, plan.cpu_layers)

    @property
    def notes(self) -> list[str]:
        return self.checkpoint.notes

    # --- logits ----------------------------------------------------------------------------------
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

    def new_cache(self) -> KVCache:
        """A fresh KV cache laid out as planned; the one held for the conversation is dropped first
        (it holds the KV disk file, which the new one starts empty)."""
        self.reset()
        cache = KVCache(self.config, self.device, self.dtype, self.plan.kv, self.kv_disk)
        cache.set_recorder(self.rec)
        return cache

    def _forward(self, ids: torch.Tensor, cache: KVCache, step: int, last_only: bool = False) -> torch.Tensor:
        """Feed ids through the cache `step` tokens at a time (prefill micro-batches, -ub)."""
        pieces, trace = [], self.routing_trace
        for i in range(0, ids.numel(), step):
            pieces.append(self.model.forward(ids[i:i + step], cache, last_only=last_only and i + step >= ids.numel()))
            if trace is not None and len(trace.pending) >= trace.LIMIT:  # bounded: its tensors may be on the GPU
                trace.flush()
        return pieces[-1] if last_only else torch.cat(pieces)

    def logits(self, ids) -> torch.Tensor:
        """[T, V] float32 logits of a fresh sequence, the whole prompt at once (in -ub micro-batches)."""
        return self._fresh_logits(ids, self.runtime.ubatch)

    def decode_logits(self, ids) -> torch.Tensor:
        """The same logits as `logits`, fed one token at a time through a fresh KV cache."""
        return self._fresh_logits(ids, 1)

    def _fresh_logits(self, ids, step: int) -> torch.Tensor:
        ids = self._ids(ids)
        cache = self.new_cache()
        try:
            return self._forward(ids, cache, step).cpu()
        finally:
            self._kv_counters = cache.counters
            cache.close()

    # --- generation ------------------------------------------------------------------------------
    def _step(self, ids: list[int], last_only: bool = True) -> torch.Tensor:
        """Feed `ids` after the cached tokens; on any failure drop the cache (it may be half-written)."""
        try:
            logits = self._forward(torch.tensor(ids, dtype=torch.long), self._cache, self.runtime.ubatch, last_only)
        except BaseException:
            self.reset()
            raise
        self._cache_ids.extend(ids)
        return logits[-1]

    def reset(self) -> None:
        """Forget the cached conversation (the next call prefills from scratch)."""
        if self._cache is not None:
            self._kv_counters = self._cache.counters
            self._cache.close()
        self._cache, self._cache_ids = None, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate_ids(
        self, prompt_ids: list[int], params: SamplingParams | None = None,
        stream: Callable[[int], None] | None = None, stop_ids: set[int] | None = None,
    ) -> list[int]:
        """Generate token ids after `prompt_ids`; `stream(id)` is called for every new token."""
        params = params or SamplingParams()
        if stop_ids is None:
            stop_ids = set() if params.ignore_eos else self.stop_ids
        if len(prompt_ids) >= self.ctx_size:
            raise ContextFull(len(prompt_ids), self.ctx_size)
        prompt_ids = self._ids(prompt_ids).tolist()
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        n = len(self._cache_ids)
        if self._cache is None or n >= len(prompt_ids) or prompt_ids[:n] != self._cache_ids:
            self._cache, n = self.new_cache(), 0
        s = self._stats
        s.prompt_tokens, s.generated_tokens, s.generation_seconds = len(prompt_ids) - n, 0, 0.0

        rec = self.rec
        t0 = time.perf_counter()
        with rec.span("prefill", tokens=s.prompt_tokens):
            logits = self._step(prompt_ids[n:])
            self._sync()
        s.prompt_seconds = time.perf_counter() - t0
        s.total_prompt_tokens += s.prompt_tokens
        if self.profile is not None:
            self.profile.step("prefill", s.prompt_tokens, s.prompt_seconds)

        out: list[int] = []
        previous = torch.tensor(prompt_ids, dtype=torch.long, device=logits.device)
        budget = min(params.max_tokens, self.ctx_size - len(prompt_ids))
        t0 = time.perf_counter()
        try:
            while len(out) < budget:
                t_token = time.perf_counter()
                start = rec.mark()
                token = sample(logits, params, previous, generator)
                rec.add(("sample", start, rec.mark(), (-1, -1, "sampling")))
                out.append(token)
                s.generated_tokens += 1
                s.total_generated_tokens += 1
                if token in stop_ids:
                    break
                if stream is not None:
                    stream(token)
                if len(out) == budget:
                    break
                if params.repetition_penalty != 1.0:  # the only reader of the history
                    previous = torch.cat([previous, previous.new_tensor([token])])
                logits = self._step([token])
                if rec.enabled:
                    self._sync()
                    rec.add(("token", start, rec.mark(), -1))
                    self.profile.step("decode", 1, time.perf_counter() - t_token)
        finally:
            self._sync()
            s.generation_seconds = time.perf_counter() - t0
            if self.routing_trace is not None:  # format the reply's routing now, while nobody waits on a token
                self.routing_trace.flush()
        return out

    def generate(
        self, prompt_or_messages, max_tokens: int = 256, temperature: float = 0.8, top_p: float = 0.95,
        top_k: int = 40, repetition_penalty: float = 1.0, seed: int | None = None,
        stream: Callable[[str], None] | None = None, ignore_eos: bool = False,
    ) -> str:
        """Text after a prompt (str, completed as is) or a chat (list of {"role", "content"})."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, max_tokens, ignore_eos)
        return self.complete(prompt_or_messages, params, stream)

    def complete(self, prompt_or_messages, params: SamplingParams, stream: Callable[[str], None] | None = None) -> str:
        """`generate` with the sampling settings in one object (what the CLI passes down)."""
        if self.tokenizer is None:
            raise MoestreamError(f"{self.runtime.model} has no tokenizer.json: pass token ids to generate_ids()")
        if isinstance(prompt_or_messages, str):
            ids = self.tokenizer.encode(prompt_or_messages)
        else:
            ids = self.tokenizer.encode_chat(list(prompt_or_messages))
        text_of = self.tokenizer.stream_decoder()
        pieces: list[str] = []

        def on_token(token: int) -> None:
            piece = text_of(token)
            if piece:
                pieces.append(piece)
                if stream is not None:
                    stream(piece)

        self.generate_ids(ids, params, on_token)
        return "".join(pieces)

    # --- counters --------------------------------------------------------------------------------
    def stats(self) -> Stats:
        """A snapshot of every counter (a copy: reading it never disturbs the runtime)."""
        kv = self._cache.nbytes if self._cache is not None else 0
        snap = replace(
            self._stats,
            expert_gets=self.experts.gets,
            expert_reads=self.checkpoint.expert_reads,
            expert_bytes_read=self.checkpoint.expert_bytes_read,
            resident_bytes=self.model.resident_bytes,
            kv_bytes=kv,
            kv_tokens=len(self._cache_ids),
            gpu_mem=self.plan.gpu_mem,
        )
        ex = self.experts
        if isinstance(ex, ResidentExperts):
            snap.experts_resident = len(ex.experts)
            snap.expert_bytes = ex.nbytes
        else:
            counters = ex.counters
            snap = replace(
                snap, experts_resident=len(ex.cache.slot_of), expert_bytes=ex.cache.nbytes, cache_slots=ex.cache.slots,
                expert_hits=counters.hits, expert_misses=counters.misses, expert_fetches=counters.fetches,
                prefetch_issued=counters.prefetch_issued, prefetch_hits=counters.prefetch_hits,
                prefetch_wasted=counters.prefetch_wasted, cpu_experts=counters.cpu_experts,
                cpu_expert_seconds=counters.cpu_seconds,
                stall_seconds=counters.stall_seconds, bytes_host_to_device=ex.transfer.bytes_host_to_device,
                bytes_disk_to_host=ex.transfer.bytes_disk_to_host, host_expert_bytes=ex.store.host_bytes,
                disk_experts=len(ex.store.disk_keys),
                prefetch_recall={d: v["recall"] for d, v in ex.prefetcher.summary().items()} if ex.prefetcher else {},
                prefetch_precision={d: v["precision"] for d, v in ex.prefetcher.summary().items()} if ex.prefetcher else {},
            )
        cache = self._cache
        counters = cache.counters if cache is not None else self._kv_counters
        if cache is not None:
            tiers = cache.tokens_by_tier()
            snap.kv_tokens_device, snap.kv_tokens_host, snap.kv_tokens_disk = tiers["device"], tiers["host"], tiers["disk"]
            snap.kv_host_bytes = cache.host_bytes
        if counters is not None:
            snap.kv_spilled_to_host_bytes = counters.spilled_to_host_bytes
            snap.kv_spilled_to_disk_bytes = counters.spilled_to_disk_bytes
            snap.kv_fetched_to_device_bytes = counters.fetched_to_device_bytes
            snap.kv_read_from_disk_bytes = counters.read_from_disk_bytes
            snap.kv_attention_seconds = dict(counters.seconds)
        snap.device_bytes = snap.resident_bytes + snap.expert_bytes + kv
        return snap

    def close(self) -> None:
        """Write the profile, finish in-flight copies, stop the copy worker, flush the routing trace,
        close the KV file."""
        if self.profile is not None:
            self.profile.write()
            self.profile = None
        self.reset()
        if hasattr(self.experts, "close"):
            self.experts.close()
        if self.routing_trace is not None:
            self.routing_trace.close()
            self.routing_trace = None
        if self.kv_disk is not None:  # it held a conversation: removed, not left behind
            self.kv_disk.close()
            self.kv_disk = None


def load(path: str | Path | None = None, device: str = "auto", dtype: str = "auto", ctx_size: int | str = 0,
         threads: int = 0, **offload) -> LLM:
    """Load a Hugging Face Llama 4 checkpoint directory (None = the embedded default model).

    Offload settings (all optional) are RuntimeConfig's: gpu_mem, cpu_mem, expert_cache (sizes like
    "40GiB", "512MiB" or bytes), cpu_experts, cache_policy, cache_split, prefetch, cpu_moe,
    n_cpu_moe, expert_dir, repack, record_routing.
    """
    return LLM(RuntimeConfig.build(path, device, dtype, ctx_size, threads, **offload))
