"""Continuous batching: many requests share the model, each expert fetched once per step for all of them.

    batcher = Batcher(llm.generator, llm.request_sequence, llm.ctx_size, max_batch=8, max_queue=64)
    batcher.submit(Request(prompt_ids, params, stop_ids, on_token, on_done))
    ...
    batcher.close()

One worker thread makes every torch call. Between steps it answers queued calls (a stats snapshot),
drops cancelled requests (their KV cache closed at once), and admits waiting requests up to
`max_batch`, each with a Sequence of its own. Then a step: one -ub micro-batch of the oldest request
still prefilling, and one Generator.decode_batch over every request that has a token to feed, so a
long prompt never freezes the running replies, and each MoE layer asks for the union of the step's
experts once. Every request samples with its own settings and seeded generator, and the batched
step computes each sequence as it would alone: a reply is the same, token for token, whatever else
runs beside it.

Tokenizer-free: text (stop strings, incremental decoding) is the caller's business. Callbacks run on
the worker thread and must only hand the value on (to an event loop's queue, say).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import MoestreamError
from ..model.sampling import SamplingParams
from .generate import Generator, Sequence, sample

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFull(MoestreamError):
    """Every batch slot and queue place is taken: the caller should try again shortly."""


@dataclass(eq=False)
class Request:
    """One reply to generate. on_token(id) gets each new token (not the stop token that ends it);
    on_done(reason, error) is called once: "stop" (a stop token), "length" (max_tokens or the
    context), "cancelled", or "error" (with the exception; the model's step failed)."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    on_token: Callable[[int], None]
    on_done: Callable[[str, BaseException | None], None]
    images: torch.Tensor | None = None  # embeddings [P, D] of the prompt's P <|patch|> tokens, in order
    cancelled: bool = False
    # the worker's own state
    seq: Sequence | None = None
    slot: int = -1
    fed: int = 0  # prompt tokens prefilled so far
    image_rows: int = 0  # image embedding rows prefilled so far
    budget: int = 0  # tokens it may sample: max_tokens, or what the context leaves
    generated: int = 0
    pending: int | None = None  # the sampled token the next decode step feeds
    done: bool = False


@dataclass
class BatchStats:
    """The batcher's counters: what /metrics shows beside llm.stats()."""

    running: int = 0  # requests holding a sequence (prefilling or decoding)
    queued: int = 0
    requests: int = 0  # admitted since start
    finished: dict = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens fed by decode steps (decode_tokens / decode_steps = the mean batch)
    # the running sequences' KV caches, summed (tokens per tier: of one global layer, as KVStats)
    kv_tokens_device: int = 0
    kv_tokens_host: int = 0
    kv_tokens_disk: int = 0
    kv_device_bytes: int = 0
    kv_host_bytes: int = 0


class Batcher:
    """Holds up to max_batch running requests and max_queue waiting ones; runs them on one thread.

    new_sequence(slot) makes a fresh Sequence for a request (LLM.request_sequence); slot (0 to
    max_batch-1) is the request's place in the batch, which no other running request holds."""

    def __init__(self, generator: Generator, new_sequence: Callable[[int], Sequence], ctx_size: int,
                 max_batch: int = 8, max_queue: int = 64):
        self.generator, self.new_sequence, self.ctx_size = generator, new_sequence, ctx_size
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.calls: deque[tuple[Callable, Future]] = deque()
        self.free_slots = list(range(max_batch))
        self.stats = BatchStats()
        self.closing = False
        self.no_history = torch.empty(0, dtype=torch.long)  # what sampling reads without a repeat penalty
        self.thread = threading.Thread(target=self._run, name="moestream-batcher", daemon=True)
        self.thread.start()

    # --- what other threads call -------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when the batch and the queue are full. The prompt must leave
        room for one token (len(prompt) < ctx_size): the caller says so in its own words first."""
        if not request.prompt or len(request.prompt) >= self.ctx_size:
            raise MoestreamError(f"a prompt needs 1 to {self.ctx_size - 1} tokens, not {len(request.prompt)}")
        with self.cond:
            if self.closing:
                raise QueueFull("the server is shutting down")
            if len(self.running) + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and {self.max_queue} waiting: try again shortly")
            self.waiting.append(request)
            self.cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request: dropped, its KV cache closed, at the next step boundary (or now, if queued)."""
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def call(self, fn: Callable):
        """Run fn() on the worker between steps (where torch may be touched); a Future of its result."""
        future: Future = Future()
        with self.cond:
            if self.closing:
                future.set_exception(MoestreamError("the server is shutting down"))
                return future
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def snapshot(self) -> BatchStats:
        """The counters, with the running sequences' KV. Call it on the worker (through `call`)."""
        s = self.stats
        s.running, s.queued = len(self.running), len(self.waiting)
        kv = [r.seq.cache.snapshot() for r in self.running if r.seq is not None]
        s.kv_tokens_device = sum(k.tokens_device for k in kv)
        s.kv_tokens_host = sum(k.tokens_host for k in kv)
        s.kv_tokens_disk = sum(k.tokens_disk for k in kv)
        s.kv_device_bytes = sum(k.device_bytes for k in kv)
        s.kv_host_bytes = sum(k.host_bytes for k in kv)
        return BatchStats(**{**vars(s), "finished": dict(s.finished)})

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        """Cancel everything, let the worker close every cache, and stop it."""
        with self.cond:
            self.closing = True
            for r in self.waiting:
                r.cancelled = True
            for r in self.running:
                r.cancelled = True
            self.cond.notify()
        self.thread.join()

    # --- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.closing or self.calls or self.waiting or self.running):
                    self.cond.wait()
                calls, self.calls = list(self.calls), deque()
                dropped = [r for r in self.running if r.cancelled]
                self.running = [r for r in self.running if not r.cancelled]
                while self.waiting and (self.waiting[0].cancelled or len(self.running) < self.max_batch):
                    r = self.waiting.popleft()
                    if r.cancelled:
                        dropped.append(r)
                    else:
                        self.running.append(r)
                closing = self.closing
            for r in dropped:
                self._finish(r, "cancelled")
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except Exception as e:
                    future.set_exception(e)
            if closing:
                with self.cond:
                    for fn, future in self.calls:
                        future.set_exception(MoestreamError("the server is shutting down"))
                    self.calls.clear()
                return
            for r in [r for r in self.running if r.seq is None]:
                self._admit(r)
            try:
                self._step()
            except Exception as e:  # a bug here fails the running requests, never the worker
                for r in list(self.running):
                    self._finish(r, "error", e)

    def _admit(self, r: Request) -> None:
        r.slot = self.free_slots.pop(0)
        r.budget = min(r.params.max_tokens, self.ctx_size - len(r.prompt))
        self.stats.requests += 1
        try:
            r.seq = self.new_sequence(r.slot)
        except Exception as e:  # the KV disk file could not be made, say: this request fails, not the server
            self._finish(r, "error", e)
            return
        r.seq.start_reply(r.params, r.stop_ids)

    def _step(self) -> None:
        """One -ub micro-batch of the oldest request still prefilling, then one decode step of the rest."""
        prefilling = next((r for r in self.running if r.fed < len(r.prompt)), None)
        if prefilling is not None:
            self._prefill(prefilling)
        decoding = [r for r in self.running if r.pending is not None]
        if decoding:
            self._decode(decoding)

    def _prefill(self, r: Request) -> None:
        chunk = r.prompt[r.fed:r.fed + self.generator.ubatch]
        rows = None
        if r.images is not None:  # this micro-batch's own <|patch|> rows, as Generator.forward gives them
            k = chunk.count(self.generator.model.image_token_id)
            rows, r.image_rows = (r.images[r.image_rows:r.image_rows + k] if k else None), r.image_rows + k
        try:
            logits = self.generator.step(r.seq, chunk, rows)
        except Exception as e:
            self._finish(r, "error", e)
            return
        r.fed += len(chunk)
        self.stats.prefill_steps += 1
        self.stats.prompt_tokens += len(chunk)
        if r.fed == len(r.prompt):
            self._sampled(r, self._sample(r, logits))

    def _decode(self, batch: list[Request]) -> None:
        try:
            logits = self.generator.decode_batch([r.seq for r in batch], [r.pending for r in batch])
        except Exception as e:  # every sequence of the step may be half-written
            for r in batch:
                self._finish(r, "error", e)
            return
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(batch)
        for i, r in enumerate(batch):
            self._sampled(r, self._sample(r, logits[i]))

    def _sample(self, r: Request, logits: torch.Tensor) -> int:
        """As Generator.decode_n samples: the history is every token the sequence holds."""
        previous = self.no_history
        if r.params.repetition_penalty != 1.0:
            previous = torch.tensor(r.seq.ids, dtype=torch.long, device=logits.device)
        return sample(logits, r.params, previous, r.seq.generator)

    def _sampled(self, r: Request, token: int) -> None:
        """decode_n's stop rules: a stop token ends the reply unsent; max_tokens counts it."""
        r.generated += 1
        r.pending = None
        self.stats.generated_tokens += 1
        if token in r.stop_ids:
            self._finish(r, "stop")
            return
        self._callback(r.on_token, token)
        if r.generated >= r.budget:
            self._finish(r, "length")
            return
        r.pending = token

    def _finish(self, r: Request, reason: str, error: BaseException | None = None) -> None:
        if r.done:
            return
        r.done, r.pending = True, None
        if r.seq is not None:
            r.seq.cache.close()
            r.seq = None
        if r.slot >= 0:
            self.free_slots.append(r.slot)
            self.free_slots.sort()
            r.slot = -1
        with self.cond:
            if r in self.running:
                self.running.remove(r)
        self.stats.finished[reason] += 1
        self._callback(r.on_done, reason, error)

    @staticmethod
    def _callback(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # a caller's bug must not stop every other request
            pass
