"""Expert formats (model/formats.py): every format packs, reads back what it means to store, and
computes the SwiGLU of its own dequantized weights, from a buffer that may be a row of a pool.

Tolerances, relative to the float32 SwiGLU with the format's dequantized weights (||y - ref|| / ||ref||):
float32 activations through f32 / bf16 / fp8 weights 1e-5 (float32 arithmetic); every case that runs
in bfloat16 (bf16 activations, and the int kernels, which take float32 activations as bfloat16)
1.5e-2 (bfloat16 rounding of activations, of two intermediate results and of the output, ~2^-9 each).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moestream.errors import MoestreamError
from moestream.model import formats as fm
from moestream.model.formats import CPU_FORMATS, ALIGN, FORMATS, ExpertWeights, Fp8, Int2, Int4, Int8, expert_format

SHAPES = [(128, 192), (256, 512)]  # (hidden, inter): the embedded model's, and one where every group size divides
CASES = {
    "f32": FORMATS["f32"], "bf16": FORMATS["bf16"], "f16": FORMATS["f16"], "int8": Int8(), "fp8": Fp8(),
    "bf16-out-major": CPU_FORMATS["bf16"], "f16-out-major": CPU_FORMATS["f16"],
    **{f"int4-g{g}": Int4(f"int4-g{g}", group=g) for g in (32, 64, 128)},
    **{f"int4-g{g}-sym": Int4(f"int4-g{g}-sym", group=g, symmetric=True) for g in (32, 64, 128)},
    "int4-g128-hqq": Int4("int4-g128-hqq", group=128, hqq_iters=20),
    **{f"int2-g{g}": Int2(f"int2-g{g}", group=g) for g in (32, 64, 128)},
}
KERNEL = ("int8", "int4", "int2")  # formats computed by the bf16 kernels whatever the activations


def weights(hidden: int, inter: int, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(torch.randn(hidden, 2 * inter, generator=g) * 0.02, torch.randn(inter, hidden, generator=g) * 0.02)


def packed(fmt, w: ExpertWeights) -> torch.Tensor:
    hidden, inter = w.down.shape[1], w.down.shape[0]
    buf = torch.empty(fmt.nbytes(hidden, inter), dtype=torch.uint8)
    fmt.pack(w, buf)
    return buf


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def tolerance(name: str, dtype: torch.dtype) -> float:
    if dtype == torch.float32 and not name.startswith(KERNEL):
        return 1e-5
    return 1.5e-2


# --- what the buffer holds --------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_layout_parts_aligned_and_nbytes(name, hidden, inter):
    fmt = CASES[name]
    layout = fmt.layout(hidden, inter)
    spans = sorted((p.offset, p.offset + p.nbytes) for p in layout.parts.values())
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # no overlap
    assert spans[-1][1] <= layout.nbytes == fmt.nbytes(hidden, inter) and layout.nbytes % ALIGN == 0
    buf = packed(fmt, weights(hidden, inter))
    assert fmt.expert(buf, hidden, inter).nbytes == buf.numel() == fmt.nbytes(hidden, inter)


def test_bytes_per_weight():
    """What each format costs per expert, from its own parts (D=256, F=512: every group divides)."""
    d, f = 256, 512
    n = 3 * d * f  # weights of one expert
    assert FORMATS["int8"].nbytes(d, f) == n + 2 * (2 * f + d)
    assert FORMATS["fp8"].nbytes(d, f) == n + 4 * (2 * f + d)
    assert Int4("int4", group=128).nbytes(d, f) == n // 2 + 4 * n // 128
    assert Int2("int2", group=32).nbytes(d, f) == n // 4 + 4 * n // 32


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("int")])
def test_int_round_trip(name, hidden, inter):
    """pack then dequantize gives exactly the values the quantizer chose, whatever the kernel's layout."""
    fmt = CASES[name]
    w = weights(hidden, inter)
    got = fmt.dequantize(packed(fmt, w), hidden, inter)
    for matrix, deq in zip((w.gate_up, w.down), got):
        rows = matrix.t().float()  # W^T [N, K]
        k = rows.shape[1]
        if name == "int8":
            s = (rows.abs().amax(dim=1) / 127).to(torch.bfloat16).float()[:, None]
            want = (rows / s).round().clamp(-127, 127) * s
            assert (rows - want).abs().max() <= s.max() / 2 * 1.01
        else:
            group = fm._group(k, fmt.group)
            levels = 16 if name.startswith("int4") else 4
            q, s, z = fm._quantize(rows, group, levels, getattr(fmt, "symmetric", False), getattr(fmt, "hqq_iters", 0))
            s, z = s.float().repeat_interleave(group, 1), z.float().repeat_interleave(group, 1)
            want = (q.float() - 8) * s + z
            assert q.min() >= 0 and q.max() < levels
            if name.startswith("int4") and not fmt.symmetric:  # round to nearest within [min, max]
                assert ((rows - want).abs() <= s / 2 + 2e-3 * z.abs() + 1e-7).all()
        assert torch.equal(deq.t(), want)


def test_int4_group_falls_back_for_small_dims():
    """F=192 is not a multiple of 128: the down matrix (K=192) gets groups of 64, gate_up (K=128) keeps 128."""
    parts = Int4("int4", group=128).layout(128, 192).parts
    assert parts["gate_up_sz"].shape == (1, 384, 2) and parts["down_sz"].shape == (3, 128, 2)


@pytest.mark.parametrize("n,k", [(64, 64), (144, 64), (80, 96), (384, 128)])
def test_int4_kernel_layout_read_back(n, k):
    """The codes read back from aten's packed bytes are the ones it packed (tails of 16/32/48 channels too)."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n + k))
    packed_ = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    assert torch.equal(fm._int4_unpack(packed_, fm._int4_layout()).int(), q)
    assert fm._int4_layout()[0] + str(fm._int4_layout()[1]) in FORMATS["int4"].signature


@pytest.mark.parametrize("name", ["int8", "int4-g64", "int2-g32", "fp8"])
def test_packing_in_small_steps_gives_the_same_bytes(name, monkeypatch):
    fmt, w = CASES[name], weights(256, 512, seed=3)
    whole = packed(fmt, w)
    monkeypatch.setattr(fm, "PACK_ELEMENTS", 64 * 64)
    assert torch.equal(packed(fmt, w), whole)


def test_fp8_from_fp8_keeps_the_checkpoint_bytes():
    hidden, inter = 128, 192
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(hidden, 2 * inter, generator=g) * 100).to(torch.float8_e4m3fn)
    down = (torch.randn(inter, hidden, generator=g) * 100).to(torch.float8_e4m3fn)
    w = ExpertWeights(gate_up, down, torch.rand(2 * inter, generator=g).to(torch.bfloat16) / 100,
                      torch.rand(hidden, generator=g).to(torch.bfloat16) / 100)
    fmt = FORMATS["fp8"]
    buf = packed(fmt, w)
    parts = fmt.layout(hidden, inter).views(buf)  # output-major, as the official checkpoints' [out, in]
    assert torch.equal(parts["gate_up"].view(torch.uint8), gate_up.t().view(torch.uint8))
    assert torch.equal(parts["down"].view(torch.uint8), down.t().view(torch.uint8))
    assert torch.equal(parts["gate_up_scale"], w.gate_up_scale.float())
    for got, want in zip(fmt.dequantize(buf, hidden, inter), w.dequantized()):
        assert torch.equal(got, want)


def test_fp8_from_float_quantizes_per_output_channel():
    hidden, inter = 128, 192
    w = weights(hidden, inter)
    fmt = FORMATS["fp8"]
    got = fmt.dequantize(packed(fmt, w), hidden, inter)
    for matrix, deq in zip((w.gate_up, w.down), got):
        s = matrix.abs().amax(dim=0) / 448
        assert torch.equal(deq, (matrix / s).to(torch.float8_e4m3fn).float() * s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_conversion_is_exact(dtype):
    """Every finite fp8 code (NaN codes 0x7f / 0xff excepted), contiguous and as a strided column slice."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    w = codes.view(torch.float8_e4m3fn)
    assert torch.equal((fm.fp8_to(w, dtype).float() * 256), w.float())
    wide = w.repeat(6).view(-1, 254 * 3 // 127)[:, ::2]  # a non-contiguous [K, N] view
    assert torch.equal(fm.fp8_to(wide, dtype).float() * 256, wide.float())


@pytest.mark.parametrize("levels", [4, 16])
def test_hqq_zero_points_beat_round_to_nearest(levels):
    rows = weights(256, 512).gate_up.t().contiguous()
    err = {}
    for iters in (0, 20):
        q, s, z = fm._quantize(rows, 32, levels, hqq_iters=iters)
        deq = (q.float() - 8) * s.float().repeat_interleave(32, 1) + z.float().repeat_interleave(32, 1)
        err[iters] = (rows - deq).abs().mean()
    assert err[20] < err[0] * 0.97


# --- what the expert computes -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("name", list(CASES))
def test_expert_is_swiglu_of_its_dequantized_weights(name, hidden, inter, tokens, dtype):
    fmt = CASES[name]
    buf = packed(fmt, weights(hidden, inter))
    gate_up, down = fmt.dequantize(buf, hidden, inter)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    y = fmt.expert(buf, hidden, inter)(x)
    assert y.dtype == dtype and y.shape == (tokens, hidden)
    ref = swiglu(x.float(), gate_up, down)
    assert ((y.float() - ref).norm() / ref.norm()).item() <= tolerance(name, dtype)


@pytest.mark.parametrize("name", ["int8", "int4-g128", "int2-g32", "fp8", "bf16"])
def test_buffer_as_a_row_of_a_pool(name):
    """Packing into, and computing from, a row of a larger uint8 tensor (the host tier, a cache slot)."""
    fmt, hidden, inter = CASES[name], 128, 192
    w = weights(hidden, inter, seed=2)
    alone = packed(fmt, w)
    pool = torch.zeros(3, alone.numel(), dtype=torch.uint8)
    fmt.pack(w, pool[1])
    assert torch.equal(pool[1], alone) and not pool[0].any() and not pool[2].any()
    x = torch.randn(7, hidden).to(torch.bfloat16)
    assert torch.equal(fmt.expert(pool[1], hidden, inter)(x), fmt.expert(alone, hidden, inter)(x))


@pytest.mark.parametrize("name", ["int8", "int4-g128", "int2-g32", "fp8"])
def test_misaligned_and_strided_activations(name):
    """A view that starts mid-cache-line or skips columns computes the same as a fresh tensor."""
    fmt, hidden, inter = CASES[name], 128, 192
    buf = packed(fmt, weights(hidden, inter))
    expert = fmt.expert(buf, hidden, inter)
    x = torch.randn(3, hidden).to(torch.bfloat16)
    shifted = torch.empty(3 * hidden + 1, dtype=torch.bfloat16)[1:].view(3, hidden)
    shifted.copy_(x)
    wide = torch.empty(3, 2 * hidden, dtype=torch.bfloat16)
    wide[:, ::2] = x
    assert torch.equal(expert(shifted), expert(x)) and torch.equal(expert(wide[:, ::2]), expert(x))


# --- what is refused ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hidden,inter", [("int4", 48, 192), ("int4", 128, 200), ("int2", 96, 100),
                                               ("int8", 40, 192), ("int8", 128, 24)])
def test_unsupported_sizes_are_one_line(name, hidden, inter):
    with pytest.raises(MoestreamError) as e:
        FORMATS[name].nbytes(hidden, inter)
    assert "\n" not in str(e.value) and "multiples of" in str(e.value) and "--expert-dtype" in str(e.value)


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "fp8"])
def test_matrices_that_do_not_fit_together_are_one_line(name):
    w = ExpertWeights(torch.zeros(128, 2 * 192), torch.zeros(160, 128))
    with pytest.raises(MoestreamError) as e:
        FORMATS[name].pack(w, torch.empty(1 << 20, dtype=torch.uint8))
    assert "\n" not in str(e.value) and "malformed" in str(e.value)


@pytest.mark.parametrize("cls", [Int4, Int2])
def test_groups_without_a_kernel_are_refused(cls):
    with pytest.raises(ValueError):
        cls("x", group=16)


def test_auto_keeps_fp8_checkpoints_fp8_and_others_at_the_compute_dtype():
    assert expert_format("auto", torch.float8_e4m3fn, torch.float32) is FORMATS["fp8"]
    assert expert_format("auto", torch.bfloat16, torch.bfloat16, "cuda") is FORMATS["bf16"]
    assert expert_format("auto", torch.bfloat16, torch.bfloat16, "cpu") is CPU_FORMATS["bf16"]  # output-major
    assert expert_format("auto", torch.bfloat16, torch.float32) is CPU_FORMATS["f32"]  # never converted per call
    assert expert_format("auto", torch.bfloat16, torch.float32, "cuda") is FORMATS["f32"]
    assert expert_format("int4", torch.bfloat16, torch.float32) is FORMATS["int4"]


def test_plain_experts_on_the_cpu_are_stored_output_major():
    """The same bytes per expert as the checkpoint's orientation, multiplied by F.linear (float32: the
    C kernel's one-row products), equal to it within the dtype's rounding; on another device the
    checkpoint's own orientation (raw reads)."""
    for name, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)):
        cpu, other = expert_format(name, dtype, dtype, "cpu"), expert_format(name, dtype, dtype, "cuda")
        assert cpu is CPU_FORMATS[name] and other is FORMATS[name] and cpu.signature != other.signature
        assert cpu.raw_dtype is None and other.raw_dtype == dtype
        d, f = 128, 192
        assert cpu.nbytes(d, f) == other.nbytes(d, f)
        g = torch.Generator().manual_seed(5)
        w = ExpertWeights(torch.randn(d, 2 * f, generator=g).to(dtype), torch.randn(f, d, generator=g).to(dtype))
        bufs = [torch.empty(fmt.nbytes(d, f), dtype=torch.uint8) for fmt in (cpu, other)]
        cpu.pack(w, bufs[0])
        other.pack(w, bufs[1])
        for a, b in zip(cpu.dequantize(bufs[0], d, f), other.dequantize(bufs[1], d, f)):
            assert torch.equal(a, b)
        x = torch.randn(3, d, generator=g).to(dtype)
        for rows in (x, x[:1]):  # a prompt's rows, and one decode row (float32: the C kernel)
            y0, y1 = cpu.expert(bufs[0], d, f)(rows).float(), other.expert(bufs[1], d, f)(rows).float()
            assert torch.allclose(y0, y1, rtol=2e-2, atol=2e-2)
    assert expert_format("auto", torch.bfloat16, torch.float32, "cpu") is CPU_FORMATS["f32"]  # the CPU default


# --- oneDNN's layout for resident bf16 matrices on the CPU (PackedLinear) -------------------------------
needs_onednn_bf16 = pytest.mark.skipif(not fm.onednn_bf16() or fm.onednn_may_use_amx(),
                                       reason="no packed experts here: this CPU's oneDNN has no bf16 kernels, or may "
                                              "take AMX")


@pytest.fixture
def without_kernels(monkeypatch):
    """As where native.py's library cannot be built: resident bf16 matrices pack for oneDNN."""
    monkeypatch.setattr(fm.native, "_library", lambda: None)


def test_nothing_packs_where_the_c_kernels_take_bf16_rows(monkeypatch):
    """The kernels read the plain layout, so with them every bf16 matrix stays one plain tensor."""
    monkeypatch.setattr(fm.native, "available", lambda: True)
    monkeypatch.setattr(fm, "onednn_may_use_amx", lambda: False)
    assert not fm.prepacks(torch.bfloat16, "cpu") and not fm.prepacks(torch.bfloat16, "cpu", expert=True)


def test_no_packed_experts_where_onednn_may_take_amx(monkeypatch, without_kernels):
    """With AMX the packed and the plain bf16 matmuls differ in the last bits, and an offloaded expert
    stays plain: so no packed expert where oneDNN may take AMX, unless oneDNN is capped below it.
    Matrices that are never offloaded pack either way."""
    bf16_kernels = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert fm.onednn_bf16() is bf16_kernels
    monkeypatch.setattr(fm, "onednn_may_use_amx", lambda: True)
    assert not fm.prepacks(torch.bfloat16, "cpu", expert=True)
    assert fm.prepacks(torch.bfloat16, "cpu") is bf16_kernels
    monkeypatch.setattr(fm, "onednn_may_use_amx", lambda: False)
    assert fm.prepacks(torch.bfloat16, "cpu", expert=True) is bf16_kernels
    assert not fm.prepacks(torch.float32, "cpu") and not fm.prepacks(torch.bfloat16, "cuda")
    monkeypatch.undo()  # the kernels too: what follows needs neither
    probe = fm.onednn_may_use_amx.__wrapped__  # uncached: reads the environment and the CPU each call
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu_says = probe()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert probe() is False  # capped below AMX
    for cap in ("AVX512_CORE_AMX", "ALL"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert probe() is cpu_says  # not capped below it: the CPU decides


@pytest.mark.parametrize("kernels", [True, False])
def test_resident_bf16_expert_computes_the_offloaded_ones_bits(monkeypatch, kernels):
    """Whatever this CPU packs, with native.py's kernels or without, a resident (settled) bf16 expert
    gives the bits of the plain expert an offload cache runs, at input sizes where AMX's packed kernel
    would differ (512 and up)."""
    if not kernels:
        monkeypatch.setattr(fm.native, "_library", lambda: None)
    fmt, hidden, inter = CPU_FORMATS["bf16"], 512, 256  # gate_up [512, 512], down [512, 256]
    expert = fmt.expert(packed(fmt, weights(hidden, inter)), hidden, inter)
    settled = fmt.settle(expert, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    for rows in (1, 2, 7, 64, 100):
        x = torch.randn(rows, hidden, generator=g).bfloat16()
        assert torch.equal(settled(x), expert(x))


@needs_onednn_bf16
@pytest.mark.parametrize("n,k", [(384, 128), (128, 192), (1280, 512), (4096, 128)])
def test_packed_linear_is_f_linear_bit_for_bit(n, k):
    """Only the layout changes: every token count gives F.linear's bits, so packing changes no number."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    m = fm.PackedLinear(w)
    assert m.nbytes == w.nbytes
    for rows in (1, 2, 7, 64, 100):
        x = torch.randn(rows, k, generator=g).bfloat16()
        assert torch.equal(m(x), F.linear(x, w))
    x = torch.randn(3, 2 * k, generator=g).bfloat16()[:, ::2]  # a strided view, as a chunk of gate_up is
    assert torch.equal(m(x), F.linear(x, w)) and m(x[None]).shape == (1, 3, n)


@needs_onednn_bf16
def test_settled_bf16_expert_on_the_cpu_is_packed_and_computes_the_same(without_kernels):
    fmt, hidden, inter = CPU_FORMATS["bf16"], 128, 192
    buf = packed(fmt, weights(hidden, inter))
    expert = fmt.expert(buf, hidden, inter)
    settled = fmt.settle(expert, torch.bfloat16)
    assert settled.buffer is None and settled.nbytes == expert.nbytes
    assert all(isinstance(p, fm.PackedLinear) for p in settled.parts.values())
    x = torch.randn(5, hidden).bfloat16()
    assert torch.equal(settled(x), expert(x)) and torch.equal(settled(x[:1]), expert(x[:1]))
    assert fmt.settle(expert, torch.float32) is expert  # float32 activations: the plain buffer upcasts
    assert FORMATS["bf16"].settle(expert, torch.bfloat16) is expert  # not output-major: stays as it is


def test_int8_many_rows_go_through_a_bf16_gemm_with_the_kernels_numbers(monkeypatch):
    """From INT8_GEMM_ROWS rows on, int8 weights are multiplied as converted bf16 (exact) by a GEMM, the
    scales applied to the output: the kernel's result but for one more bf16 rounding, over every chunk
    of output channels (N not a multiple of the chunk) and for a strided input, as a chunk of gate_up."""
    g = torch.Generator().manual_seed(3)
    n, k = 700, 384
    w = torch.randn(n, k, generator=g) * 0.02
    m = fm.Int8Linear.quantize(w.bfloat16())
    ref_w = m.q.float() * m.scale.float()[:, None]
    monkeypatch.setattr(fm, "GEMM_CHUNK_BYTES", 256 * 2 * k)  # chunks of 256 output channels
    chunk_rows = fm.GEMM_CHUNK_BYTES // (2 * k) // 64 * 64
    assert n % chunk_rows and n > chunk_rows  # several chunks, the last one partial
    for rows in (fm.INT8_GEMM_ROWS - 1, fm.INT8_GEMM_ROWS, 100):
        x = torch.randn(rows, 2 * k, generator=g).bfloat16()[:, ::2]
        y = m(x).float()
        ref = x.float() @ ref_w.t()
        assert ((y - ref).norm() / ref.norm()) < 8e-3
        kernel = torch.ops.aten._weight_int8pack_mm(x.contiguous(), m.q, m.scale).float()
        assert ((y - kernel).norm() / kernel.norm()) < 8e-3
        if rows < fm.INT8_GEMM_ROWS:
            assert torch.equal(y, kernel)  # below the threshold: the kernel itself


@pytest.mark.parametrize("amx", [False, True])
def test_int4_rows_take_the_shared_rows_kernel_unless_amx_makes_the_gemm_faster(monkeypatch, amx):
    """Where native.py's int4 kernel serves several rows per pass it takes every row count; on an AMX CPU
    _int4_gemm keeps INT4_GEMM_ROWS rows and more. The int2 path (gemm False) never takes the GEMM."""
    style, block = fm._int4_layout()
    if style != "halves" or block != 64:
        pytest.skip(f"this CPU's int4 layout is {style}{block}: torch's kernel")
    taken = []
    monkeypatch.setattr(fm.native, "available", lambda: True)
    monkeypatch.setattr(fm.native, "int4_shares_rows", lambda block: block == 64)
    monkeypatch.setattr(fm, "onednn_may_use_amx", lambda: amx)
    monkeypatch.setattr(fm.native, "int4_linear", lambda x, *a: taken.append("native") or x.new_zeros(x.shape[0], 64))
    monkeypatch.setattr(fm, "_int4_gemm", lambda x, *a: taken.append("gemm") or x.new_zeros(x.shape[0], 64))
    packed, sz = torch.zeros(64, 64, dtype=torch.uint8), torch.zeros(1, 64, 2, dtype=torch.bfloat16)
    for rows in (1, fm.INT4_GEMM_ROWS - 1, fm.INT4_GEMM_ROWS):
        fm._int4_product(torch.zeros(rows, 128, dtype=torch.bfloat16), packed, sz)
    fm._int4_product(torch.zeros(fm.INT4_GEMM_ROWS, 128, dtype=torch.bfloat16), packed, sz, gemm=False)
    assert taken == ["native", "native", "gemm" if amx else "native", "native"]


def test_int4_many_rows_go_through_a_bf16_gemm_with_the_kernels_numbers(monkeypatch, without_kernels):
    """Without native.py's shared-rows kernel, from INT4_GEMM_ROWS rows on, int4 weights are unpacked from
    torch's kernel's own layout into bf16 and multiplied by a GEMM: the kernel's result but for the
    weights' bf16 rounding, over every chunk of output blocks (the last one partial) and for a strided
    input; a matrix whose channels do not fill whole blocks stays on the kernel."""
    style, block = fm._int4_layout()
    if style != "halves":
        pytest.skip(f"this CPU's int4 layout is {style}{block}: the kernel computes every row count")
    g = torch.Generator().manual_seed(4)
    k = 256
    monkeypatch.setattr(fm, "GEMM_CHUNK_BYTES", 3 * block * 2 * k)  # chunks of 3 blocks
    for n in (7 * block, 7 * block + 32):
        m = fm.Int4Linear.quantize(torch.randn(n, k, generator=g) * 0.02)
        ref_w = fm._affine(fm._int4_unpack(m.packed, (style, block)), m.sz)
        for rows in (fm.INT4_GEMM_ROWS - 1, fm.INT4_GEMM_ROWS, 150):
            x = torch.randn(rows, 2 * k, generator=g).bfloat16()[:, ::2]
            y = m(x).float()
            ref = x.float() @ ref_w
            assert ((y - ref).norm() / ref.norm()) < 1e-2
            kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), m.packed, k // m.sz.shape[0], m.sz).float()
            assert ((y - kernel).norm() / kernel.norm()) < 1e-2
            if rows < fm.INT4_GEMM_ROWS or n % block:
                assert torch.equal(y, kernel)  # the kernel itself
            else:
                assert not torch.equal(y, kernel)  # the GEMM did run
