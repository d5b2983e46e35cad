"""The KV cache: chunked layers keep one chunk at most; every way of feeding tokens gives the same logits."""

import torch

import moestream
from moestream.cache.kv import ChunkKV, GlobalKV, KVCache

from .conftest import VOCAB


def test_chunked_layers_never_hold_more_than_one_chunk(tiny):
    llm = moestream.load(tiny("maverick")[0])
    cache = KVCache(llm.config, llm.device, llm.dtype)
    ids = torch.randint(3, VOCAB, (45,), generator=torch.Generator().manual_seed(0))
    for i in range(ids.numel()):
        llm.model.forward(ids[i:i + 1], cache)
        for layer, kv in enumerate(cache.layers):
            if llm.config.uses_rope(layer):
                assert isinstance(kv, ChunkKV)
                assert kv.store.capacity == llm.config.attention_chunk_size
                assert kv.n == i % 8 + 1  # tokens of the current chunk only
            else:
                assert isinstance(kv, GlobalKV) and kv.n == i + 1


def test_uneven_steps_across_chunk_boundaries_match_one_pass(tiny):
    """Prefill pieces of odd sizes (some spanning several chunks) give the one-pass logits."""
    llm = moestream.load(tiny("scout")[0])
    ids = torch.randint(3, VOCAB, (50,), generator=torch.Generator().manual_seed(4))
    whole = llm.logits(ids)
    cache = KVCache(llm.config, llm.device, llm.dtype)
    pieces, start = [], 0
    for size in (3, 13, 1, 7, 20, 6):
        pieces.append(llm.model.forward(ids[start:start + size], cache))
        start += size
    assert start == 50
    assert (torch.cat(pieces) - whole).abs().max().item() < 1e-4
    for layer, kv in enumerate(cache.layers):
        if llm.config.uses_rope(layer):
            assert kv.n == 50 - 48  # the last chunk starts at position 48


def test_chat_turns_reuse_the_cached_prefix(tiny):
    from moestream.model.sampling import SamplingParams

    llm = moestream.load(tiny("scout")[0])
    params = SamplingParams(temperature=0, max_tokens=6)
    first = [1, 9, 10, 11, 12]
    reply = llm.generate_ids(first, params, stop_ids=set())
    follow = first + reply + [20, 21, 22]
    continued = llm.generate_ids(follow, params, stop_ids=set())
    assert llm.stats().turn.prompt_tokens == len(follow) - (len(first) + len(reply) - 1)
    llm.reset()
    assert llm.generate_ids(follow, params, stop_ids=set()) == continued
    assert llm.stats().turn.prompt_tokens == len(follow)
