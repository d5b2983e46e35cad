"""Generation, in the manner of gpt-fast's generate.py: prefill, decode one token, decode n tokens.

A Sequence is what one conversation needs between steps — its KV cache, the tokens that cache
holds, how it samples, where it stops — so the runtime can hold one (the chat) or many (a server)
and the model only ever sees (ids, cache) per step. A step that fails or is interrupted inside the
model marks its sequence broken (its cache may be half-written); whoever holds it drops it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import MoestreamError
from ..model.sampling import MIN_TEMPERATURE, SamplingParams
from ..profiling.recorder import NULL

if TYPE_CHECKING:
    from ..model.vision import EncodedImage


# --- choosing the next token ---------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL/transformers rule: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    seen = logits.gather(0, previous)
    logits = logits.clone()
    logits.scatter_(0, previous, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, previous: torch.Tensor, generator: torch.Generator | None) -> int:
    """Choose one token id from logits [V] (float32)."""
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.temperature <= 0:
        return int(logits.argmax())
    # a tiny temperature is near-greedy, not a division that overflows float32 into inf - inf = NaN
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    k = params.top_k if 0 < params.top_k < logits.shape[0] else logits.shape[0]
    # the k best, already sorted: top-p then only looks at them (cheap, whatever the vocabulary)
    top_logits, top_ids = torch.topk(logits, k)
    probs = torch.softmax(top_logits, dim=-1)
    if params.top_p < 1.0:
        # drop a token when the tokens ranked above it already cover top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs > params.top_p, 0.0)
    return int(top_ids[torch.multinomial(probs.cpu(), 1, generator=generator)])


# --- one sequence ----------------------------------------------------------------------------------
class Sequence:
    """One conversation's state between steps.

    cache: its KV cache (cache/kv.py); ids: the tokens whose keys and values the cache holds, in order.
    Sampling settings, the random generator and the stop tokens belong to a reply (`start_reply`).
    images: the conversation's encoded images (model/vision.py EncodedImage) by key, so a later turn
    finds them instead of running the tower again; image_keys: those the cache holds, in prompt order."""

    def __init__(self, cache):
        self.cache = cache
        self.ids: list[int] = []
        self.images: dict[str, EncodedImage] = {}
        self.image_keys: list[str] = []
        self.broken = False  # a step failed inside the model: the cache may be half-written
        self.params = SamplingParams()
        self.stop_ids: set[int] = set()
        self.generator: torch.Generator | None = None

    def reusable(self, prompt_ids: list[int], images=()) -> int:
        """How many leading tokens of `prompt_ids` the cache already holds (a chat turn that extends the
        conversation reuses them; 0 means start again). At least one token is always fed. With images
        (the prompt's EncodedImages, in order) the cache's must be the first of them: the same <|patch|>
        ids may stand for another picture."""
        n = len(self.ids)
        if self.broken or n >= len(prompt_ids) or prompt_ids[:n] != self.ids:
            return 0
        if self.image_keys and [im.key for im in images[:len(self.image_keys)]] != self.image_keys:
            return 0
        return n

    def start_reply(self, params: SamplingParams, stop_ids: set[int]) -> None:
        self.params, self.stop_ids = params, stop_ids
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None


@dataclass
class TurnStats:
    """The last reply of a sequence: what the chat's status line and llama.cpp's timing lines show."""

    prompt_tokens: int = 0  # tokens actually prefilled (a reused prefix is not counted)
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


# --- the loop ----------------------------------------------------------------------------------------
class Generator:
    """Runs sequences through the model: micro-batched prefill, one-token steps, sampling, stop rules.

    ubatch: prefill micro-batch (-ub); rec: the profiling recorder; trace: the routing trace (its
    buffer is bounded here and formatted after each reply); profile: takes one record per step."""

    def __init__(self, model, ubatch: int, rec=NULL, trace=None, profile=None):
        self.model, self.ubatch = model, ubatch
        self.rec, self.trace, self.profile = rec, trace, profile
        self.cuda = model.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.model.device)

    def forward(self, ids: torch.Tensor, cache, step: int, last_only: bool = False,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ids through the cache `step` tokens at a time: logits of every token, or of the last.
        images: the embeddings [P, D] of the P <|patch|> tokens of ids, in order; each micro-batch gets
        the rows of its own patch tokens (an offset runs along)."""
        pieces, trace = [], self.trace
        if images is not None:
            patches, at = ids == self.model.image_token_id, 0
            if int(patches.sum()) != images.shape[0]:
                raise MoestreamError(f"the prompt has {int(patches.sum())} <|patch|> tokens for {images.shape[0]} "
                                     "image embeddings: give each image its own token layout (images.image_token_text)")
        for i in range(0, ids.numel(), step):
            rows = None
            if images is not None:
                k = int(patches[i:i + step].sum())
                rows, at = (images[at:at + k] if k else None), at + k
            pieces.append(self.model.forward(ids[i:i + step], cache, last_only=last_only and i + step >= ids.numel(),
                                             images=rows))
            if trace is not None and trace.full:  # bounded: its tensors may be on the GPU
                trace.flush()
        return pieces[-1] if last_only else torch.cat(pieces)

    def step(self, seq: Sequence, ids: list[int], images: torch.Tensor | None = None) -> torch.Tensor:
        """Feed `ids` after the tokens the sequence holds; the logits [V] of the last one."""
        try:
            logits = self.forward(torch.tensor(ids, dtype=torch.long), seq.cache, self.ubatch, last_only=True,
                                  images=images)
        except BaseException:
            seq.broken = True
            raise
        seq.ids.extend(ids)
        return logits[-1]

    def decode_batch(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """One token of each sequence in one step (logits [B, V]): the model fetches each expert once for
        all of them and computes every sequence as it would alone (the same logits, bit for bit)."""
        try:
            logits = self.model.decode_batch(tokens, [seq.cache for seq in seqs])
        except BaseException:
            for seq in seqs:
                seq.broken = True
            raise
        for seq, token in zip(seqs, tokens):
            seq.ids.append(token)
        if self.trace is not None and self.trace.full:
            self.trace.flush()
        return logits

    def prefill(self, seq: Sequence, ids: list[int], turn: TurnStats, images: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        with self.rec.span("prefill", tokens=len(ids)):
            logits = self.step(seq, ids, images)
            self.sync()
        turn.prompt_tokens, turn.prompt_seconds = len(ids), time.perf_counter() - t0
        if self.profile is not None:
            self.profile.step("prefill", len(ids), turn.prompt_seconds, seq)
        return logits

    def decode_one(self, seq: Sequence, token: int) -> torch.Tensor:
        return self.step(seq, [token])

    def decode_n(self, seq: Sequence, logits: torch.Tensor, n: int, on_token: Callable[[int], None] | None,
                 turn: TurnStats) -> list[int]:
        """Sample up to n tokens from `logits` on; stop on a stop token (counted, not streamed)."""
        rec, params, out = self.rec, seq.params, []
        previous = torch.tensor(seq.ids, dtype=torch.long, device=logits.device)
        t0 = time.perf_counter()
        try:
            while len(out) < n:
                t_token = time.perf_counter()
                start = rec.mark()
                token = sample(logits, params, previous, seq.generator)
                rec.add(("sample", start, rec.mark(), (-1, -1, "sampling")))
                out.append(token)
                turn.generated_tokens += 1
                if token in seq.stop_ids:
                    break
                if on_token is not None:
                    on_token(token)
                if len(out) == n:
                    break
                if params.repetition_penalty != 1.0:  # the only reader of the history
                    previous = torch.cat([previous, previous.new_tensor([token])])
                logits = self.decode_one(seq, token)
                if rec.enabled:
                    self.sync()
                    rec.add(("token", start, rec.mark(), -1))
                    self.profile.step("decode", 1, time.perf_counter() - t_token, seq)
        finally:
            self.sync()
            turn.generation_seconds = time.perf_counter() - t0
            if self.trace is not None:  # format the reply's routing now, while nobody waits on a token
                self.trace.flush()
        return out

    def generate(self, seq: Sequence, prompt_ids: list[int], max_tokens: int,
                 on_token: Callable[[int], None] | None, turn: TurnStats, images=()) -> list[int]:
        """A reply: prefill what the sequence does not hold yet, then decode up to max_tokens. images: the
        prompt's EncodedImages in order; only those the cache does not hold yet are fed."""
        n = seq.reusable(prompt_ids, images)
        new = images[len(seq.image_keys):] if n else images
        logits = self.prefill(seq, prompt_ids[n:], turn, torch.cat([im.embeddings for im in new]) if new else None)
        seq.image_keys = [im.key for im in images]
        return self.decode_n(seq, logits, max_tokens, on_token, turn)
