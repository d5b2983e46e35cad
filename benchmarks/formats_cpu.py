"""Expert formats on the CPU, one run: speed, size and quality of every format, and the options
behind the choices in model/formats.py. Prints markdown tables.

    python benchmarks/formats_cpu.py [--threads 2] [--reps 5] [--sections speed,quality,int2,fp8,kernels,int8-rows,int4-rows]

speed    one Scout-shaped expert (D=5120, F=8192: gate_up [5120, 16384], down [8192, 5120]), random
         bf16 weights (std 0.02), one token: seconds per expert call (best of --reps) and weight GB/s
         (the buffer's bytes / call time), bfloat16 and float32 activations; bytes per expert; the
         output's relative error ||y - y_ref|| / ||y_ref|| against the float32 SwiGLU of the bf16
         weights, for activations that are bf16 values (so both dtypes see the same numbers). The
         "bf16 on the CPU" rows: output-major, as CPU runs store 16-bit experts, and "resident":
         then re-laid for oneDNN (ExpertFormat.settle), as a resident expert is kept (bf16 only).
quality  int4 / int2 group sizes, symmetric vs asymmetric, HQQ vs round-to-nearest: reconstruction
         error on the embedded model's 128 real experts and output error on their SwiGLU with random
         activations, and on random Gaussian experts (D=256, F=512).
int2     the two ways to compute int2 with no 2-bit kernel: (a) unfold into the int4 kernel's bytes
         per call (by chunk size) and (b) dequantize into a reused bf16 scratch, then one matmul.
fp8      ways to multiply by fp8 weights (Scout's gate_up, one token): torch's own conversion, a
         256-entry lookup table, the float16 bit trick whole and by chunk size, torch._scaled_mm.
kernels  the int8 / int4 kernels with float32 activations: their float32 code vs rounding to bf16.
int8-rows  the int8 kernel vs a bf16 GEMM over converted weights, by rows (where INT8_GEMM_ROWS comes from).
int4-rows  the int4 kernel vs a bf16 GEMM over unpacked weights, by rows (where INT4_GEMM_ROWS comes from).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moestream.model.formats as fm
from moestream.model.formats import CPU_FORMATS, FORMATS, ExpertWeights, Int2, Int4

D, FF = 5120, 8192  # Scout's hidden and expert intermediate sizes (--hidden / --inter for a quick try)
MODEL = Path(fm.__file__).resolve().parents[1] / "data" / "default" / "model.safetensors"


def best_of(fn, reps: int) -> float:
    fn()  # warm: scratch buffers, oneDNN primitives
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def packed(fmt, w: ExpertWeights) -> torch.Tensor:
    buf = torch.empty(fmt.nbytes(w.down.shape[1], w.down.shape[0]), dtype=torch.uint8)
    fmt.pack(w, buf)
    return buf


def scout_expert(seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights((torch.randn(D, 2 * FF, generator=g) * 0.02).bfloat16(),
                         (torch.randn(FF, D, generator=g) * 0.02).bfloat16())


def speed(args) -> None:
    w = scout_expert()
    x = torch.randn(args.tokens, D, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    ref = swiglu(x, w.gate_up.float(), w.down.float())
    print(f"\n### One Scout-shaped expert (D={D}, F={FF}), {args.tokens} token(s), {torch.get_num_threads()} threads\n")
    print("| format | bytes per expert | pack s | bf16 act: s per call | GB/s | rel. error | "
          "f32 act: s per call | GB/s | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [(name, FORMATS[name]) for name in ("f32", "bf16", "int8", "int4")]
    runs += [("int4", Int4("int4", group=g)) for g in (32, 128) if g != FORMATS["int4"].group]
    runs += [("int2", FORMATS["int2"]), ("int2", Int2("int2", group=64)), ("fp8", FORMATS["fp8"])]
    runs += [("bf16 on the CPU", CPU_FORMATS["bf16"]), ("bf16 on the CPU, resident", CPU_FORMATS["bf16"])]
    for name, fmt in runs:
        t = time.perf_counter()
        buf = packed(fmt, w)
        expert = fmt.expert(buf, D, FF)
        settled = name.endswith("resident")  # as ResidentExperts keeps it: bf16 activations only
        if settled:
            expert = fmt.settle(expert, torch.bfloat16)
        pack_s = time.perf_counter() - t
        row = [f"{name} (`{fmt.signature}`)", f"{buf.numel():,}", f"{pack_s:.1f}"]
        for dtype in (torch.bfloat16,) if settled else (torch.bfloat16, torch.float32):
            xd = x.to(dtype)
            s = best_of(lambda: expert(xd), args.reps)
            row += [f"{s * 1e3:.2f} ms", f"{buf.numel() / s / 1e9:.1f}", f"{rel(expert(xd), ref):.2e}"]
        print("| " + " | ".join(row + ["—"] * (9 - len(row))) + " |")
        del buf, expert


def embedded_experts() -> list[ExpertWeights]:
    tensors = load_file(str(MODEL))
    out = []
    layer = 0
    while f"model.layers.{layer}.feed_forward.experts.gate_up_proj" in tensors:
        f = f"model.layers.{layer}.feed_forward.experts."
        gate_up, down = tensors[f + "gate_up_proj"], tensors[f + "down_proj"]
        out += [ExpertWeights(gate_up[e], down[e]) for e in range(gate_up.shape[0])]
        layer += 1
    return out


def quality(args) -> None:
    real = embedded_experts()
    g = torch.Generator().manual_seed(0)
    gauss = [ExpertWeights(torch.randn(256, 1024, generator=g) * 0.02, torch.randn(512, 256, generator=g) * 0.02)
             for _ in range(4)]
    def fmt_option(label, fmt):
        def dequant(w):
            return fmt.dequantize(packed(fmt, w), w.down.shape[1], w.down.shape[0])
        return label, fmt.nbytes(256, 512) / (3 * 256 * 512), dequant

    def int2_g16(label, iters):
        """No kernel takes groups of 16: quantized and dequantized straight, for the comparison."""
        def dequant(w):
            out = []
            for m in (w.gate_up, w.down):
                q, s, z = fm._quantize(m.t().float(), 16, 4, hqq_iters=iters)
                out.append(((q.float() - 8) * s.float().repeat_interleave(16, 1) + z.float().repeat_interleave(16, 1)).t())
            return out
        return label, 0.25 + 4 / 16, dequant

    options = [fmt_option("int8", FORMATS["int8"]), fmt_option("fp8", FORMATS["fp8"])]
    options += [fmt_option(f"int4 g{gs} {kind}", Int4("int4", group=gs, symmetric=kind == "sym", hqq_iters=20 * (kind == "asym HQQ 20")))
                for kind in ("asym", "sym", "asym HQQ 20") for gs in (32, 64, 128)]
    options += [int2_g16("int2 g16 round-to-nearest", 0), int2_g16("int2 g16 HQQ 20", 20)]
    options += [fmt_option(f"int2 g{gs} {'HQQ ' + str(it) if it else 'round-to-nearest'}", Int2("int2", group=gs, hqq_iters=it))
                for gs in (32, 64) for it in (0, 20)]
    options += [fmt_option(f"int2 g32 HQQ {it}", Int2("int2", group=32, hqq_iters=it)) for it in (1, 2, 5, 10, 50)]

    def errors(dequant, experts):
        dw = w2 = dy = y2 = 0.0
        for i, w in enumerate(experts):
            gate_up, down = dequant(w)
            x = torch.randn(32, w.down.shape[1], generator=torch.Generator().manual_seed(i))
            ref = swiglu(x, w.gate_up.float(), w.down.float())
            dw += (gate_up - w.gate_up.float()).square().sum().item() + (down - w.down.float()).square().sum().item()
            w2 += w.gate_up.float().square().sum().item() + w.down.float().square().sum().item()
            dy += (swiglu(x, gate_up, down) - ref).square().sum().item()
            y2 += ref.square().sum().item()
        return (dw / w2) ** 0.5, (dy / y2) ** 0.5

    print(f"\n### Quantization quality: {len(real)} real experts of the embedded model (D=128, F=192; "
          "K=192 takes groups of at most 64), 4 Gaussian experts (D=256, F=512)\n")
    print("| option | bytes/weight (D=256, F=512) | real: weight error | real: output error | "
          "Gaussian: weight error | Gaussian: output error | pack s (real) |")
    print("|---|---|---|---|---|---|---|")
    for label, bpw, dequant in options:
        t = time.perf_counter()
        real_w, real_y = errors(dequant, real)
        pack_s = time.perf_counter() - t
        gauss_w, gauss_y = errors(dequant, gauss)
        print(f"| {label} | {bpw:.3f} | {real_w:.4f} | {real_y:.4f} | {gauss_w:.4f} | {gauss_y:.4f} | {pack_s:.1f} |")


def int2_paths(args) -> None:
    """(a) the format's own matmul at several chunk sizes, (b) dequantize to a bf16 scratch + matmul."""
    w = scout_expert()
    x = torch.randn(args.tokens, D).bfloat16()
    print(f"\n### int2 compute paths, Scout-shaped expert, {args.tokens} token(s) (bytes: the int2 buffer)\n")
    print("| path | s per call | GB/s |")
    print("|---|---|---|")
    saved = fm.INT2_CHUNK_BYTES
    fmt = Int2("int2", group=FORMATS["int2"].group, hqq_iters=0)  # speed does not depend on the zero points
    for chunk in (1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 40):
        fm.INT2_CHUNK_BYTES = chunk
        buf = packed(fmt, w)
        expert = fmt.expert(buf, D, FF)
        s = best_of(lambda: expert(x), args.reps)
        label = "whole matrix" if chunk == 1 << 40 else f"{chunk >> 10} KiB"
        print(f"| (a) unfold to int4 bytes, chunks of {label} | {s * 1e3:.2f} ms | {buf.numel() / s / 1e9:.1f} |")
    fm.INT2_CHUNK_BYTES = saved
    # (b): codes 4 per byte along K and one (scale, zero - 8 * scale) per group, dequantized per call
    group = FORMATS["int2"].group
    mats = {}
    for which, m in (("gate_up", w.gate_up), ("down", w.down)):
        rows = m.t().float()
        q, s, z = fm._quantize(rows, group, 4)
        q = q.to(torch.uint8).view(rows.shape[0], -1, 4)
        codes = q[..., 0] | q[..., 1] << 2 | q[..., 2] << 4 | q[..., 3] << 6
        mats[which] = (codes, s, (z.float() - 8 * s.float()).bfloat16())
    nbytes = sum(c.numel() + 4 * s.numel() for c, s, _ in mats.values())

    def matmul(xx, which, step):
        codes, s, z = mats[which]
        n, k = codes.shape[0], codes.shape[1] * 4
        u8 = fm._scratch_buffer(step * k, torch.uint8, codes.device)
        bf = fm._scratch_buffer(step * k, torch.bfloat16, codes.device)
        ys = []
        for n0 in range(0, n, step):
            c = codes[n0:n0 + step]
            r = c.shape[0]
            q4 = u8[:r * k].view(r, k // 4, 4)
            for j in range(4):
                torch.bitwise_right_shift(c, 2 * j, out=q4[..., j]).bitwise_and_(3)
            wb = bf[:r * k].view(r, k // group, group)
            wb.copy_(q4.view(r, k // group, group))
            wb.mul_(s[n0:n0 + r, :, None]).add_(z[n0:n0 + r, :, None])
            ys.append(xx @ wb.view(r, k).t())
        return torch.cat(ys, dim=1)

    for step in (256, 1024, 1 << 20):
        def call():
            gate, up = matmul(x, "gate_up", step).chunk(2, dim=-1)
            return matmul(F.silu(gate) * up, "down", step)
        s = best_of(call, args.reps)
        label = "whole matrix" if step == 1 << 20 else f"chunks of {step} output channels"
        print(f"| (b) dequantize to bf16 scratch + matmul, {label} | {s * 1e3:.2f} ms | {nbytes / s / 1e9:.1f} |")


def fp8_paths(args) -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 2 * FF, D
    w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)  # Scout's gate_up, [out, in]
    exact = w.float()
    print(f"\n### fp8 weights [{n}, {k}] x {args.tokens} token(s): conversion + matmul (GB/s of fp8 bytes; exact: "
          "the converted weights equal w.float() bit for bit)\n")
    print("| path | into bf16, bf16 act: ms | GB/s | exact | into f32, f32 act: ms | GB/s | exact |")
    print("|---|---|---|---|---|---|---|")
    lut = {dt: torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(dt) for dt in (torch.bfloat16, torch.float32)}
    idx = torch.empty(n, k, dtype=torch.int32)

    def via_to(dt):
        return fm._scratch_buffer(n * k, dt, w.device).view(n, k).copy_(w)

    def via_lut(dt):
        scratch = fm._scratch_buffer(n * k, dt, w.device).view(n, k)
        idx.copy_(w.view(torch.uint8))
        return torch.index_select(lut[dt], 0, idx.view(-1), out=scratch.view(-1)).view(n, k)

    def via_bits(dt):
        return fm.fp8_to(w, dt)  # the values / 256, exactly

    for label, convert, factor in [("torch's own conversion (.to) of the whole matrix", via_to, 1),
                                   ("256-entry table (index_select), whole matrix", via_lut, 1),
                                   ("float16 bit trick (fp8_to), whole matrix", via_bits, 256)]:
        row = [label]
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(args.tokens, k).to(dt)
            s = best_of(lambda: x @ convert(dt).t(), args.reps)
            ok = torch.equal(convert(dt).float() * factor, exact)
            row += [f"{s * 1e3:.1f}", f"{n * k / s / 1e9:.2f}", "yes" if ok else "no"]
        print("| " + " | ".join(row) + " |")
    saved = fm.FP8_CHUNK_BYTES
    parts = {"w": w, "w_scale": torch.ones(n)}
    for chunk in (1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24, 1 << 40):
        fm.FP8_CHUNK_BYTES = chunk
        label = "whole matrix" if chunk == 1 << 40 else f"chunks of {chunk >> 20} MiB of float32"
        row = [f"the format's matmul: fp8_to into float32, {label}"]
        for dt in (torch.bfloat16, torch.float32):
            x = torch.randn(args.tokens, k).to(dt)
            s = best_of(lambda: FORMATS["fp8"].matmul(x, "w", parts), args.reps)
            row += [f"{s * 1e3:.1f}", f"{n * k / s / 1e9:.2f}", "yes (tests)"]
        print("| " + " | ".join(row) + " |")
    fm.FP8_CHUNK_BYTES = saved
    row = ["torch._scaled_mm (fp8 activations too: not exact)"]
    for dt in (torch.bfloat16, torch.float32):
        x8, one = torch.randn(args.tokens, k).to(torch.float8_e4m3fn), torch.tensor(1.0)
        try:
            s = best_of(lambda: torch._scaled_mm(x8, w.t(), scale_a=one, scale_b=one, out_dtype=dt), args.reps)
            row += [f"{s * 1e3:.1f}", f"{n * k / s / 1e9:.2f}", "n/a"]
        except RuntimeError as e:
            row += ["fails: " + str(e).split("\n")[0][:60], "", ""]
    print("| " + " | ".join(row) + " |")


def kernels(args) -> None:
    g = torch.Generator().manual_seed(0)
    k, n = D, 2 * FF
    x = torch.randn(args.tokens, k, generator=g)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    p4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    print(f"\n### int8 / int4 kernels on [{n} x {k}], {args.tokens} token(s): float32 activations as they are "
          "vs rounded to bfloat16 (GB/s of weight bytes)\n")
    print("| kernel | activations | ms | GB/s |")
    print("|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        s8 = torch.rand(n, generator=g).to(dt)
        sz = torch.rand(k // 128, n, 2, generator=g).to(dt)
        xd = x.to(dt)
        s = best_of(lambda: torch.ops.aten._weight_int8pack_mm(xd, w8, s8), args.reps)
        print(f"| int8 | {str(dt).removeprefix('torch.')} | {s * 1e3:.2f} | {n * k / s / 1e9:.1f} |")
        s = best_of(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xd, p4, 128, sz), args.reps)
        print(f"| int4 g128 | {str(dt).removeprefix('torch.')} | {s * 1e3:.2f} | {n * k / 2 / s / 1e9:.1f} |")


def int8_rows(args) -> None:
    """Where fm.INT8_GEMM_ROWS comes from: the int8 kernel against the converted-weights GEMM, by rows."""
    g = torch.Generator().manual_seed(0)
    k, n = D, 2 * FF
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s8 = (torch.rand(n, generator=g) * 1e-3).bfloat16()
    print(f"\n### int8 on [{n} x {k}] by rows: the weight-only kernel vs bf16 GEMM over converted weights "
          f"(model/formats.py _int8_gemm; used from {fm.INT8_GEMM_ROWS} rows)\n")
    print("| rows | kernel ms | GEMM ms | kernel / GEMM |")
    print("|---|---|---|---|")
    for rows in (1, 4, 8, 16, 24, 32, 64, 128, 512):
        x = torch.randn(rows, k, generator=g).bfloat16()
        a = best_of(lambda: torch.ops.aten._weight_int8pack_mm(x, q, s8), args.reps)
        b = best_of(lambda: fm._int8_gemm(x, q, s8), args.reps)
        print(f"| {rows} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} |")


def int4_rows(args) -> None:
    """Where fm.INT4_GEMM_ROWS comes from: the int4 kernel against the unpacked-weights GEMM, by rows."""
    g = torch.Generator().manual_seed(0)
    k, n = D, 2 * FF
    m = fm.Int4Linear.quantize(torch.randn(n, k, generator=g) * 0.02)
    block = fm._int4_layout()[1]
    print(f"\n### int4 on [{n} x {k}] by rows: the weight-only kernel vs bf16 GEMM over unpacked weights "
          f"(model/formats.py _int4_gemm; used from {fm.INT4_GEMM_ROWS} rows)\n")
    print("| rows | kernel ms | GEMM ms | kernel / GEMM |")
    print("|---|---|---|---|")
    for rows in (1, 16, 32, 64, 96, 128, 256, 512):
        x = torch.randn(rows, k, generator=g).bfloat16()
        a = best_of(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m.packed, k // m.sz.shape[0], m.sz), args.reps)
        b = best_of(lambda: fm._int4_gemm(x, m.packed, m.sz, block), args.reps)
        print(f"| {rows} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f} |")


SECTIONS = {"speed": speed, "quality": quality, "int2": int2_paths, "fp8": fp8_paths, "kernels": kernels,
            "int8-rows": int8_rows, "int4-rows": int4_rows}


def main() -> None:
    global D, FF
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per timing; the best is reported")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per expert call")
    ap.add_argument("--sections", default="speed,quality,int2,fp8,kernels,int8-rows,int4-rows", help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--hidden", type=int, default=D)
    ap.add_argument("--inter", type=int, default=FF)
    args = ap.parse_args()
    D, FF = args.hidden, args.inter
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for name in args.sections.split(","):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
