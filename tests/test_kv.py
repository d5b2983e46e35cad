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


def test_many_query_attention_paths_equal_the_masked_reference():
    """The chunk-at-a-time path (every start, length and key offset a cache can hand over) and the
    fresh-prompt causal path give the [T, S]-masked attention's numbers, to float32 rounding."""
    import torch.nn.functional as F

    from moestream.model.attention import attend, visibility

    def masked(q, k, v, q_pos, k_first, chunk):
        k_pos = torch.arange(k_first, k_first + k.shape[0])
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=visibility(q_pos, k_pos, chunk), enable_gqa=True)
        return out.transpose(0, 1).reshape(q.shape[0], -1)

    g = torch.Generator().manual_seed(0)
    for chunk in (8, 16, None):
        for k_first in (0, 8, 16):  # a chunk cache starts on a chunk boundary; a global one at 0
            if chunk is None and k_first:
                continue
            for q0 in range(k_first, k_first + 40, 3):
                for T in (2, 5, 8, 9, 17, 40):
                    S = q0 + T - k_first
                    q, k, v = torch.randn(T, 4, 8, generator=g), torch.randn(S, 2, 8, generator=g), torch.randn(S, 2, 8, generator=g)
                    q_pos = torch.arange(q0, q0 + T)
                    got, want = attend(q, k, v, q_pos, k_first, chunk), masked(q, k, v, q_pos, k_first, chunk)
                    assert (got - want).abs().max() < 1e-5, (chunk, k_first, q0, T)
