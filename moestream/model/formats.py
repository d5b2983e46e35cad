"""Expert formats: how one routed expert is stored, moved and multiplied (and Int8Linear, a resident
matrix in the int8 format's storage and kernel).

A format packs an expert's two matrices — gate_up [D, 2F] and down [F, D], x@W orientation — and
their scales into ONE contiguous byte buffer, so that wherever the expert lies (host RAM, the
repacked disk file, a device cache slot) moving it is a single copy, and it computes straight from
that buffer: mixed-precision kernels where they exist, never a dequantized copy of a whole layer.

    fmt = FORMATS["int8"]
    buf = torch.empty(fmt.nbytes(D, F), dtype=torch.uint8)
    fmt.pack(ExpertWeights(gate_up, down), buf)   # quantize once, at placement
    y = fmt.expert(buf, D, F)(x)                  # SwiGLU through the format's kernels

Every part of a buffer starts on an ALIGN-byte boundary, so its typed views (.view(dtype)) are
legal on any device and vectorised loads stay aligned.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import memory
from ..errors import MoestreamError
from . import native
from .native import onednn_may_use_amx

ALIGN = 64  # bytes: each part of a packed buffer starts on a cache-line boundary


@dataclass
class ExpertWeights:
    """One routed expert as a checkpoint gives it: float matrices, or fp8 ones with per-output-channel
    scales (the official FP8 checkpoints: w[i, o] * scale[o])."""

    gate_up: torch.Tensor  # [D, 2F]
    down: torch.Tensor  # [F, D]
    gate_up_scale: torch.Tensor | None = None  # [2F], when gate_up is float8_e4m3fn
    down_scale: torch.Tensor | None = None  # [D]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) in float32 (exact for float and fp8 weights alike)."""
        if self.gate_up_scale is None:
            return self.gate_up.float(), self.down.float()
        return (self.gate_up.float() * self.gate_up_scale.float(), self.down.float() * self.down_scale.float())


@dataclass(frozen=True)
class Part:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class Layout:
    """Named parts of one packed buffer, each at an ALIGN-aligned offset."""

    def __init__(self, parts: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.parts: dict[str, Part] = {}
        offset = 0
        for name, shape, dtype in parts:
            part = Part(offset, tuple(shape), dtype)
            self.parts[name] = part
            offset += -(-part.nbytes // ALIGN) * ALIGN
        self.nbytes = offset

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of a uint8 buffer [nbytes] (no copy)."""
        return {name: buffer[p.offset:p.offset + p.nbytes].view(p.dtype).view(p.shape) for name, p in self.parts.items()}


class Expert:
    """A callable routed expert over a packed buffer: SwiGLU down(silu(x Wg) * (x Wu)) through the
    format's matmul. `on_cpu` False: it runs where its buffer is (the compute device). buffer None:
    a resident expert whose parts were re-laid for good (ExpertFormat.settle); nbytes stays the buffer's.
    out_major: the parts are plain output-major matrices, so one float32 row on the CPU takes the
    dense MLP's C kernel (model/native.py) instead, as the shared expert does."""

    __slots__ = ("buffer", "parts", "matmul", "nbytes", "out_major")
    on_cpu = False

    def __init__(self, buffer: torch.Tensor | None, parts: dict[str, torch.Tensor], matmul, nbytes: int | None = None,
                 out_major: bool = False):
        self.buffer, self.parts, self.matmul, self.out_major = buffer, parts, matmul, out_major
        self.nbytes = buffer.numel() * buffer.element_size() if nbytes is None else nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_major and native.ready(x, self.parts["gate_up"], self.parts["down"]):
            return native.swiglu(x, self.parts["gate_up"], self.parts["down"])
        gate, up = self.matmul(x, "gate_up", self.parts).chunk(2, dim=-1)
        return self.matmul(F.silu(gate) * up, "down", self.parts)


# --- oneDNN's blocked layout for resident bf16 matrices on the CPU --------------------------------------
def prepacks(dtype: torch.dtype, device, expert: bool = False) -> bool:
    """Whether a resident matrix of this dtype on this device is reordered once into oneDNN's blocked
    layout (PackedLinear): bfloat16 on a CPU whose oneDNN has bf16 kernels, and only where native.py's
    C kernels are not built. Those take one bf16 row from the plain layout, faster than oneDNN's packed
    GEMV (Scout's gate_up, one row: 19 / 27 GB/s against 11 / 20 at 1 / 2 threads), so with them
    nothing packs: one copy of each matrix, and an offloaded expert (plain, it is copied) computes
    what a resident one does by construction. Without them, a resident expert packs only where oneDNN
    cannot take AMX: with AVX512-BF16 both layouts run one kernel family and agree bit for bit, but
    with AMX the packed and the plain matmul accumulate in other orders (seen on a Xeon: last-bit
    differences from 512 inputs on). Attention, shared experts and the lm_head are never offloaded:
    they pack wherever oneDNN can (on that Xeon a one-token GEMV 1.07-1.58x faster packed, 512 rows
    0.87-0.95x)."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not native.available()
            and onednn_bf16() and not (expert and onednn_may_use_amx()))


def onednn_bf16() -> bool:
    """Whether this torch's oneDNN has bf16 kernels for this CPU (what PackedLinear needs)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear:
    """A resident bf16 nn.Linear weight [N, K] on the CPU in oneDNN's blocked layout, multiplied by the
    oneDNN linear that reads it: where native.py's kernels are not built. A one-token GEMV over a
    Scout-sized matrix then reads 21 GB/s where F.linear reads 15 (2 threads; benchmarks/formats_cpu.py),
    prefill is no slower, and the result is F.linear's, bit for bit (tested), where `prepacks` allows
    experts: oneDNN computes both. The packed tensor is opaque (no view, no copy elsewhere), so only
    weights that stay put are packed."""

    __slots__ = ("w", "nbytes")

    def __init__(self, w: torch.Tensor):
        self.nbytes = w.numel() * w.element_size()  # the same elements, re-laid
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.w, None, "none", [], "")


class ExpertFormat:
    """How one expert is laid out and multiplied. Subclasses give layout(), pack(), matmul() and
    dequantize(); `name` is what --expert-dtype and the repacked file's header call it."""

    name = "?"
    raw_dtype: torch.dtype | None = None  # a fused checkpoint tensor of this dtype reads straight into the buffer

    def layout(self, hidden: int, inter: int) -> Layout:
        raise NotImplementedError

    def nbytes(self, hidden: int, inter: int) -> int:
        """Bytes of one packed expert: what host RAM, the disk file and the link hold per expert."""
        return self.layout(hidden, inter).nbytes

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> None:
        """Quantize or convert one expert into the uint8 buffer `out` (done once, at placement)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """x @ W for W = "gate_up" or "down", from the packed parts, in x's dtype."""
        raise NotImplementedError

    def dequantize(self, buffer: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) in float32, as the kernels see them: the reference the kernels are tested against."""
        raise NotImplementedError

    def expert(self, buffer: torch.Tensor, hidden: int, inter: int) -> Expert:
        return Expert(buffer, self.layout(hidden, inter).views(buffer), self.matmul)

    def settle(self, expert: Expert, compute_dtype: torch.dtype) -> Expert:
        """The expert as it stays for good (every expert resident, never copied again), computed at
        compute_dtype: a format may re-lay its parts for a faster kernel. By default it stays as it is."""
        return expert

    @property
    def signature(self) -> str:
        """Everything the bytes of a packed buffer depend on: a stored buffer is valid only under the
        same signature (a repacked file's header should record it, not just the name)."""
        return self.name


class Plain(ExpertFormat):
    """Unquantized: the matrices in one float dtype, back to back. Computed in the activations' dtype
    (f32 activations over bf16 weights upcast the weights, exactly).

    As the checkpoint has them (x@W, [K, N]), a fused checkpoint's slices of this dtype are read
    straight into the two parts (raw reads). out_major stores each matrix as W^T [N, K] (nn.Linear's
    orientation) and multiplies by native.linear instead (F.linear but for one float32 row, or a few
    bf16 ones, on the CPU: C kernels): what 16-bit experts use on the CPU, where torch's
    bf16 matmul reads a [K, N] matrix at 9.1 GB/s and the same matrix output-major at 16 (Scout's
    gate_up, one token, 2 threads); those buffers are packed (transposed), never read raw."""

    def __init__(self, name: str, dtype: torch.dtype, out_major: bool = False):
        self.name, self.dtype, self.out_major = name, dtype, out_major
        self.raw_dtype = None if out_major else dtype

    @property
    def signature(self) -> str:
        return f"{self.name}/out-major" if self.out_major else self.name

    def layout(self, hidden: int, inter: int) -> Layout:
        if self.out_major:
            return Layout([("gate_up", (2 * inter, hidden), self.dtype), ("down", (hidden, inter), self.dtype)])
        return Layout([("gate_up", (hidden, 2 * inter), self.dtype), ("down", (inter, hidden), self.dtype)])

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> None:
        gate_up, down = (weights.gate_up, weights.down) if weights.gate_up_scale is None else weights.dequantized()
        parts = self.layout(down.shape[1], down.shape[0]).views(out)
        parts["gate_up"].copy_(gate_up.t() if self.out_major else gate_up)
        parts["down"].copy_(down.t() if self.out_major else down)

    def matmul(self, x: torch.Tensor, which: str, parts: dict) -> torch.Tensor:
        w = parts[which]
        if isinstance(w, PackedLinear):
            return w(x)
        w = w if w.dtype == x.dtype else w.to(x.dtype)
        return native.linear(x, w) if self.out_major else x @ w

    def expert(self, buffer: torch.Tensor, hidden: int, inter: int) -> Expert:
        return Expert(buffer, self.layout(hidden, inter).views(buffer), self.matmul, out_major=self.out_major)

    def settle(self, expert: Expert, compute_dtype: torch.dtype) -> Expert:
        """Output-major bf16 computed in bf16 on the CPU, where `prepacks` says so (no C kernels): both
        matrices into oneDNN's layout (PackedLinear), the buffer let go."""
        if not (self.out_major and compute_dtype == self.dtype and prepacks(self.dtype, expert.buffer.device, expert=True)):
            return expert
        return Expert(None, {k: PackedLinear(w) for k, w in expert.parts.items()}, self.matmul, expert.nbytes)

    def dequantize(self, buffer: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.layout(hidden, inter).views(buffer)
        gate_up, down = parts["gate_up"].float(), parts["down"].float()
        return (gate_up.t(), down.t()) if self.out_major else (gate_up, down)


# --- quantized formats ---------------------------------------------------------------------------
#
# They keep each matrix output-major, W^T [N, K] (N output channels: 2F for gate_up, D for down; K
# the input dim), as torch's CPU weight-only kernels read it and the official FP8 checkpoints store
# it, and pack from float32 rows of W^T a few million weights at a time, so placement never holds a
# float32 copy of a whole expert. The int formats' scales and zero points are bfloat16 and the
# weights are quantized against the rounded values: the kernels read bfloat16 scales, so
# dequantize() is exact for both activation dtypes. Their fast paths take bfloat16 activations (the
# float32 versions are scalar loops, 12-30x slower: benchmarks/formats_cpu.py), so float32
# activations are rounded to bfloat16 on the way in and the result comes back as float32: an output
# error of about 2^-9 relative, far below the quantization error.

PACK_ELEMENTS = 1 << 22  # weights quantized per step of pack()
INT2_CHUNK_BYTES = 1 << 22  # int4-kernel bytes an int2 matrix expands to per kernel call (stays in L3)
FP8_CHUNK_BYTES = 1 << 22  # float32 scratch an fp8 matrix converts into per matmul step (stays in L3)


def _spans(n: int, k: int) -> list[tuple[int, int]]:
    """Output-channel ranges to quantize at a time: multiples of 64 rows (whole int4 kernel blocks)."""
    rows = max(64, PACK_ELEMENTS // k // 64 * 64)
    return [(n0, min(n, n0 + rows)) for n0 in range(0, n, rows)]


def _channels(w: torch.Tensor, scale: torch.Tensor | None, n0: int, n1: int) -> torch.Tensor:
    """Output channels n0..n1 of a checkpoint matrix (x@W, [K, N]) as float32 rows [n1 - n0, K]."""
    c = w[:, n0:n1].float()
    if scale is not None:
        c = c * scale[n0:n1].float()
    return c.t()


def _matrices(weights: ExpertWeights) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    return [("gate_up", weights.gate_up, weights.gate_up_scale), ("down", weights.down, weights.down_scale)]


def _dims(weights: ExpertWeights) -> tuple[int, int]:
    """(hidden, inter) of an expert, refusing matrices that do not fit together."""
    inter, hidden = weights.down.shape
    if tuple(weights.gate_up.shape) != (hidden, 2 * inter):
        raise MoestreamError(f"expert matrices gate_up {list(weights.gate_up.shape)} and down {list(weights.down.shape)} "
                             f"do not fit together (gate_up should be [{hidden}, {2 * inter}]): the checkpoint is malformed")
    return hidden, inter


def _check_dims(name: str, hidden: int, inter: int, multiple: int, instead: str) -> None:
    if hidden % multiple or inter % multiple or hidden <= 0 or inter <= 0:
        raise MoestreamError(f"--expert-dtype {name} needs hidden and intermediate sizes that are multiples of {multiple} "
                             f"(this model: {hidden} and {inter}): use --expert-dtype {instead}")


def _check_out(out: torch.Tensor, nbytes: int) -> None:
    if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous() or out.numel() < nbytes:
        raise ValueError(f"an expert packs into a contiguous 1-D uint8 buffer of {nbytes} bytes, "
                         f"not {out.dtype} {list(out.shape)}")


def _kernel_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as the CPU kernels need it: 2-D bfloat16, contiguous and 64-byte aligned (the int8 kernel's
    aligned loads fault on a misaligned view)."""
    x2 = x.reshape(-1, k).to(torch.bfloat16)
    if not x2.is_contiguous() or x2.data_ptr() % ALIGN:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2


_scratch = threading.local()


def _scratch_buffer(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused work buffer of n elements, one per (thread, dtype, device): what a call unpacks into,
    so that the per-call cost is the unpacking, not an allocation."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    key = (dtype, str(device))
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode alike
            buf = bufs[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n]


class _Quantized(ExpertFormat):
    """A format computed by torch's CPU weight-only kernels. Off the CPU (a GPU) it multiplies by the
    dequantized matrix: correct, not fast."""

    def matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if parts[which].device.type == "cpu":
            return self._cpu_matmul(x, which, parts)
        return x @ self.weight(parts, which).to(x.dtype)

    def dequantize(self, buffer: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.layout(hidden, inter).views(buffer)
        return self.weight(parts, "gate_up"), self.weight(parts, "down")

    def _cpu_matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, parts: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        """One matrix as the kernels see it: float32 [K, N], x@W orientation."""
        raise NotImplementedError


def _int8_rows(rows: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """Quantize float32 rows [n, K] into int8 q [n, K] with one bfloat16 scale per row (symmetric)."""
    s[:] = rows.abs().amax(dim=1) / 127
    step = s.float()
    q[:] = (rows / torch.where(step == 0, 1.0, step)[:, None]).round_().clamp_(-127, 127)


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] * s[:, None]).T on the CPU (bf16 activations): one row by native.py's
    kernel (the same formula, as fast as torch's on an EPYC and fewer torch ops a step); up to
    INT8_GEMM_ROWS - 1 rows by the weight-only int8 kernel, which reads 1 byte per weight but whose
    time grows with every row; from INT8_GEMM_ROWS rows on, as a bf16 GEMM over the weights converted
    a chunk at a time."""
    if q.data_ptr() % 16:
        raise ValueError("int8 weights must start on a 16-byte boundary (the kernel's aligned loads)")
    x2 = _kernel_rows(x, q.shape[1])
    if x2.shape[0] == 1 and native.available():
        y = native.int8_linear(x2, q, s)
    elif x2.shape[0] >= INT8_GEMM_ROWS:
        y = _int8_gemm(x2, q, s)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2, q, s)
    return y.view(*x.shape[:-1], q.shape[0]).to(x.dtype)


# Rows from which _int8_gemm beats the kernel. Scout's gate_up [16384, 5120], Xeon VM with AMX, 2
# threads: kernel 19.8 / 34.6 / 69.9 / 560 ms at 16 / 32 / 64 / 512 rows, the GEMM 19.8 / 23.1 / 28.1
# / 108.5 ms (benchmarks/formats_cpu.py --sections int8-rows prints both on any machine).
INT8_GEMM_ROWS = 32
GEMM_CHUNK_BYTES = 1 << 22  # bf16 weights converted (int8) or unpacked (int4) per GEMM step: stays in L2 / L3


def _int8_gemm(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x2 [T, K] bf16 @ (q * s[:, None]).T for many rows: int8 -> bf16 is exact, so each chunk of output
    channels is one bf16 product (native.linear: a prompt's rows through an expert in the C kernel, or
    oneDNN's GEMM, AMX where there is one) over its converted weights, and the scales multiply the
    [T, N] output instead of the weights. The output is rounded to bf16 once more than the kernel's
    (about 2^-9 relative), far below int8's quantization error."""
    n, k = q.shape
    rows = max(64, GEMM_CHUNK_BYTES // (2 * k) // 64 * 64)
    scratch = _scratch_buffer(min(n, rows) * k, torch.bfloat16, q.device)
    y = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x2.device)
    x2 = x2.contiguous()
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = scratch[:(n1 - n0) * k].view(n1 - n0, k)
        w.copy_(q[n0:n1])
        y[:, n0:n1] = native.linear(x2, w)
    return y.mul_(s.float()).to(torch.bfloat16)


@dataclass(eq=False)
class Int8Linear:
    """A resident nn.Linear weight [N, K] as per-output-channel int8 + bfloat16 scales (--resident-dtype
    int8): half of bf16's bytes, multiplied by the kernel int8 experts use. Off the CPU it multiplies
    by the dequantized matrix: correct, not fast."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # bfloat16 [N]

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8Linear":
        n, k = w.shape
        if k % 16:
            raise MoestreamError(f"--resident-dtype int8 needs input sizes that are multiples of 16 (a matrix of this "
                                 f"model has {k}): use --resident-dtype auto")
        q = memory.empty((n, k), torch.int8, w.device)
        s = torch.empty(n, dtype=torch.bfloat16, device=w.device)
        for n0, n1 in _spans(n, k):
            _int8_rows(w[n0:n1].float(), q[n0:n1], s[n0:n1])
        return cls(q, s)

    @staticmethod
    def nbytes_for(n: int, k: int) -> int:
        """Bytes of an [N, K] matrix in this storage (the planner's count)."""
        return n * k + 2 * n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.q.device.type == "cpu":
            return _int8_matmul(x, self.q, self.scale)
        return F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])


class Int8(_Quantized):
    """Per-output-channel symmetric int8, one bfloat16 scale per channel: w[k, n] = q[n, k] * scale[n].
    Computed by aten._weight_int8pack_mm, which reads 1 byte per weight (many rows: _int8_gemm)."""

    name = "int8"

    def layout(self, hidden: int, inter: int) -> Layout:
        _check_dims(self.name, hidden, inter, 16, "bf16")  # the kernel steps through K 16 at a time
        return Layout([("gate_up", (2 * inter, hidden), torch.int8), ("gate_up_scale", (2 * inter,), torch.bfloat16),
                       ("down", (hidden, inter), torch.int8), ("down_scale", (hidden,), torch.bfloat16)])

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> None:
        layout = self.layout(*_dims(weights))
        _check_out(out, layout.nbytes)
        parts = layout.views(out)
        for which, w, scale in _matrices(weights):
            q, s = parts[which], parts[which + "_scale"]
            for n0, n1 in _spans(*q.shape):
                _int8_rows(_channels(w, scale, n0, n1), q[n0:n1], s[n0:n1])

    def _cpu_matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return _int8_matmul(x, parts[which], parts[which + "_scale"])

    def weight(self, parts: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        return (parts[which].float() * parts[which + "_scale"].float()[:, None]).t()


# torch's int4 CPU kernel reads its weights in a layout of its own that depends on the CPU's vector
# width: W^T in blocks of `block` output channels, each block [K, block / 2] bytes, the two nibbles
# of a byte either channels j and j + block/2 ("halves", AVX2 / AVX-512) or j and j + 1 ("pairs",
# scalar code, and the last, narrower block always). _int4_layout() finds out which by packing a probe.
_INT4_LAYOUTS = [("halves", 64), ("halves", 32), ("pairs", 64), ("pairs", 32), ("pairs", 16)]
_int4_layout_found: list[tuple[str, int]] = []


def _int4_unpack(packed: torch.Tensor, layout: tuple[str, int]) -> torch.Tensor:
    """The codes [N, K] (uint8, 0..15) that aten._convert_weight_to_int4pack_for_cpu packed into `packed` [N, K/2]."""
    style, block = layout
    n, k = packed.shape[0], packed.shape[1] * 2
    lo, hi = packed & 15, packed >> 4
    codes = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    full = n // block * block
    if full:
        lo_b, hi_b = lo[:full].reshape(full // block, k, block // 2), hi[:full].reshape(full // block, k, block // 2)
        if style == "halves":
            vals = torch.cat([lo_b, hi_b], dim=2)
        else:
            vals = torch.stack([lo_b, hi_b], dim=3).reshape(full // block, k, block)
        codes[:full] = vals.transpose(1, 2).reshape(full, k)
    if full < n:
        tail = n - full
        vals = torch.stack([lo[full:].reshape(k, tail // 2), hi[full:].reshape(k, tail // 2)], dim=2).reshape(k, tail)
        codes[full:] = vals.t()
    return codes


def _int4_layout() -> tuple[str, int]:
    if not _int4_layout_found:
        probe = torch.randint(0, 16, (144, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)
        found = [lay for lay in _INT4_LAYOUTS
                 if packed.shape == (144, 32) and torch.equal(_int4_unpack(packed, lay).int(), probe)]
        if not found:
            raise MoestreamError(f"torch {torch.__version__} packs int4 weights in a layout moestream does not know: "
                                 "use --expert-dtype int8 or bf16")
        _int4_layout_found.append(found[0])
    return _int4_layout_found[0]


def _group(k: int, group: int) -> int:
    """The group size for input dim k: `group`, or the largest smaller one of 128/64/32 that divides k."""
    return next(g for g in (group, 128, 64, 32) if g <= group and k % g == 0)


def _quantize(w: torch.Tensor, group: int, levels: int, symmetric: bool = False,
              hqq_iters: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise quantization of rows w [R, K] in the int4 kernel's convention,
    w ~ (q - 8) * scale + zero, q in 0..levels-1: (q int32 [R, K], scale and zero bfloat16 [R, K/group]).

    Asymmetric: the group's [min, max] spans the levels (q = 0 is the min). Symmetric: zero = 0,
    scale = absmax / 7. hqq_iters > 0 then improves the zero points (_hqq_zero)."""
    r, k = w.shape
    g = w.reshape(r, k // group, group)
    if symmetric:
        scale = g.abs().amax(dim=2) / (levels // 2 - 1)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale = (hi - lo) / (levels - 1)
        zero = lo + 8 * scale
    if hqq_iters:
        zero = _hqq_zero(g, scale, zero, levels, hqq_iters)
    scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = ((g - z) / torch.where(s == 0, 1.0, s) + 8).round_().clamp_(0, levels - 1)
    return q.reshape(r, k).int(), scale, zero


def _hqq_zero(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int, iters: int,
              p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """HQQ's half-quadratic solver for the zero points of groups g [R, G, group] at fixed scales:
    alternate a shrinkage of the error (the proximal step of an l_p loss, p < 1, so that a few
    outliers do not drag a group's grid) and the closed-form zero point for the shrunk target,
    z = mean(w - shrink(err) - (q - 8) * s) = z + mean(clamp(err, -t, t)), t = |err|^(p-1) / beta.
    Each group keeps the zero point of its lowest absolute error; the loop ends early once none improves."""
    s = scale[..., None]
    inv = 1 / torch.where(s == 0, 1.0, s)
    z = zero[..., None].clone()
    best_z, best_err = z.clone(), torch.full_like(z, float("inf"))
    err, t = torch.empty_like(g), torch.empty_like(g)
    for _ in range(iters):
        # err = w - ((q - 8) * s + z), q the nearest level under the current zero point
        torch.sub(g, z, out=err).mul_(inv).add_(8).round_().clamp_(0, levels - 1).sub_(8).mul_(s)
        torch.sub(g, err, out=err).sub_(z)
        abs_err = torch.linalg.vector_norm(err, ord=1, dim=2, keepdim=True)
        better = abs_err < best_err
        if not bool(better.any()):
            break
        best_err, best_z = torch.where(better, abs_err, best_err), torch.where(better, z, best_z)
        torch.abs(err, out=t).add_(1e-8).pow_(p - 1).div_(beta)
        z = z + torch.minimum(torch.maximum(err, -t), t).mean(dim=2, keepdim=True)
        beta *= kappa
    return best_z[..., 0]


def _affine(codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """codes [N, K] and scales_and_zeros [K/group, N, 2] -> the weights float32 [K, N] as the int4
    kernel computes them: (q - 8) * scale + zero in float32 (the product is exact, so this rounds
    once, as the kernel's fused multiply-add does)."""
    n, k = codes.shape
    s, z = sz[..., 0].float().t()[..., None], sz[..., 1].float().t()[..., None]
    w = (codes.reshape(n, sz.shape[0], -1).float() - 8) * s + z
    return w.reshape(n, k).t()


class Int4(_Quantized):
    """Group-wise 4-bit, asymmetric (a bfloat16 scale and zero point per group of `group` input
    weights), computed by aten._weight_int4pack_mm_for_cpu from its own packed layout, 0.5 byte
    per weight + 4 bytes per group. An input dim that `group` does not divide gets the largest of
    128/64/32 that does; hidden and intermediate sizes must be multiples of 32. hqq_iters > 0
    optimises the zero points as int2 does (lower error, same bytes and speed, slower packing)."""

    def __init__(self, name: str = "int4", group: int = 128, symmetric: bool = False, hqq_iters: int = 0):
        if group not in (32, 64, 128):
            raise ValueError(f"int4 groups are 32, 64 or 128 weights, not {group}")
        self.name, self.group, self.symmetric, self.hqq_iters = name, group, symmetric, hqq_iters

    @property
    def signature(self) -> str:
        style, block = _int4_layout()
        kind = "sym" if self.symmetric else f"asym/hqq{self.hqq_iters}" if self.hqq_iters else "asym"
        return f"{self.name}/g{self.group}/{kind}/{style}{block}"

    def layout(self, hidden: int, inter: int) -> Layout:
        _check_dims(self.name, hidden, inter, 32, "int8, fp8 or bf16")
        parts = []
        for which, k, n in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
            parts += [(which, (n, k // 2), torch.uint8), (which + "_sz", (k // _group(k, self.group), n, 2), torch.bfloat16)]
        return Layout(parts)

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> None:
        layout = self.layout(*_dims(weights))
        _check_out(out, layout.nbytes)
        parts = layout.views(out)
        for which, w, scale in _matrices(weights):
            _int4_pack(lambda n0, n1: _channels(w, scale, n0, n1), parts[which], parts[which + "_sz"],
                       self.symmetric, self.hqq_iters)

    def _cpu_matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return _int4_matmul(x, parts[which], parts[which + "_sz"])

    def weight(self, parts: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        return _affine(_int4_unpack(parts[which], _int4_layout()), parts[which + "_sz"])


def _int4_pack(rows, packed: torch.Tensor, sz: torch.Tensor, symmetric: bool = False, hqq_iters: int = 0) -> None:
    """Quantize a matrix, given as rows(n0, n1) -> float32 output channels [n1 - n0, K], into the int4
    kernel's packed [N, K/2] and scales_and_zeros [K/group, N, 2], a few million weights at a time."""
    _int4_layout()  # a torch whose layout we cannot read back is refused before any work
    k = packed.shape[1] * 2
    for n0, n1 in _spans(packed.shape[0], k):
        q, s, z = _quantize(rows(n0, n1), k // sz.shape[0], 16, symmetric, hqq_iters)
        packed[n0:n1] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz[:, n0:n1] = torch.stack([s.t(), z.t()], dim=2)


def _int4_matmul(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W for W in the int4 kernel's packing, on the CPU (bf16 activations), by
    _int4_product's choice of kernel."""
    y = _int4_product(_kernel_rows(x, packed.shape[1] * 2), packed, sz)
    return y.view(*x.shape[:-1], packed.shape[0]).to(x.dtype)


def _int4_product(x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, gemm: bool = True) -> torch.Tensor:
    """x2 [T, K] as _kernel_rows gives them @ W: [T, N] bf16. native.py's kernel where the layout allows
    (the same formula; torch's is bound by its arithmetic, not by memory): for one row, and for any
    number where it reads the weights once for several rows, unless AMX makes _int4_gemm's bf16 GEMM
    faster from INT4_GEMM_ROWS rows; otherwise torch's kernel, whose time grows with every row, up to
    INT4_GEMM_ROWS - 1 rows, and _int4_gemm from there. gemm False: never _int4_gemm (whose scratch
    int2's unfolded chunk occupies)."""
    style, block = _int4_layout()
    halves = style == "halves" and packed.shape[0] % block == 0
    rows = x2.shape[0]
    by_gemm = gemm and halves and rows >= INT4_GEMM_ROWS
    if halves and native.available():
        if rows == 1 or (native.int4_shares_rows(block) and not (by_gemm and onednn_may_use_amx())):
            return native.int4_linear(x2, packed, sz, block)
    if by_gemm:
        return _int4_gemm(x2, packed, sz, block)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, packed.shape[1] * 2 // sz.shape[0], sz)


# Rows from which _int4_gemm beats torch's kernel. Scout's gate_up [16384, 5120], Xeon VM with AMX, 2
# threads: kernel 31 / 63 / 91 / 124 / 479 ms at 32 / 64 / 96 / 128 / 512 rows, the GEMM 57 / 57 / 60
# / 62 / 123 ms; down [5120, 8192] and a [1024, 5120] cross over at the same 64 rows
# (benchmarks/formats_cpu.py --sections int4-rows prints both on any machine). Unpacking costs
# several passes per weight where int8's conversion costs one, hence the later crossover. On an
# EPYC (Zen 5, no AMX) native.py's shared-rows kernel beats both at every count: 13 / 37 / 70 / 315 ms
# at 16 / 64 / 128 / 512 rows, against torch's kernel 20 / 79 / 153 / 625 and the GEMM 66 / 86 / 182
# / 421.
INT4_GEMM_ROWS = 64


def _int4_gemm(x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, block: int) -> torch.Tensor:
    """x2 [T, K] bf16 @ W for many rows. The kernel's layout keeps W^T in blocks of `block` output
    channels, [K, block / 2] bytes each, a byte holding channel j (low nibble) and j + block / 2 (high):
    a chunk of blocks unpacks with two contiguous passes into a reused [K, channels] bf16 scratch,
    becomes weights as q * scale + (zero - 8 * scale) in one more, and is one bf16 GEMM (oneDNN, AMX
    where there is one). The weights are rounded to bf16, and zero - 8 * scale with them: about 2^-8
    relative to the kernel's result, far below int4's quantization error."""
    n, k = packed.shape[0], packed.shape[1] * 2
    half, groups = block // 2, sz.shape[0]
    blocks = max(1, GEMM_CHUNK_BYTES // (2 * k * block))
    scratch = _scratch_buffer(blocks * block * k, torch.bfloat16, packed.device)
    codes = _scratch_buffer(blocks * half * k, torch.uint8, packed.device)
    by_block = packed.view(n // block, k, half)
    minus8 = torch.tensor(-8.0, dtype=torch.bfloat16)
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16, device=x2.device)
    for b0 in range(0, n // block, blocks):
        b1 = min(n // block, b0 + blocks)
        n0, n1 = b0 * block, b1 * block
        w = scratch[:(n1 - n0) * k].view(k, b1 - b0, 2, half)
        c = codes[:(b1 - b0) * half * k].view(b1 - b0, k, half)
        torch.bitwise_and(by_block[b0:b1], 15, out=c)
        w[:, :, 0].copy_(c.transpose(0, 1))
        torch.bitwise_right_shift(by_block[b0:b1], 4, out=c)
        w[:, :, 1].copy_(c.transpose(0, 1))
        scale = sz[:, n0:n1, 0].contiguous()
        zero = torch.addcmul(sz[:, n0:n1, 1], scale, minus8)
        by_group = w.view(groups, k // groups, n1 - n0)
        torch.addcmul(zero[:, None], by_group, scale[:, None], out=by_group)
        y[:, n0:n1] = x2 @ w.view(k, n1 - n0)
    return y


@dataclass(eq=False)
class Int4Linear:
    """A resident nn.Linear weight [N, K] in the int4 experts' format (--resident-dtype int4): group-wise
    4-bit, a bfloat16 scale and zero point per group of inputs as FORMATS["int4"] has them, a quarter of bf16's
    bytes plus 4 per group, multiplied by the same kernel. As llama.cpp's Q4_0 quantizes attention and
    the shared expert too. Off the CPU it multiplies by the dequantized matrix: correct, not fast."""

    packed: torch.Tensor  # uint8 [N, K/2]
    sz: torch.Tensor  # bfloat16 [K/group, N, 2]

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int4Linear":
        n, k = w.shape
        packed = memory.empty((n, k // 2), torch.uint8)
        sz = memory.empty((k // cls._group(k), n, 2), torch.bfloat16)
        _int4_pack(lambda n0, n1: w[n0:n1].float().cpu(), packed, sz)
        return cls(packed.to(w.device), sz.to(w.device))

    @classmethod
    def nbytes_for(cls, n: int, k: int) -> int:
        """Bytes of an [N, K] matrix in this storage (the planner's count)."""
        return n * k // 2 + 4 * n * (k // cls._group(k))

    @staticmethod
    def _group(k: int) -> int:
        """The group size for input dim k, refusing one the kernel cannot take (planner and loader alike)."""
        if k % 32:
            raise MoestreamError(f"--resident-dtype int4 needs input sizes that are multiples of 32 (a matrix of this "
                                 f"model has {k}): use --resident-dtype int8")
        return _group(k, FORMATS["int4"].group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type == "cpu":
            return _int4_matmul(x, self.packed, self.sz)
        return x @ _affine(_int4_unpack(self.packed, _int4_layout()), self.sz).to(x.dtype)



def _int2_rows(n: int, k: int) -> int:
    """Output channels per int4 kernel call of an int2 matrix: the largest multiple of 64 that divides
    n and expands to at most INT2_CHUNK_BYTES (at least 64); all n when 64 does not divide it."""
    if n % 64:
        return n
    fits = [r for r in range(64, n + 1, 64) if n % r == 0 and r * k // 2 <= INT2_CHUNK_BYTES]
    return fits[-1] if fits else 64


class Int2(_Quantized):
    """Group-wise 2-bit with HQQ-optimised zero points (a bfloat16 scale and zero per group), 0.25
    byte per weight + 4 bytes per group. There is no 2-bit kernel: the buffer holds the int4
    kernel's packed bytes with two of them folded into one (their nibbles are 0..3), and a call
    unfolds a cache-sized chunk of output channels at a time (a mask, a shift and a mask) into a
    reused scratch for the int4 kernels (native.py's or aten._weight_int4pack_mm_for_cpu, as _int4_product picks):
    measured 50x faster than dequantizing to bfloat16 and multiplying. Sizes must be multiples of 32;
    group 32, 64 or 128."""

    def __init__(self, name: str = "int2", group: int = 32, hqq_iters: int = 20):
        if group not in (32, 64, 128):
            raise ValueError(f"int2 groups are 32, 64 or 128 weights (the int4 kernel's), not {group}")
        self.name, self.group, self.hqq_iters = name, group, hqq_iters

    @property
    def signature(self) -> str:
        style, block = _int4_layout()
        return f"{self.name}/g{self.group}/hqq{self.hqq_iters}/{style}{block}/chunk{INT2_CHUNK_BYTES}"

    def layout(self, hidden: int, inter: int) -> Layout:
        _check_dims(self.name, hidden, inter, 32, "int8, fp8 or bf16")
        parts = []
        for which, k, n in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
            rows = _int2_rows(n, k)
            parts += [(which, (n, k // 4), torch.uint8),
                      (which + "_sz", (n // rows, k // _group(k, self.group), rows, 2), torch.bfloat16)]
        return Layout(parts)

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> None:
        layout = self.layout(*_dims(weights))
        _check_out(out, layout.nbytes)
        _int4_layout()
        parts = layout.views(out)
        for which, w, scale in _matrices(weights):
            folded, sz = parts[which], parts[which + "_sz"]
            chunks, groups, rows, _ = sz.shape
            k = folded.shape[1] * 4
            for c in range(chunks):
                q = torch.empty(rows, k, dtype=torch.int32)
                for r0, r1 in _spans(rows, k):
                    n0 = c * rows + r0
                    codes, s, z = _quantize(_channels(w, scale, n0, n0 + r1 - r0), k // groups, 4, hqq_iters=self.hqq_iters)
                    q[r0:r1] = codes
                    sz[c, :, r0:r1] = torch.stack([s.t(), z.t()], dim=2)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2).view(2, -1)
                folded[c * rows:(c + 1) * rows].view(-1).copy_(packed[0] | (packed[1] << 2))

    def _unfold(self, folded: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The int4 kernel's packed bytes of a chunk: first half the low two bits of each nibble pair,
        second half the high two."""
        half = out.view(2, -1)
        torch.bitwise_and(folded, 0x33, out=half[0])
        torch.bitwise_right_shift(folded, 2, out=half[1]).bitwise_and_(0x33)
        return out

    def _cpu_matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        folded, sz = parts[which], parts[which + "_sz"]
        chunks, groups, rows, _ = sz.shape
        k = folded.shape[1] * 4
        x2 = _kernel_rows(x, k)
        scratch = _scratch_buffer(rows * k // 2, torch.uint8, folded.device).view(rows, k // 2)
        ys = [_int4_product(x2, self._unfold(folded[c * rows:(c + 1) * rows].view(-1), scratch), sz[c], gemm=False)
              for c in range(chunks)]
        y = ys[0] if chunks == 1 else torch.cat(ys, dim=1)
        return y.view(*x.shape[:-1], folded.shape[0]).to(x.dtype)

    def weight(self, parts: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        folded, sz = parts[which], parts[which + "_sz"]
        chunks, _, rows, _ = sz.shape
        k = folded.shape[1] * 4
        out = []
        for c in range(chunks):
            packed = self._unfold(folded[c * rows:(c + 1) * rows].reshape(-1),
                                  torch.empty(rows, k // 2, dtype=torch.uint8, device=folded.device))
            out.append(_affine(_int4_unpack(packed, _int4_layout()), sz[c]))
        return torch.cat(out, dim=1)


def fp8_to(w: torch.Tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """float8_e4m3fn weights as `dtype`, each value divided by 256, exactly: the fp8 bits shifted into
    float16's (same mantissa, 5-bit exponent, sign in place) are the value / 256 for normal and
    subnormal numbers alike, and float16 converts to float32 exactly. Four vectorised passes
    instead of torch's scalar fp8 conversion (to float32; torch's float16 -> bfloat16 is scalar too).
    NaN codes become +-480. The result is a reused per-thread scratch unless `out` is given."""
    bits = _scratch_buffer(w.numel(), torch.int16, w.device).view(w.shape)
    bits.copy_(w.view(torch.int8))  # sign-extended: bit 15 is the sign
    bits.bitwise_left_shift_(7).bitwise_and_(-16512)  # 0xBF80: sign | exponent, mantissa
    half = bits.view(torch.float16)
    if dtype == torch.float16 and out is None:
        return half
    if out is None:
        out = _scratch_buffer(w.numel(), dtype, w.device).view(w.shape)
    return out.copy_(half)


class Fp8(ExpertFormat):
    """float8_e4m3fn weights with one float32 scale per output channel, w[k, n] = q[n, k] * scale[n],
    kept output-major like the official FP8 checkpoints' [out, in] tensors. An fp8 checkpoint's
    values are kept as they are (no requantisation); float weights are quantized with
    scale = amax over the input dim / 448.

    A call converts a cache-sized chunk of output channels at a time, exactly (fp8_to), into a
    reused float32 scratch, multiplies (float32 activations: bf16 ones convert exactly), and scales
    the output channels: x @ (w * scale) as (x @ w) * scale, w itself never rounded."""

    name = "fp8"
    signature = "fp8/out-major"  # the first fp8 layout (in 9090e64) was x@W: its buffers are not these

    def layout(self, hidden: int, inter: int) -> Layout:
        return Layout([("gate_up", (2 * inter, hidden), torch.float8_e4m3fn), ("gate_up_scale", (2 * inter,), torch.float32),
                       ("down", (hidden, inter), torch.float8_e4m3fn), ("down_scale", (hidden,), torch.float32)])

    def pack(self, weights: ExpertWeights, out: torch.Tensor) -> None:
        layout = self.layout(*_dims(weights))
        _check_out(out, layout.nbytes)
        parts = layout.views(out)
        for which, w, scale in _matrices(weights):
            q, s = parts[which], parts[which + "_scale"]
            if w.dtype == torch.float8_e4m3fn:  # the checkpoint's own values and scales
                q.copy_(w.t())
                s.copy_(scale.reshape(-1) if scale is not None else torch.ones(()))
                continue
            for n0, n1 in _spans(*q.shape):
                rows = _channels(w, scale, n0, n1)
                step = rows.abs().amax(dim=1) / 448
                step = torch.where(step == 0, 1.0, step)
                s[n0:n1] = step
                q[n0:n1] = (rows / step[:, None]).clamp_(-448, 448)

    def matmul(self, x: torch.Tensor, which: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        w, scale = parts[which], parts[which + "_scale"]
        n, k = w.shape
        x2 = x.reshape(-1, k).float()
        step = max(64, FP8_CHUNK_BYTES // (4 * k) // 64 * 64)
        ys = [x2 @ fp8_to(w[n0:n0 + step]).t() for n0 in range(0, n, step)]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
        return (y * (scale * 256)).to(x.dtype).view(*x.shape[:-1], n)

    def dequantize(self, buffer: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.layout(hidden, inter).views(buffer)
        return tuple((parts[w].float() * parts[w + "_scale"][:, None]).t() for w in ("gate_up", "down"))


FORMATS: dict[str, ExpertFormat] = {
    "f32": Plain("f32", torch.float32),
    "bf16": Plain("bf16", torch.bfloat16),
    "f16": Plain("f16", torch.float16),
    "int8": Int8(),
    "int4": Int4("int4", group=64),  # measured choices: benchmarks/formats_cpu.py
    "int2": Int2("int2", group=32),
    "fp8": Fp8(),
}
PLAIN_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CPU_FORMATS = {name: Plain(name, dtype, out_major=True) for dtype, name in PLAIN_NAMES.items()}


def expert_format(name: str, checkpoint_dtype: torch.dtype, compute_dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> ExpertFormat:
    """The format --expert-dtype names. "auto" quantizes nothing the checkpoint did not: an fp8 checkpoint's
    experts stay fp8; an unquantized one's are kept at the compute dtype, like the resident weights (a bf16
    checkpoint computed in float32 on a CPU stores float32 experts: a plain expert in another dtype than
    its activations would be converted whole at every call). 16-bit experts computed on the CPU are
    stored output-major (Plain's out_major); elsewhere as the checkpoint has them, so they read raw."""
    if name == "auto":
        name = "fp8" if checkpoint_dtype == torch.float8_e4m3fn else PLAIN_NAMES[compute_dtype]
    if torch.device(device).type == "cpu" and name in CPU_FORMATS:
        return CPU_FORMATS[name]
    return FORMATS[name]


def stored_expert_dtype(config) -> torch.dtype:
    """How a checkpoint of this config stores its routed experts, from config.json alone (the planner's
    "auto"): fp8 for fbgemm_fp8 exports, else its torch_dtype."""
    if config.quant_method == "fbgemm_fp8":
        return torch.float8_e4m3fn
    return {"float32": torch.float32, "float16": torch.float16}.get(config.torch_dtype, torch.bfloat16)
