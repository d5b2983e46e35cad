"""The tiered KV cache: spilled to host RAM and disk, in micro-batches, 8-bit, and still exact."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import moestream
from moestream import MoestreamError
from moestream.data.shakespeare import held_out_ids
from moestream.model.sampling import SamplingParams
from moestream.scheduler.plan import kv_token_bytes

from .conftest import VOCAB, oracle_logits

TOL = 1e-4


def spill_budgets(path, hot: int, host_blocks: int | None, block: int, ubatch: int, disk=None) -> dict:
    """kwargs that keep `hot` tokens per global layer on the device and `host_blocks` blocks in RAM."""
    c = moestream.load(path).config
    per_token = kv_token_bytes(c, "f32", "f32")
    n_global, n_rope = len(c.global_layers), c.num_hidden_layers - len(c.global_layers)
    kw = dict(kv_gpu_mem=(n_rope * c.attention_chunk_size + n_global * hot) * per_token, kv_block=block, ubatch=ubatch)
    if host_blocks is not None:
        kw["kv_cpu_mem"] = n_global * host_blocks * block * per_token
    if disk is not None:
        kw["kv_disk"] = disk
    return kw


@pytest.mark.parametrize("name", ["scout", "maverick"])
@pytest.mark.parametrize("tiers", ["host", "host+disk", "host+disk, one block a pass", "disk (host below one block)"])
def test_spilled_kv_matches_transformers_and_resident(tiny, tmp_path, monkeypatch, name, tiers):
    host_blocks = {"host": None, "disk (host below one block)": 0}.get(tiers, 3)
    if tiers.endswith("pass"):  # disk blocks staged one at a time: many partial attentions to merge
        from moestream.cache.kv import KVDisk

        monkeypatch.setattr(KVDisk, "STAGE_BYTES", 1)
    path, oracle = tiny(name)
    ids = torch.randint(3, VOCAB, (90,), generator=torch.Generator().manual_seed(5))  # > 11 chunks of 8
    ref = oracle_logits(oracle, ids)
    resident = moestream.load(path)
    kw = spill_budgets(path, hot=16, host_blocks=host_blocks, block=4, ubatch=6,
                       disk=tmp_path / "kv.bin" if host_blocks is not None else None)
    llm = moestream.load(path, **kw)
    assert llm.plan.kv.hot_tokens == 16
    whole, stepped = llm.logits(ids), llm.decode_logits(ids)
    assert (whole - ref).abs().max().item() < TOL
    assert (stepped - ref).abs().max().item() < TOL
    assert (whole - resident.logits(ids)).abs().max().item() < TOL
    s = llm.stats()
    assert (s.kv.spilled_to_host_bytes > 0) == (host_blocks != 0)
    assert (s.kv.spilled_to_disk_bytes > 0) == (host_blocks is not None)
    assert (s.kv.attention_seconds["host"] > 0) == (host_blocks != 0)
    llm.close()


def test_embedded_model_over_many_chunks_with_host_and_disk_tiers(embedded, tmp_path):
    ids = torch.tensor(held_out_ids(embedded.tokenizer, 700))  # 11 chunks of 64
    ref = embedded.logits(ids)
    kw = spill_budgets(DEFAULT := embedded.runtime.model, hot=96, host_blocks=4, block=32, ubatch=48,
                       disk=tmp_path / "kv.bin")
    assert DEFAULT.name == "default"
    llm = moestream.load(**kw)
    assert (llm.logits(ids) - ref).abs().max().item() < TOL
    assert (llm.decode_logits(ids[:400]) - ref[:400]).abs().max().item() < TOL
    # a conversation: prefill in micro-batches, then decoding, spilling as it goes
    out = llm.generate_ids(ids.tolist()[:500], SamplingParams(temperature=0, max_tokens=20), stop_ids=set())
    embedded.reset()
    assert out == embedded.generate_ids(ids.tolist()[:500], SamplingParams(temperature=0, max_tokens=20), stop_ids=set())
    s = llm.stats()
    assert s.kv.tokens_device + s.kv.tokens_host + s.kv.tokens_disk == 519
    assert s.kv.tokens_host == 4 * 32 and s.kv.tokens_disk > 0 and s.kv.tokens_device <= 96
    llm.close()


def test_8bit_kv_tolerance_and_perplexity(embedded):
    """q8_0 keys and values: logits within 0.25 of f32; held-out perplexity within 1% of bf16 KV."""
    ids = torch.tensor(held_out_ids(embedded.tokenizer, 2048))

    def perplexity(llm):
        total, count = 0.0, 0
        for i in range(0, ids.numel(), 512):  # windows of 512 tokens, each predicting its own next tokens
            window = ids[i:i + 512]
            total += F.cross_entropy(llm.logits(window)[:-1], window[1:], reduction="sum").item()
            count += window.numel() - 1
        return torch.exp(torch.tensor(total / count)).item()

    bf16 = moestream.load(cache_type_k="bf16", cache_type_v="bf16")
    q8 = moestream.load(cache_type_k="q8_0", cache_type_v="q8_0")
    assert (q8.logits(ids[:512]) - embedded.logits(ids[:512])).abs().max().item() < 0.25
    p_bf16, p_q8 = perplexity(bf16), perplexity(q8)
    print(f"held-out perplexity: bf16 KV {p_bf16:.4f}, q8_0 KV {p_q8:.4f} ({100 * (p_q8 / p_bf16 - 1):+.3f}%)")
    assert abs(p_q8 / p_bf16 - 1) < 0.01


def test_8bit_kv_is_spilled_in_8_bit(tiny, tmp_path):
    path, _ = tiny("scout")
    kw = spill_budgets(path, hot=16, host_blocks=None, block=4, ubatch=6)
    kw["kv_gpu_mem"] //= 2  # q8_0 needs about half
    f32 = moestream.load(path, **spill_budgets(path, hot=16, host_blocks=None, block=4, ubatch=6))
    q8 = moestream.load(path, cache_type_k="q8_0", cache_type_v="q8_0", **kw)
    ids = torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(8))
    f32.logits(ids), q8.logits(ids)
    a, b = f32.stats().kv.spilled_to_host_bytes, q8.stats().kv.spilled_to_host_bytes
    assert 0 < b < 0.4 * a  # int8 values + one fp32 scale per (token, head) of 16 dims: 20 / 64 bytes


DISK_RUN = r"""
import os, sys, torch, moestream
from moestream.model.sampling import SamplingParams
from tests.test_kv_tiers import spill_budgets
path, disk, out = sys.argv[1:4]
kw = spill_budgets(path, hot=16, host_blocks=2, block=4, ubatch=6, disk=disk)
llm = moestream.load(path, **kw)
ids = torch.randint(3, 300, (80,), generator=torch.Generator().manual_seed(int(sys.argv[4])))
open(out, "w").write(repr(llm.logits(ids).sum().item()))
assert llm.stats().kv.spilled_to_disk_bytes > 0
if sys.argv[5] == "die":  # mid-conversation (its blocks on disk), no close, no finalizers: as after a kill
    llm.generate_ids(ids.tolist(), SamplingParams(temperature=0, max_tokens=2))
    os._exit(0)
"""


def test_disk_tier_survives_reopen_in_a_new_process(tiny, tmp_path):
    """A clean exit removes the KV file; one that dies leaves it with our header, and the next process
    reuses it (from empty); a file that is not ours at the path is refused and left byte-identical."""
    from moestream.cache.kv import KVDisk

    path, _ = tiny("scout")
    disk = tmp_path / "kv.bin"
    for seed, how in ((1, "exit"), (2, "die"), (3, "exit")):  # 3 reopens the file 2 died holding
        out = tmp_path / f"out{seed}"
        subprocess.run([sys.executable, "-c", DISK_RUN, str(path), str(disk), str(out), str(seed), how], check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
        ids = torch.randint(3, 300, (80,), generator=torch.Generator().manual_seed(seed))
        expected = moestream.load(path).logits(ids).sum().item()
        assert abs(float(out.read_text()) - expected) < 1e-2
        assert disk.exists() == (how == "die")
        if how == "die":
            assert disk.read_bytes().startswith(KVDisk.MAGIC) and disk.stat().st_size > len(KVDisk.HEADER)
    garbage = os.urandom(1 << 16)
    disk.write_bytes(garbage)  # not ours: refused at load, never read, never truncated
    with pytest.raises(MoestreamError, match="is not a moestream KV file") as info:
        moestream.load(path, **spill_budgets(path, hot=16, host_blocks=2, block=4, ubatch=6, disk=disk))
    assert "\n" not in str(info.value) and "--kv-disk" in str(info.value)
    assert disk.read_bytes() == garbage


def test_full_disk_is_one_line_and_loses_nothing(tiny, tmp_path, monkeypatch):
    path, _ = tiny("scout")
    llm = moestream.load(path, **spill_budgets(path, hot=16, host_blocks=2, block=4, ubatch=6, disk=tmp_path / "kv.bin"))
    params = SamplingParams(temperature=0, max_tokens=10)
    prompt = list(range(3, 33))
    good = llm.generate_ids(prompt, params, stop_ids=set())

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moestream.cache.kv.os.pwrite", full)
    with pytest.raises(MoestreamError) as info:
        llm.generate_ids(list(range(3, 90)), params, stop_ids=set())
    assert "\n" not in str(info.value) and "No space left" in str(info.value) and "--kv-disk" in str(info.value)
    monkeypatch.undo()
    assert llm.generate_ids(prompt, params, stop_ids=set()) == good  # the runtime carries on
    llm.close()


def test_unwritable_kv_disk_is_refused_at_load(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(MoestreamError, match="cannot open the KV disk file") as info:
        moestream.load(tiny("scout")[0], **spill_budgets(tiny("scout")[0], hot=16, host_blocks=2, block=4, ubatch=6,
                                                         disk=blocker / "kv.bin"))
    assert "\n" not in str(info.value) and "a part of the path is a file" in str(info.value)
    assert blocker.read_text() == "x" and "free space" not in str(info.value)


def test_context_beyond_the_budgets_is_refused_with_the_largest_that_fits(tiny):
    path, _ = tiny("scout")
    kw = spill_budgets(path, hot=16, host_blocks=2, block=4, ubatch=6)
    with pytest.raises(MoestreamError, match=r"does not fit the KV budgets: at most 24 tokens fit .* use -c 24"):
        moestream.load(path, ctx_size=100, **kw)
    assert moestream.load(path, ctx_size=24, **kw).ctx_size == 24
    with pytest.raises(MoestreamError, match="--kv-gpu-mem .* is below"):
        moestream.load(path, kv_gpu_mem=100)


def test_gpu_budget_too_small_for_the_context_names_the_largest_context(tiny):
    path, _ = tiny("maverick")
    probe = moestream.load(path, ctx_size=512)
    p = probe.plan
    budget = p.resident_bytes + p.workspace_bytes + p.kv_bytes // 2
    with pytest.raises(MoestreamError, match=r"or -c (\d+) \(the largest context that fits\)") as info:
        moestream.load(path, ctx_size=512, gpu_mem=budget)
    largest = int(str(info.value).split("or -c ")[1].split()[0])
    assert 0 < largest < 512
    assert moestream.load(path, ctx_size=largest, gpu_mem=budget).ctx_size == largest
