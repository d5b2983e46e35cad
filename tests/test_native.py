"""The C kernels of one-row float32 steps (model/native.py): each against the torch formula it
replaces, the model's one-row steps through them, and the build (cached, atomic, refused cleanly)."""

import os

import pytest
import torch
import torch.nn.functional as F

import moestream
from moestream.model import native
from moestream.model import formats
from moestream.model.attention import decode_attention
from moestream.model.formats import Int4Linear, Int8Linear
from moestream.model.llama4 import apply_rope, rms_norm, rope_rotations
from moestream.model.sampling import SamplingParams

from .conftest import VOCAB

needs_kernels = pytest.mark.skipif(native.status() != "on", reason=f"no C kernels here: {native.status()}")
G = torch.Generator().manual_seed(3)
ATOL = 1e-5  # float32 sums in another order


def rand(*shape):
    return torch.randn(*shape, generator=G)


def torch_swiglu(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@needs_kernels
@pytest.mark.parametrize("k", [16, 37, 64, 200])  # whole vectors of 16, and tails
def test_matrix_vector_kernels_compute_torchs_products(k):
    x, w, r, g = rand(1, k), rand(45, k), rand(1, 45), rand(k)
    assert native.ready(x, w)
    torch.testing.assert_close(native.linear(x, w), F.linear(x, w), rtol=0, atol=ATOL * k ** 0.5)
    torch.testing.assert_close(native.linear_add(x, w, r), r + F.linear(x, w), rtol=0, atol=ATOL * k ** 0.5)
    for weight in (g, None):
        h, y = native.norm_linear(x, weight, 1e-5, w, keep=True)
        torch.testing.assert_close(h, rms_norm(x, weight, 1e-5), rtol=1e-6, atol=ATOL)
        torch.testing.assert_close(y, F.linear(rms_norm(x, weight, 1e-5), w), rtol=0, atol=ATOL * k ** 0.5)
        assert torch.equal(native.norm_linear(x, weight, 1e-5, w), y)
        torch.testing.assert_close(native.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), rtol=1e-6, atol=ATOL)


@needs_kernels
@pytest.mark.parametrize("qk_norm", [True, False])
def test_rope_heads_rotates_and_normalises_the_first_heads(qk_norm):
    heads, hd = 7, 32
    x = rand(1, heads, hd) * 3
    rotations = rope_rotations(1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd)), torch.tensor([1234]))
    want = apply_rope(x[:, :5], rotations)
    if qk_norm:
        want = rms_norm(want, None, 1e-5)
    got = x.clone()
    native.rope_heads_(got, rotations, 5, qk_norm, 1e-5)
    torch.testing.assert_close(got[:, :5], want, rtol=1e-5, atol=ATOL)
    assert torch.equal(got[:, 5:], x[:, 5:])  # the value heads are left alone


@needs_kernels
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_chooses_torchs_experts_and_sigmoid_scales(k):
    logits = rand(1, 16)
    idx, scores = native.top_k(logits, k)
    top, want = logits.topk(k, dim=-1)
    assert idx.dtype == torch.int64 and torch.equal(idx, want)
    torch.testing.assert_close(scores, torch.sigmoid(top), rtol=1e-6, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("d, f", [(64, 32), (128, 192), (40, 50)])
def test_swiglu_kernel_is_the_dense_mlp(d, f):
    x, gate_up, down = rand(1, d), rand(2 * f, d) * 0.2, rand(d, f) * 0.2
    torch.testing.assert_close(native.swiglu(x, gate_up, down), torch_swiglu(x, gate_up, down), rtol=1e-5, atol=ATOL * 4)


@needs_kernels
@pytest.mark.parametrize("keys", [1, 9, 300, 17000])  # one key; many; more than the stack holds
def test_decode_attention_kernel_is_softmax_attention_with_grouped_heads(keys):
    q, k, v = rand(4, 16), rand(keys, 2, 16), rand(keys, 2, 16)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query head h reads key head h // 2
    scores = torch.einsum("hd,shd->hs", q, kk) / 4.0
    want = torch.einsum("hs,shd->hd", scores.softmax(-1), vv).reshape(1, -1)
    torch.testing.assert_close(decode_attention(q, k, v), want, rtol=1e-5, atol=ATOL)


def assert_bf16_close(got, want):
    """got a result of float32 sums rounded to bfloat16 once: within one bfloat16 step of want."""
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("k", [16, 48, 208])
def test_int8_kernel_is_torchs_weight_only_product(k):
    m = Int8Linear.quantize(rand(72, k))
    x = rand(1, k).bfloat16()
    got = native.int8_linear(x, m.q, m.scale)
    assert got.dtype == torch.bfloat16
    assert_bf16_close(got, x.float() @ (m.q.float() * m.scale.float()[:, None]).t())
    assert_bf16_close(got, torch.ops.aten._weight_int8pack_mm(x, m.q, m.scale))


@needs_kernels
@pytest.mark.parametrize("k, group", [(256, 128), (192, 64), (96, 32)])
def test_int4_kernel_reads_torchs_packing_and_gives_each_row_of_a_batch_its_own_bits(k, group):
    """One row and batches (in tiles where the CPU shares the weights' lookups among rows, and the tail
    past them): torch's kernel's numbers within one bf16 step, each row the bits it has alone."""
    style, block = formats._int4_layout()
    if style != "halves":
        pytest.skip(f"torch packs int4 as {style} here: its kernel, not ours")
    n = 3 * block
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    sz = torch.empty(k // group, n, 2, dtype=torch.bfloat16)
    formats._int4_pack(lambda n0, n1: rand(n1 - n0, k), packed, sz)
    for rows in (1, 2, 4, 7):
        x = rand(rows, k).bfloat16()
        got = native.int4_linear(x, packed, sz, block)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert_bf16_close(got, x.float() @ formats._affine(formats._int4_unpack(packed, (style, block)), sz))
        assert_bf16_close(got, torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz))
        assert torch.equal(got, torch.cat([native.int4_linear(x[i:i + 1], packed, sz, block) for i in range(rows)]))


@needs_kernels
@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("n,k", [(40, 37), (72, 64), (9, 200), (130, 96)])  # tails past 32 and 16, odd tiles
def test_bf16_kernel_is_f_linear_and_a_batch_gives_each_rows_bits(monkeypatch, n, k, amx):
    """Fewer than bf16_rows() rows are the C kernel's (one row, or tiles: whole ones, a last partial one
    of weight rows and of input rows): F.linear's formula within one bf16 step, and each row's bits in
    a batch are the ones it has alone, so a batched decode step computes what each sequence would and
    a prompt's rows through an expert what each token would. More rows are F.linear's; where oneDNN
    may use AMX, all but a decode step's few."""
    monkeypatch.setattr(native, "onednn_may_use_amx", lambda: amx)
    limit = native.BF16_AMX_ROWS if amx else native.BF16_ROWS
    assert native.bf16_rows() == limit
    w = rand(n, k).bfloat16()
    for rows in sorted(r for r in {1, 2, 3, 4, 5, 7, 11, limit - 1} if r < limit):
        x = rand(rows, k).bfloat16()
        got = native.linear(x, w)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        assert_bf16_close(got, x.float() @ w.float().t())
        assert torch.equal(got, torch.cat([native.linear(x[i:i + 1], w) for i in range(rows)]))
    x = rand(2, 2, k).bfloat16()
    got = native.linear(x, w)
    assert got.shape == (2, 2, n) and got.is_contiguous()
    assert_bf16_close(got, x.float() @ w.float().t())
    assert torch.equal(got.flatten(0, 1), native.linear(x.flatten(0, 1), w))
    many = rand(limit, k).bfloat16()
    assert torch.equal(native.linear(many, w), F.linear(many, w))  # a prompt's rows: F.linear
    assert native.linear(rand(1, k), w.float()).dtype == torch.float32  # float32 stays float32's kernel
    assert native.linear(x[0, :2], w.t().contiguous().t()).shape == (2, n)  # w not contiguous: F.linear


@needs_kernels
def test_quantized_matrices_take_the_kernels_for_one_row_and_int4_for_more_where_it_shares_them(monkeypatch):
    w, x = rand(128, 256), rand(1, 256)
    int8, int4 = Int8Linear.quantize(w), Int4Linear.quantize(w)
    calls = []
    for name in ("int8_linear", "int4_linear"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    one, three = int8(x), int8(x.expand(3, -1))
    assert one.dtype == torch.float32 and calls == ["int8_linear"]
    assert_bf16_close(one, three[:1])
    one, three = int4(x), int4(x.expand(3, -1))
    style, block = formats._int4_layout()
    if style == "halves":
        shared = native.int4_shares_rows(block)
        assert calls == ["int8_linear", "int4_linear"] + ["int4_linear"] * shared
        if shared:
            assert torch.equal(one, three[:1])  # a row's bits in a batch are the ones it has alone
    assert_bf16_close(one, three[:1])


def test_ready_takes_only_one_float32_row_and_plain_contiguous_weights():
    x, w = rand(1, 32), rand(8, 32)
    on = native.status() == "on"
    assert native.ready(x, w, None) == on
    assert not native.ready(rand(2, 32), w)  # a prompt's rows: torch's matmul
    assert not native.ready(x.bfloat16(), w) and not native.ready(x, w.bfloat16())
    assert not native.ready(x, rand(32, 8).t())  # not contiguous
    assert not native.ready(x, object())  # a PackedLinear / Int8Linear: multiplies itself
    assert not native.ready(x.requires_grad_(), w)
    assert native.linear(rand(3, 32).requires_grad_(), w).shape == (3, 8)  # torch's, with its autograd


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_one_row_steps_go_through_the_kernels_and_agree_with_torchs(tiny, monkeypatch, name):
    """Decoding with and without the kernels: the same greedy tokens, logits within float32 rounding
    (both are checked against transformers in test_parity); every decode step calls them."""
    if native.status() != "on":
        pytest.skip(native.status())
    path = tiny(name)[0]
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(4))
    llm = moestream.load(path, device="cpu")
    try:
        calls = []
        swiglu = native.swiglu
        monkeypatch.setattr(native, "swiglu", lambda *a: calls.append(1) or swiglu(*a))
        fast = llm.decode_logits(ids)
        assert len(calls) >= len(ids) * llm.config.num_hidden_layers // 2  # shared or dense MLP, each layer
        fast_tokens = llm.generate_ids(ids[:9].tolist(), SamplingParams(temperature=0, max_tokens=12),
                                       stop_ids=set())
        monkeypatch.setattr(native, "_library", lambda: None)
        slow = llm.decode_logits(ids)
        slow_tokens = llm.generate_ids(ids[:9].tolist(), SamplingParams(temperature=0, max_tokens=12),
                                       stop_ids=set())
    finally:
        llm.close()
    assert not torch.equal(fast, slow)  # the kernels did run
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
    assert fast_tokens == slow_tokens


def test_the_library_is_built_once_under_a_hash_atomically(tmp_path, monkeypatch):
    if native.status() != "on":
        pytest.skip(native.status())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib, why = native._build()
    assert lib is not None and why == ""
    built = sorted(p.name for p in (tmp_path / "moestream" / "native").iterdir())
    assert len([n for n in built if n.endswith(".so")]) == 1 and not [n for n in built if n.endswith(".tmp")]
    so = next((tmp_path / "moestream" / "native").glob("gemv-*.so"))
    stamp = so.stat().st_mtime_ns
    assert native._build()[0] is not None and so.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_no_compiler_or_switched_off_leaves_torchs_products(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    lib, why = native._build()
    assert lib is None and "no C compiler" in why and "CC" in why
    monkeypatch.setenv("MOESTREAM_NATIVE", "0")
    assert native._build() == (None, "off (MOESTREAM_NATIVE=0)")
    assert not os.path.exists(tmp_path / "moestream" / "native" / "gemv.so")


@needs_kernels
def test_sharing_rows_among_threads_changes_no_bit():
    """Big enough products are shared out by OpenMP (torch's threads); each row stays one thread's."""
    x, w, gate_up, down = rand(1, 256), rand(1024, 256), rand(2048, 256) * 0.1, rand(256, 1024) * 0.1
    int8, int4, xb, wb = Int8Linear.quantize(w), Int4Linear.quantize(w), rand(3, 256).bfloat16(), w.bfloat16()
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = (native.linear(x, w), native.swiglu(x, gate_up, down), int8(x), int4(x), int4(xb),
                            native.linear(xb[:1], wb), native.linear(xb, wb))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out[1], out[2]))


@needs_kernels
def test_append_attention_stores_the_token_and_attends_as_decode_attention():
    keys, values = rand(10, 2, 16), rand(10, 2, 16)
    q, k, v = rand(1, 4, 16), rand(1, 2, 16), rand(1, 2, 16)
    want_k, want_v = keys.clone(), values.clone()
    want_k[6], want_v[6] = k[0], v[0]
    out = native.append_attention(q, k, v, keys, values, 6)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)  # slot 6 written, the rest untouched
    assert torch.equal(out, decode_attention(q[0], keys[:7], values[:7]))


def test_an_unusable_cache_directory_leaves_torchs_products(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # ~/.cache/moestream/native cannot be made
    lib, why = native._build()
    assert lib is None and why.startswith("build failed") and blocker.read_text() == "not a directory"
