"""LLM: a loaded model with its tokenizer, KV cache and counters — the public Python API.

    llm = moestream.load()                  # the embedded default model
    llm.logits(ids)                         # whole prompt at once, fresh sequence -> [T, V]
    llm.decode_logits(ids)                  # one token at a time through the KV cache -> [T, V]
    llm.generate("To be, or", max_tokens=50, stream=print)

Chat turns that extend the previous conversation reuse its KV cache: only the new tokens are
prefilled. A step that fails or is interrupted (Ctrl+C) drops the cache, never a half-written one.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from .cache.kv import KVCache
from .config import RuntimeConfig, resolve_device, resolve_dtype
from .errors import MoestreamError
from .model.checkpoint import Checkpoint
from .model.llama4 import Llama4
from .model.sampling import SamplingParams, sample
from .model.tokenizer import Tokenizer
from .offload.store import ResidentExperts
from .stats import Stats


class LLM:
    def __init__(self, runtime: RuntimeConfig):
        t0 = time.perf_counter()
        self.runtime = runtime
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        self.device = resolve_device(runtime.device)
        self.checkpoint = Checkpoint(runtime.model)
        self.config = self.checkpoint.config
        self.dtype = resolve_dtype(runtime.dtype, self.device, self.checkpoint.dtype)
        max_ctx = self.config.max_position_embeddings
        if runtime.ctx_size > max_ctx:
            raise MoestreamError(
                f"context size {runtime.ctx_size} exceeds this model's maximum of {max_ctx} tokens: use -c {max_ctx} or less"
            )
        self.ctx_size = runtime.ctx_size or max_ctx
        self.experts = ResidentExperts(self.checkpoint, self.device, self.dtype)
        self.model = Llama4.from_checkpoint(self.checkpoint, self.experts, self.device, self.dtype)
        has_tokenizer = (Path(runtime.model) / "tokenizer.json").exists()
        self.tokenizer = Tokenizer(runtime.model, self.config.eos_token_ids) if has_tokenizer else None
        self.stop_ids = self.tokenizer.stop_ids if self.tokenizer else set(self.config.eos_token_ids)
        self._cache: KVCache | None = None
        self._cache_ids: list[int] = []  # the tokens whose keys/values the cache holds
        self._stats = Stats(load_seconds=time.perf_counter() - t0)

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

    def logits(self, ids) -> torch.Tensor:
        """[T, V] float32 logits of a fresh sequence, the whole prompt in one step."""
        return self.model.forward(self._ids(ids)).cpu()

    def decode_logits(self, ids) -> torch.Tensor:
        """The same logits as `logits`, fed one token at a time through a fresh KV cache."""
        ids = self._ids(ids)
        cache = KVCache(self.config, self.device, self.dtype)
        return torch.cat([self.model.forward(ids[i:i + 1], cache) for i in range(ids.numel())]).cpu()

    # --- generation ------------------------------------------------------------------------------
    def _step(self, ids: list[int], last_only: bool = True) -> torch.Tensor:
        """Feed `ids` after the cached tokens; on any failure drop the cache (it may be half-written)."""
        try:
            logits = self.model.forward(torch.tensor(ids, dtype=torch.long), self._cache, last_only=last_only)
        except BaseException:
            self.reset()
            raise
        self._cache_ids.extend(ids)
        return logits[-1]

    def reset(self) -> None:
        """Forget the cached conversation (the next call prefills from scratch)."""
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
        prompt_ids = self._ids(prompt_ids).tolist()
        if len(prompt_ids) >= self.ctx_size:
            raise MoestreamError(
                f"the prompt is {len(prompt_ids)} tokens and the context holds {self.ctx_size}: "
                "start a new conversation (/clear) or raise -c"
            )
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        n = len(self._cache_ids)
        if self._cache is None or n >= len(prompt_ids) or prompt_ids[:n] != self._cache_ids:
            self._cache, self._cache_ids, n = KVCache(self.config, self.device, self.dtype), [], 0
        s = self._stats
        s.prompt_tokens, s.generated_tokens, s.generation_seconds = len(prompt_ids) - n, 0, 0.0

        t0 = time.perf_counter()
        logits = self._step(prompt_ids[n:])
        self._sync()
        s.prompt_seconds = time.perf_counter() - t0
        s.total_prompt_tokens += s.prompt_tokens

        out: list[int] = []
        previous = torch.tensor(prompt_ids, dtype=torch.long, device=logits.device)
        budget = min(params.max_tokens, self.ctx_size - len(prompt_ids))
        t0 = time.perf_counter()
        try:
            while len(out) < budget:
                token = sample(logits, params, previous, generator)
                out.append(token)
                s.generated_tokens += 1
                s.total_generated_tokens += 1
                if token in stop_ids:
                    break
                if stream is not None:
                    stream(token)
                if len(out) == budget:
                    break
                previous = torch.cat([previous, previous.new_tensor([token])])
                logits = self._step([token])
        finally:
            self._sync()
            s.generation_seconds = time.perf_counter() - t0
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
        return replace(
            self._stats,
            expert_gets=self.experts.gets,
            expert_reads=self.checkpoint.expert_reads,
            expert_bytes_read=self.checkpoint.expert_bytes_read,
            experts_resident=len(self.experts.experts),
            resident_bytes=self.model.resident_bytes,
            expert_bytes=self.experts.nbytes,
            kv_bytes=self._cache.nbytes if self._cache is not None else 0,
            kv_tokens=len(self._cache_ids),
        )


def load(path: str | Path | None = None, device: str = "auto", dtype: str = "auto", ctx_size: int | str = 0, threads: int = 0) -> LLM:
    """Load a Hugging Face Llama 4 checkpoint directory (None = the embedded default model)."""
    return LLM(RuntimeConfig.build(path, device, dtype, ctx_size, threads))
