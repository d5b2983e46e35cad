"""Quantized experts through the whole runtime: placed once in their format, moved and multiplied in it.

Offloading stays exact with every format: the cache, the store tiers, the repacked file and CPU runs
all hold the same bytes and run the same kernels as the resident experts, so offloaded logits equal
resident logits bit for bit. The planner counts the same bytes per expert the runtime places.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

import moestream
from moestream.model.formats import FORMATS

from .conftest import VOCAB

PROMPT = torch.randint(3, VOCAB, (29,), generator=torch.Generator().manual_seed(13))
QUANTIZED = ["int8", "int4", "int2", "fp8"]


@pytest.fixture(scope="module")
def resident(tiny):
    out = {}

    def get(name, fmt):
        if (name, fmt) not in out:
            llm = moestream.load(tiny(name)[0], expert_dtype=fmt)
            n = len(llm.config.moe_layers) * llm.config.num_local_experts
            out[name, fmt] = (llm.logits(PROMPT), llm.decode_logits(PROMPT), llm.plan.expert_bytes, n)
        return out[name, fmt]

    return get


@pytest.mark.parametrize("name,fmt", [("scout", "int8"), ("maverick", "int4"), ("scout", "int2"), ("maverick", "fp8")])
def test_offloaded_quantized_experts_equal_resident(tiny, resident, tmp_path, name, fmt):
    logits, stepped, eb, n = resident(name, fmt)
    for slots, extra in ((1, {}), (3, dict(cache_policy="lfu", prefetch=0)), (n - 1, {}),
                         (2, dict(cpu_experts="always")), (2, dict(cpu_experts="auto", repack=False))):
        kw = dict(cpu_experts="never", cpu_mem=0) | extra  # cpu_mem=0: every expert on the disk tier
        llm = moestream.load(tiny(name)[0], expert_dtype=fmt, expert_cache=slots * eb, expert_dir=tmp_path, **kw)
        try:
            assert not llm.plan.resident
            assert torch.equal(llm.logits(PROMPT), logits), (slots, extra)
            assert torch.equal(llm.decode_logits(PROMPT), stepped), (slots, extra)
            s = llm.stats().experts
            assert s.format == fmt and s.bytes_per_expert == eb
            assert (s.bytes_host_to_device + s.bytes_disk_to_host) % eb == 0  # whole packed experts move, nothing else
        finally:
            llm.close()



@pytest.mark.parametrize("name,fmt,resident_dtype", [("scout", "int8", "int8"), ("maverick", "int4", "auto")])
def test_long_prompt_offloaded_equals_resident_where_many_rows_take_the_gemm(tiny, tmp_path, name, fmt, resident_dtype):
    """A prompt long enough that experts see more rows than INT8_GEMM_ROWS / INT4_GEMM_ROWS (the bf16
    GEMM path; the tiny model's 80-wide shared expert cannot be int4): offloaded logits still equal
    resident ones."""
    from moestream.model import formats as fm

    prompt = torch.randint(3, VOCAB, (300,), generator=torch.Generator().manual_seed(14))
    assert len(prompt) >= 4 * max(fm.INT8_GEMM_ROWS, fm.INT4_GEMM_ROWS)  # 4 experts, top-1: some expert gets enough
    resident = moestream.load(tiny(name)[0], expert_dtype=fmt, resident_dtype=resident_dtype)
    eb = resident.plan.expert_bytes
    expected = resident.logits(prompt)
    resident.close()
    llm = moestream.load(tiny(name)[0], expert_dtype=fmt, resident_dtype=resident_dtype, expert_cache=eb, expert_dir=tmp_path,
                         cpu_experts="never", cpu_mem=0)
    try:
        assert not llm.plan.resident
        assert torch.equal(llm.logits(prompt), expected)
    finally:
        llm.close()

def test_host_disk_and_link_bytes_shrink_by_the_format(tiny, tmp_path):
    path = tiny("maverick")[0]
    sizes = {}
    for fmt in ["f32", "bf16", *QUANTIZED]:
        llm = moestream.load(path, expert_dtype=fmt, expert_cache=2 * FORMATS[fmt].nbytes(64, 32), cpu_mem=0,
                             expert_dir=tmp_path / fmt, cpu_experts="never")
        llm.logits(PROMPT[:9])
        files = list((tmp_path / fmt).glob("*.experts"))
        assert len(files) == 1
        header = files[0].read_bytes()[:4096]
        assert llm.expert_format.name == fmt
        assert f'"expert_format": "{llm.expert_format.signature}"'.encode() in header  # the file records its format
        sizes[fmt] = (llm.plan.expert_bytes, files[0].stat().st_size, llm.stats().experts.bytes_disk_to_host)
        llm.close()
    assert sizes["f32"][0] == 2 * sizes["bf16"][0] and sizes["int8"][0] < sizes["bf16"][0] / 1.5
    assert sizes["int4"][0] < sizes["int8"][0] and sizes["int2"][0] < sizes["int4"][0]
    assert sizes["fp8"][0] < sizes["bf16"][0] / 1.5
    # the repacked file shrinks too (one 4 KiB-aligned block per expert, so tiny experts round up alike)
    assert sizes["int2"][1] <= sizes["int4"][1] <= sizes["int8"][1] < sizes["bf16"][1] < sizes["f32"][1]


def test_a_format_change_rebuilds_the_expert_file(tiny, tmp_path):
    path = tiny("scout")[0]
    for fmt in ("int8", "int4"):
        llm = moestream.load(path, expert_dtype=fmt, expert_cache=1, cpu_mem=0, expert_dir=tmp_path, cpu_experts="always")
        llm.logits(PROMPT[:5])
        llm.close()
    files = list(tmp_path.glob("*.experts"))
    assert len(files) == 1 and b'"expert_format": "int4/' in files[0].read_bytes()[:4096]  # the int8 one was removed


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int8", "int4", "int2"])
def test_plan_counts_the_bytes_the_runtime_places(tiny, fmt):
    """`moestream plan -m DIR --expert-dtype F` and the loaded runtime agree on every figure they share."""
    path = tiny("maverick")[0]
    budget = ["--gpu-mem", "3MiB", "--cpu-mem", "1MiB", "-c", "256"]
    out = subprocess.run([sys.executable, "-m", "moestream", "plan", "--json", "-m", str(path), "--expert-dtype", fmt,
                          *budget], capture_output=True, text=True)
    report = json.loads(out.stdout)
    llm = moestream.load(path, expert_dtype=fmt, gpu_mem="3MiB", cpu_mem="1MiB", ctx_size=256, dtype="bfloat16")
    p = llm.plan
    assert report["expert_dtype"] == fmt and report["expert_bytes"] == p.expert_bytes == llm.stats().experts.bytes_per_expert
    assert report["gpu"]["expert_cache_slots"] == p.cache_slots
    assert report["host"]["experts_in_ram"] == (p.host_experts if not p.resident else 0)
    assert report["host"]["experts_on_disk"] == p.disk_experts
    if not p.resident:
        s = llm.stats().experts
        assert s.slots == p.cache_slots and s.host_bytes == p.host_experts * p.expert_bytes
    llm.close()


def test_quantized_experts_are_packed_once_then_read_from_the_expert_file(tiny, tmp_path, monkeypatch):
    """Quantizing is slow (an int4 Scout expert takes seconds): a second run fills its host tier from the
    repacked file with plain reads, and packs nothing."""
    from moestream.model.formats import Int4

    path = tiny("maverick")[0]
    packed = []
    real = Int4.pack
    monkeypatch.setattr(Int4, "pack", lambda self, w, out: packed.append(1) or real(self, w, out))
    eb = FORMATS["int4"].nbytes(64, 32)
    kw = dict(expert_dtype="int4", expert_cache=2 * eb, cpu_mem=10 * eb, expert_dir=tmp_path, cpu_experts="never")
    first = moestream.load(path, **kw)
    ref = first.logits(PROMPT)
    first.close()
    n = len(first.config.moe_layers) * first.config.num_local_experts
    assert len(packed) == n  # every expert once, into the file
    second = moestream.load(path, **kw)
    assert len(packed) == n  # nothing packed again: the host tier came from the file
    assert torch.equal(second.logits(PROMPT), ref)
    second.close()


# --- resident matrices in int8 (--resident-dtype int8) -----------------------------------------------
def test_int8_resident_matrix_equals_its_dequantized_weights():
    from moestream.model.formats import Int8Linear

    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g)
    m = Int8Linear.quantize(w)
    dequantized = m.q.float() * m.scale.float()[:, None]
    assert (dequantized - w).abs().max() <= m.scale.float().max() / 2 + 1e-6  # at most half a step off
    x = torch.randn(5, 64, generator=g)
    # the kernel takes bf16 activations: the reference is the fp32 matmul of bf16-rounded x
    reference = x.bfloat16().float() @ dequantized.t()
    assert torch.allclose(m(x), reference, rtol=1e-2, atol=1e-2)
    assert m(x[:1]).shape == (1, 96) and m(x[None]).shape == (1, 5, 96)
    with pytest.raises(moestream.MoestreamError, match="multiples of 16"):
        Int8Linear.quantize(torch.randn(8, 24))


def test_int4_resident_matrix_equals_its_dequantized_weights():
    from moestream.model.formats import Int4Linear, _affine, _int4_layout, _int4_unpack

    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 128, generator=g)
    m = Int4Linear.quantize(w)
    assert m.packed.nbytes + m.sz.nbytes == Int4Linear.nbytes_for(96, 128) == 96 * 64 + 96 * 2 * 4
    dequantized = _affine(_int4_unpack(m.packed, _int4_layout()), m.sz)  # [K, N], as the kernel computes
    step = m.sz[..., 0].float().abs().max()
    assert (dequantized.t() - w).abs().max() <= step / 2 + 1e-2  # about half a step off (bf16 zero points)
    x = torch.randn(5, 128, generator=g)
    assert torch.allclose(m(x), x.bfloat16().float() @ dequantized, rtol=1e-2, atol=1e-2)
    assert m(x[:1]).shape == (1, 96) and m(x[None]).shape == (1, 5, 96)
    with pytest.raises(moestream.MoestreamError, match="multiples of 32"):
        Int4Linear.quantize(torch.randn(8, 48))


def test_int4_resident_on_a_model_it_cannot_take_is_one_line_from_plan_and_load(tiny):
    path = tiny("maverick")[0]  # its dense MLP's down_proj has 80 inputs
    out = subprocess.run([sys.executable, "-m", "moestream", "plan", "-m", str(path), "--resident-dtype", "int4"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "multiples of 32" in out.stderr and "--resident-dtype int8" in out.stderr
    with pytest.raises(moestream.MoestreamError, match="multiples of 32"):
        moestream.load(path, resident_dtype="int4")


@pytest.mark.parametrize("name,resident,share", [("scout", "int8", 0.75), ("maverick", "int8", 0.75), ("scout", "int4", 0.6)])
def test_quantized_resident_weights_shrink_their_bytes_stay_close_and_the_plan_agrees(tiny, tmp_path, name, resident, share):
    path = tiny(name)[0]
    out = subprocess.run([sys.executable, "-m", "moestream", "plan", "--json", "-m", str(path), "--resident-dtype", resident,
                          "--dtype", "bfloat16"], capture_output=True, text=True)
    planned = json.loads(out.stdout)["gpu"]["resident_bytes"]
    base = moestream.load(path, dtype="bfloat16")
    llm = moestream.load(path, dtype="bfloat16", resident_dtype=resident)
    try:
        assert llm.plan.resident_bytes == llm.model.resident_bytes == llm.stats().memory.resident_bytes == planned
        assert llm.model.resident_bytes < share * base.model.resident_bytes
        b = llm.logits(PROMPT)
        if resident == "int8":  # int4 on random 64-wide weights (one group per row) is too coarse to compare
            # compared in float32: these random tiny models are chaotic enough that bf16 activations alone move
            # the output distribution by as much as the bound (L1 0.54 between bf16 and float32, maverick)
            a32 = moestream.load(path).logits(PROMPT)
            b32 = moestream.load(path, resident_dtype=resident).logits(PROMPT)
            assert (a32.argmax(-1) == b32.argmax(-1)).float().mean() > 0.8  # random tiny weights: close, not equal
            assert torch.softmax(b32, -1).sub(torch.softmax(a32, -1)).abs().sum(-1).max() < 0.5
        # offloading still changes only where experts live
        offloaded = moestream.load(path, dtype="bfloat16", resident_dtype=resident, expert_cache=2 * llm.plan.expert_bytes,
                                   cpu_mem=0, expert_dir=tmp_path, cpu_experts="never")
        try:
            assert torch.equal(offloaded.logits(PROMPT), b)
        finally:
            offloaded.close()
    finally:
        base.close()
        llm.close()


def test_int4_resident_weights_keep_the_embedded_models_perplexity():
    """On trained weights, where quality means something: held-out perplexity within 1% of bf16
    (benchmarks/quality_formats.py, 8,192 tokens: +0.58% with bf16 experts, +0.47% with int4 experts)."""
    import torch.nn.functional as F

    from moestream.data.shakespeare import held_out_ids

    base = moestream.load(expert_dtype="bf16")
    llm = moestream.load(expert_dtype="bf16", resident_dtype="int4")
    ids = torch.tensor(held_out_ids(base.tokenizer, 1024))

    def perplexity(m):
        windows = [ids[i:i + 512] for i in range(0, ids.numel(), 512)]
        loss = sum(F.cross_entropy(m.logits(w)[:-1], w[1:], reduction="sum").item() for w in windows)
        return math.exp(loss / sum(w.numel() - 1 for w in windows))

    assert llm.model.resident_bytes == llm.plan.resident_bytes < 0.4 * base.model.resident_bytes
    assert perplexity(llm) / perplexity(base) - 1 < 0.01


# --- low-bit replicas for misses (--miss-dtype) --------------------------------------------------------
@pytest.mark.parametrize("miss", ["int4", "int2"])
def test_miss_replicas_run_decoded_misses_and_leave_prefill_exact(tiny, resident, tmp_path, miss):
    logits, stepped, eb, n = resident("scout", "bf16")
    llm = moestream.load(tiny("scout")[0], expert_dtype="bf16", miss_dtype=miss, expert_cache=2 * eb, cpu_mem=0,
                         expert_dir=tmp_path, cpu_experts="never")
    try:
        assert torch.equal(llm.logits(PROMPT), logits)  # prefill never uses a replica
        s = llm.stats().experts
        assert s.replica_runs == 0
        decoded = llm.decode_logits(PROMPT)
        s = llm.stats().experts
        assert 0 < s.replica_runs <= s.misses and s.fetches >= s.replica_runs  # the full expert is fetched for next time
        assert not torch.equal(decoded, stepped)  # a replica is an approximation, no further from the exact
        # answer than every expert in the replica's format (only the misses run from it)
        def drift(x):
            return torch.softmax(x, -1).sub(torch.softmax(stepped, -1)).abs().sum(-1).mean()

        assert drift(decoded) <= 1.1 * drift(resident("scout", miss)[1])
        assert s.replica_bytes == llm.plan.miss_bytes == n * FORMATS[miss].nbytes(llm.config.hidden_size,
                                                                                  llm.config.intermediate_size)
        # the replicas have a file of their own beside the experts' (neither removes the other as stale)
        roles = sorted(b'"role": "miss"' in f.read_bytes()[:4096] for f in tmp_path.glob("*.experts"))
        assert roles == [False, True]
    finally:
        llm.close()


def test_miss_replicas_take_their_ram_from_cpu_mem(tiny):
    path = tiny("scout")[0]
    runs = {}
    for miss in ("off", "int4"):
        out = subprocess.run([sys.executable, "-m", "moestream", "plan", "--json", "-m", str(path), "--miss-dtype", miss,
                              "--expert-cache", "1", "--cpu-mem", "2MiB", "--cpu-experts", "always"],
                             capture_output=True, text=True)
        runs[miss] = json.loads(out.stdout)["host"]
    replica = runs["int4"]["miss_replica_bytes"]
    assert runs["off"]["miss_replica_bytes"] == 0 and replica > 0
    eb = runs["off"]["expert_ram_bytes"] // runs["off"]["experts_in_ram"]
    assert runs["int4"]["experts_in_ram"] == min(runs["off"]["experts_in_ram"], (2 * 2**20 - replica) // eb)
