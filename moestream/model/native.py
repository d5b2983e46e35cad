"""A decode step's float32 work on the CPU for one token, in C compiled once per machine.

A decode step of a small model is not bound by its weights but by its ops: torch dispatched 418 ops
for one token of the embedded model (~50 a layer: a norm is six kernels, RoPE goes through complex
views, each GEMV pays MKL's per-call cost) at 1-2 us each before any arithmetic, and on an AMD EPYC
its one-row float32 product read 11-13 GB/s where these loops read 15 on one thread and 40 on two
(benchmarks/native_cpu.py). So each step of a block (model/llama4.py: the attention inputs, the
output projection, the MoE inputs, a SwiGLU MLP or expert, the lm_head; one query's attention; a
chunked layer's cache step) is, for one float32 row on the CPU, one call here: about 190 torch ops a
token remain. One row through int8 or int4 weights (formats.py) is one call too, read from torch's
own packing: torch's int4 kernel is bound by its arithmetic (21 GB/s of a Scout expert on two EPYC
cores where these loops read 40), and where the CPU has AVX512-BF16 and VBMI the int4 loops take any
number of rows, four at a time per pass over the weights (a prompt's rows: 2x torch's kernel at 64
rows of Scout's gate_up). So are bf16 rows through plain bf16 weights, up to 127 of them (a decode
step, a batch's, a prompt's tokens through a routed expert): oneDNN's GEMV wants its own blocked
layout, which an offloaded expert (copied as it is stored) cannot keep, and reads 11 / 20 GB/s of
Scout's gate_up at 1 / 2 threads packed where this reads 19 / 27 unpacked; at 32 rows its GEMM
reorders the weights first and reaches 273-368 GFLOP/s where these tiles reach 409-417. Everything
else (a prompt's shared expert and attention, AMX's GEMMs, CUDA) stays with torch.

The kernels compute the same formulas in another order of float32 additions than torch (16 partial
sums added pairwise, then the tail; a scalar exp), so their results differ from torch's in the last
bits: tests hold them to torch's within float32 rounding, and the one-row steps to transformers'
logits. Every
one-row step of a run takes them, resident or offloaded, alone or batched, eager or through the
graph parts' CPU twin, so those agree with each other bit for bit as before.

The library is built with the machine's C compiler (`$CC`, else `cc`) for this CPU (`-march=native`)
into ~/.cache/moestream/native/ under a name that hashes the source, the flags, the compiler and the
CPU's flags (a VM moved to another CPU builds its own), written to a temporary name and renamed,
under a lock, and checked against torch before first use. With no compiler, a failed build or check,
or MOESTREAM_NATIVE=0, the steps stay torch's and `status()` says why (the LLM's notes repeat it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoestreamError
from ..files import FileLock, cache_dir, make_directory, temporary_name

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#define LANES 16

/* the products past the last whole vector, one by one: one copy of this code for every caller */
__attribute__((noinline)) static float tail(const float *restrict a, const float *restrict b, long k, long K, float s) {
    for (; k < K; k++) s += a[k] * b[k];
    return s;
}

/* 16 partial sums added pairwise (8, 4, 2, 1: a short chain where sixteen in a row would wait on
   each other) */
static inline float pairwise(const float *acc) {
    float t[8], u[4];
    for (int j = 0; j < 8; j++) t[j] = acc[j] + acc[j + 8];
    for (int j = 0; j < 4; j++) u[j] = t[j] + t[j + 4];
    return (u[0] + u[2]) + (u[1] + u[3]);
}

/* sum_k a[k] * b[k]: 16 partial sums over k mod 16 (one vector register), added pairwise, then the tail */
static inline float dot(const float *restrict a, const float *restrict b, long K) {
    long body = K - K % LANES;
    float acc[LANES] = {0};
    for (long k = 0; k < body; k += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[k + j] * b[k + j];
    return tail(a, b, body, K, pairwise(acc));
}

/* --- rows of a matrix-vector product shared out among threads ------------------------------------
   A one-row product reads its matrix once, so it is bound by memory, and two cores read about twice
   what one does. The rows are shared out by OpenMP, built in only where it is torch's own runtime
   (libgomp.so.1, loaded by torch before this library): the same threads, as many as
   torch.set_num_threads gives, spinning and sleeping as torch's do, so the two never fight over the
   cores (a second team of threads, tried first, made decoding 4x slower while torch's spun). Each output row is
   computed whole by one thread, so the split never changes a bit. */
typedef struct job {
    void (*rows)(const struct job *, long, long);
    const float *w, *x, *r;
    float *y;
    long N, K; /* N units (rows, or blocks of rows) of K weights each */
    /* the quantized products' (int8, int4): weights, bfloat16 scales (and zero points), bfloat16
       output, the row's inputs summed per group, and the shapes */
    const void *q;
    const uint16_t *s;
    uint16_t *out;
    const float *xs;
    const uint16_t *xb; /* the row's inputs as given, bfloat16 */
    long k, group, half;
    long M; /* input rows (bfloat16 products of a few rows) */
} job;

#define PARALLEL_ELEMENTS 16384 /* smaller products stay on the calling thread */

static void run(const job *j) {
#if defined(_OPENMP)
    if (j->N >= 2 && j->N * j->K >= PARALLEL_ELEMENTS && omp_get_max_threads() > 1 && !omp_in_parallel()) {
        #pragma omp parallel
        {
            long parts = omp_get_num_threads(), part = omp_get_thread_num();
            long per = (j->N + parts - 1) / parts, n0 = part * per, n1 = n0 + per < j->N ? n0 + per : j->N;
            if (n0 < n1) j->rows(j, n0, n1);
        }
        return;
    }
#endif
    j->rows(j, 0, j->N);
}

static void gemv_rows(const job *j, long n0, long n1) {
    for (long n = n0; n < n1; n++) j->y[n] = dot(j->w + n * j->K, j->x, j->K);
}

static void gemv_add_rows(const job *j, long n0, long n1) {
    for (long n = n0; n < n1; n++) j->y[n] = j->r[n] + dot(j->w + n * j->K, j->x, j->K);
}

/* a[f] = silu(gate_f x) * (up_f x): rows f of gate and F + f of up */
static void swiglu_rows(const job *j, long f0, long f1) {
    for (long f = f0; f < f1; f++) {
        float g = dot(j->w + f * j->K, j->x, j->K), u = dot(j->w + (j->N + f) * j->K, j->x, j->K);
        j->y[f] = g / (1.0f + expf(-g)) * u;
    }
}

/* --- quantized weights, bfloat16 in and out (formats.py's int8 and int4) -------------------------
   The formulas of torch's CPU kernels (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu)
   for one row, read from their own layouts: the input rounded to bfloat16, float32 sums, the output
   rounded to bfloat16 once. The weights are widened in registers, never dequantized to memory. Left
   to the compiler these loops vectorised badly (slower than torch's), so on x86 they are written
   with AVX-512 or AVX2 intrinsics; each way makes the same fused multiply-adds in the same order as
   the plain C beside it, so they give the same bits. Where the CPU has AVX512-BF16 and VBMI, int4
   takes bfloat16 dot products instead (two products a lane, so other last bits than the plain C).
   One build runs one of them for every row of a run, so resident, offloaded and batched agree. */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

static inline float bf16_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline uint16_t f32_bf16(float f) { /* round to nearest even, as torch; NaN stays NaN */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* The weights of a plain matrix, widened to float32: int8 codes or bfloat16 values */
enum { INT8, BF16 };

static inline float weight(int kind, const void *w, long i) {
    return kind == INT8 ? (float)((const int8_t *)w)[i] : bf16_f32(((const uint16_t *)w)[i]);
}

#if defined(__AVX512F__)
static inline __m512 weights16(int kind, const void *w, long i) {
    if (kind == INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 weights8(int kind, const void *w, long i) {
    if (kind == INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* Row n's output from its partial sums acc[l] (over k = l mod 16): added pairwise as dot() does, the
   tail, the channel's scale (int8), rounded to bfloat16 */
static inline uint16_t row_out(const job *j, const float *acc, int kind, long n, long body, const float *x) {
    float sum = pairwise(acc);
    for (long k = body; k < j->K; k++) sum = fmaf(weight(kind, j->q, n * j->K + k), x[k], sum);
    return f32_bf16(kind == INT8 ? sum * bf16_f32(j->s[n]) : sum);
}

/* Rows at a time: each load of x serves them all, and more streams of weights in flight read more of
   the memory's bandwidth (int8 from DRAM, one EPYC thread: 11 GB/s four at a time, 15 sixteen).
   AVX2 has registers for four. */
#if defined(__AVX512F__)
#define WIDE 16
#else
#define WIDE 4
#endif
/* y[n] = (scale[n] *) sum_k w[n, k] x[k] for w [N, K] int8 (one bfloat16 scale per output channel) or
   bfloat16, the weights widened in registers, WIDE rows at a time */
static inline __attribute__((always_inline)) void widened_rows(const job *j, long n0, long n1, int kind) {
    const long K = j->K, body = K - K % LANES;
    const float *x = j->x;
    long n = n0;
    for (; n + WIDE <= n1; n += WIDE) {
        const long w = n * K;
        float acc[WIDE][LANES];
#if defined(__AVX512F__)
        __m512 a[WIDE];
        for (int r = 0; r < WIDE; r++) a[r] = _mm512_setzero_ps();
        for (long k = 0; k < body; k += LANES) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            for (int r = 0; r < WIDE; r++) a[r] = _mm512_fmadd_ps(weights16(kind, j->q, w + r * K + k), xv, a[r]);
        }
        for (int r = 0; r < WIDE; r++) _mm512_storeu_ps(acc[r], a[r]);
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 a[WIDE][2];
        for (int r = 0; r < WIDE; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
        for (long k = 0; k < body; k += LANES) {
            const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < WIDE; r++) {
                a[r][0] = _mm256_fmadd_ps(weights8(kind, j->q, w + r * K + k), x0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(weights8(kind, j->q, w + r * K + k + 8), x1, a[r][1]);
            }
        }
        for (int r = 0; r < WIDE; r++) { _mm256_storeu_ps(acc[r], a[r][0]); _mm256_storeu_ps(acc[r] + 8, a[r][1]); }
#else
        for (int r = 0; r < WIDE; r++)
            for (int l = 0; l < LANES; l++) acc[r][l] = 0.0f;
        for (long k = 0; k < body; k += LANES)
            for (int r = 0; r < WIDE; r++)
                for (int l = 0; l < LANES; l++) acc[r][l] = fmaf(weight(kind, j->q, w + r * K + k + l), x[k + l], acc[r][l]);
#endif
        for (int r = 0; r < WIDE; r++) j->out[n + r] = row_out(j, acc[r], kind, n + r, body, x);
    }
    for (; n < n1; n++) { /* the last rows, one by one: the same sums */
        float acc[LANES] = {0};
        for (long k = 0; k < body; k += LANES)
            for (int l = 0; l < LANES; l++) acc[l] = fmaf(weight(kind, j->q, n * K + k + l), x[k + l], acc[l]);
        j->out[n] = row_out(j, acc, kind, n, body, x);
    }
}

static void int8_rows(const job *j, long n0, long n1) { widened_rows(j, n0, n1, INT8); }

/* Where the CPU has AVX512-BF16, bfloat16 weights take bfloat16 dot products instead (vdpbf16ps: two
   exact products added per lane, 32 multiply-adds an instruction, no widening): lane l sums inputs
   32i + 2l and 32i + 2l + 1, so other last bits than the widening path. WIDE rows at a time, then
   the last ones singly, with the same sums. */
#if defined(__AVX512BF16__)
static inline __attribute__((always_inline)) void bf16_dots(const job *j, long n, const int rows) {
    const long K = j->K, body = K - K % 32;
    const uint16_t *w = (const uint16_t *)j->q + n * K;
    __m512 a[WIDE];
    for (int r = 0; r < rows; r++) a[r] = _mm512_setzero_ps();
    for (long k = 0; k < body; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(j->xb + k);
        for (int r = 0; r < rows; r++) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), xv);
    }
    for (int r = 0; r < rows; r++) {
        float acc[LANES];
        _mm512_storeu_ps(acc, a[r]);
        j->out[n + r] = row_out(j, acc, BF16, n + r, body, j->x);
    }
}
#endif

static void bf16_rows(const job *j, long n0, long n1) {
#if defined(__AVX512BF16__)
    long n = n0;
    for (; n + WIDE <= n1; n += WIDE) bf16_dots(j, n, WIDE);
    for (; n < n1; n++) bf16_dots(j, n, 1);
#else
    widened_rows(j, n0, n1, BF16);
#endif
}

/* Several bfloat16 rows x [M, K] (a batch's decode step, or a prompt's rows through an expert)
   against the same weights: tiles of TN weight rows by TM input rows, each weight vector loaded once
   for TM rows, the tile's weights read from memory on its first pass and from L2 on the others (M /
   TM passes), while the next tile's weights are prefetched into L2 a line per step. Without that
   prefetch the first pass waits on memory; with it, 32 rows through Scout's gate_up on two EPYC
   cores run at 417 GFLOP/s, of a 467 peak (oneDNN: 278 from x w^T, 368 from w x^T). Every (m, n)
   sum is the one-row kernel's, term for term in the same order, so each row gets the bits it has
   alone, whatever the rows beside it. AVX-512 only; elsewhere the rows go one by one. */
#define TN 6
#define TM 4
#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
#define STEP 32 /* inputs per multiply-add vector */
typedef __m512bh vin;
#define LOAD_X(j, i) ((__m512bh)_mm512_loadu_si512((j)->xb + (i)))
#define LOAD_W(w, i) ((__m512bh)_mm512_loadu_si512((w) + (i)))
#define MADD(a, w, x) _mm512_dpbf16_ps(a, w, x)
#else
#define STEP LANES
typedef __m512 vin;
#define LOAD_X(j, i) _mm512_loadu_ps((j)->x + (i))
#define LOAD_W(w, i) weights16(BF16, w, i)
#define MADD(a, w, x) _mm512_fmadd_ps(w, x, a)
#endif
/* rows n..n + tn of the weights by rows m..m + tm of x; *ahead (up to end) the next line to prefetch */
static inline __attribute__((always_inline)) void bf16_tile(const job *j, long n, long m, const int tn, const int tm,
                                                            const char **ahead, const char *end) {
    const long K = j->K, body = K - K % STEP;
    const uint16_t *w = (const uint16_t *)j->q + n * K;
    const char *line = *ahead;
    __m512 a[TN][TM];
    for (int r = 0; r < tn; r++)
        for (int i = 0; i < tm; i++) a[r][i] = _mm512_setzero_ps();
    for (long k = 0; k < body; k += STEP) {
        if (line < end) { _mm_prefetch(line, _MM_HINT_T1); line += 64; }
        vin xv[TM];
        for (int i = 0; i < tm; i++) xv[i] = LOAD_X(j, (m + i) * K + k);
        for (int r = 0; r < tn; r++) {
            const vin wv = LOAD_W(w, r * K + k);
            for (int i = 0; i < tm; i++) a[r][i] = MADD(a[r][i], wv, xv[i]);
        }
    }
    *ahead = line;
    for (int r = 0; r < tn; r++)
        for (int i = 0; i < tm; i++) {
            float acc[LANES];
            _mm512_storeu_ps(acc, a[r][i]);
            j->out[(m + i) * j->N + n + r] = row_out(j, acc, BF16, n + r, body, j->x + (m + i) * K);
        }
}

/* Whole tiles for each count of rows left (constants, so that the sums stay in registers); a last
   partial tile of weight rows takes the general loop */
static void bf16_tiles(const job *j, long n0, long n1) {
    const uint16_t *w = (const uint16_t *)j->q;
    for (long n = n0; n < n1; n += TN) {
        const long tn = n1 - n < TN ? n1 - n : TN, next = n + tn, last = n1 - next < TN ? n1 : next + TN;
        const char *ahead = (const char *)(w + next * j->K), *end = (const char *)(w + last * j->K);
        for (long m = 0; m < j->M; m += TM) {
            const long left = j->M - m;
            if (tn < TN) bf16_tile(j, n, m, tn, left < TM ? left : TM, &ahead, end);
            else if (left >= TM) bf16_tile(j, n, m, TN, TM, &ahead, end);
            else if (left == 3) bf16_tile(j, n, m, TN, 3, &ahead, end);
            else if (left == 2) bf16_tile(j, n, m, TN, 2, &ahead, end);
            else bf16_tile(j, n, m, TN, 1, &ahead, end);
        }
    }
}
#endif

/* One block of 2 * half output channels of a group-wise int4 matrix in torch's CPU packing: the
   block is [K, half] bytes, byte c of input k holding channel c (low nibble) and c + half (high);
   scales and zero points sz [K / group, N, 2]. Each weight is (q - 8) * scale + zero, so a group's
   share of an output is scale * sum(q x) + (zero - 8 scale) * sum(x): the inner loop is a widening
   and a multiply-add per weight, with the block's sums in registers, two sets of them (even and odd
   inputs, added at the group's end) so that each multiply-add need not wait for the one before.
   half: 16 or 32 (the vector paths), or any even number up to 64 (the plain C). */
#if defined(__AVX512F__)
#define VLANES 16
typedef __m512 vfloat;
#define VZERO() _mm512_setzero_ps()
#define VSET1(v) _mm512_set1_ps(v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
/* 16 code bytes -> 16 floats per nibble: each byte widened once, then its two nibbles split */
static inline void codes16(const uint8_t *r, vfloat *lo, vfloat *hi) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)r));
    lo[0] = _mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(15)));
    hi[0] = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define VLANES 8
typedef __m256 vfloat;
#define VZERO() _mm256_setzero_ps()
#define VSET1(v) _mm256_set1_ps(v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
static inline void codes16(const uint8_t *r, vfloat *lo, vfloat *hi) {
    for (int i = 0; i < 2; i++) {
        const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(r + 8 * i)));
        lo[i] = _mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32(15)));
        hi[i] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4));
    }
}
#endif

/* A group's sums into the block's outputs: y = fma(zero - 8 scale, sum(x), fma(scale, acc, y)) */
static inline void int4_scale(float *y, const float *acc, const uint16_t *sz, float xs, long channels) {
    for (long c = 0; c < channels; c++) {
        const float s = bf16_f32(sz[2 * c]), z = bf16_f32(sz[2 * c + 1]);
        y[c] = fmaf(fmaf(-8.0f, s, z), xs, fmaf(s, acc[c], y[c]));
    }
}

static inline __attribute__((always_inline)) void int4_block(const job *j, long b, long m, const long half) {
    const long K = j->k, group = j->group, N = j->N * 2 * half;
    const float *x = j->x + m * K, *xs = j->xs + m * (K / group);
    const uint8_t *p = (const uint8_t *)j->q + b * K * half;
    float y[128] = {0}, acc[128];
    for (long g = 0; g < K / group; g++) {
#if defined(VLANES)
        if (half == 16 || half == 32) {
            vfloat a[2][64 / VLANES];
            for (long v = 0; v < 2 * half / VLANES; v++) a[0][v] = a[1][v] = VZERO();
            for (long k = g * group; k < (g + 1) * group; k += 2)
                for (long odd = 0; odd < 2; odd++) {
                    const vfloat xk = VSET1(x[k + odd]);
                    for (long c = 0; c < half / 16; c++) {
                        vfloat lo[16 / VLANES], hi[16 / VLANES];
                        codes16(p + (k + odd) * half + 16 * c, lo, hi);
                        for (long i = 0; i < 16 / VLANES; i++) {
                            vfloat *e = a[odd] + (16 * c) / VLANES + i, *f = a[odd] + (half + 16 * c) / VLANES + i;
                            *e = VFMA(xk, lo[i], *e);
                            *f = VFMA(xk, hi[i], *f);
                        }
                    }
                }
            for (long v = 0; v < 2 * half / VLANES; v++) VSTORE(acc + v * VLANES, VADD(a[0][v], a[1][v]));
        } else
#endif
        {
            float odd[128];
            for (long c = 0; c < 2 * half; c++) acc[c] = odd[c] = 0.0f;
            for (long k = g * group; k < (g + 1) * group; k++) {
                const float xk = x[k];
                const uint8_t *r = p + k * half;
                float *e = k & 1 ? odd : acc;
                for (long c = 0; c < half; c++) {
                    e[c] = fmaf(xk, (float)(r[c] & 15), e[c]);
                    e[c + half] = fmaf(xk, (float)(r[c] >> 4), e[c + half]);
                }
            }
            for (long c = 0; c < 2 * half; c++) acc[c] += odd[c];
        }
        int4_scale(y, acc, j->s + (g * N + b * 2 * half) * 2, xs[g], 2 * half);
    }
    for (long c = 0; c < 2 * half; c++) j->out[m * N + b * 2 * half + c] = f32_bf16(y[c]);
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
/* Blocks of 64 channels (half 32) where the CPU has AVX512-BF16 and VBMI: two inputs at a time by
   bfloat16 dot products (vdpbf16ps: two exact products added per lane, 32 multiply-adds an
   instruction): the bytes of inputs k and k + 1 are paired per channel (vpermb), each nibble looked
   up as a bfloat16 (vpermw over bf16(i & 15) for i < 32), and a pair of inputs multiplies a pair of
   codes: a third of the instructions of the widening path. The codes looked up for a pair of inputs
   serve up to TILE4 rows of x (a prompt's rows through an expert), so the lookups are paid once per
   tile while each row's sums stay the ones it has alone. Rows m..m + tm of block b. */
#define TILE4 4
static inline __attribute__((always_inline)) void int4_dots(const job *j, long b, long m, const int tm) {
    const long K = j->k, group = j->group, N = j->N * 64, groups = K / group;
    const uint8_t *p = (const uint8_t *)j->q + b * K * 32;
    uint16_t codes[32];
    for (int i = 0; i < 32; i++) { union { float f; uint32_t u; } v = {(float)(i & 15)}; codes[i] = v.u >> 16; }
    const __m512i table = _mm512_loadu_si512(codes);
    __m512i pick[2];
    for (int c = 0; c < 2; c++) {
        uint8_t idx[64] = {0};
        for (int i = 0; i < 16; i++) { idx[4 * i] = 16 * c + i; idx[4 * i + 2] = 32 + 16 * c + i; }
        pick[c] = _mm512_loadu_si512(idx);
    }
    float y[TILE4][64], acc[64];
    for (int i = 0; i < tm; i++)
        for (int c = 0; c < 64; c++) y[i][c] = 0.0f;
    for (long g = 0; g < groups; g++) {
        __m512 a[TILE4][4];
        for (int i = 0; i < tm; i++)
            for (int v = 0; v < 4; v++) a[i][v] = _mm512_setzero_ps();
        for (long k = g * group; k < (g + 1) * group; k += 2) {
            const __m512i rows = _mm512_loadu_si512(p + k * 32); /* input k's 32 bytes, then k + 1's */
            __m512bh w[4]; /* channels 16c.. (low nibbles) and 32 + 16c.. (high) */
            for (int c = 0; c < 2; c++) {
                const __m512i d = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, pick[c], rows);
                w[c] = (__m512bh)_mm512_permutexvar_epi16(d, table);
                w[2 + c] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), table);
            }
            for (int i = 0; i < tm; i++) {
                uint32_t pair;
                memcpy(&pair, j->xb + (m + i) * K + k, 4);
                const __m512bh xk = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int v = 0; v < 4; v++) a[i][v] = _mm512_dpbf16_ps(a[i][v], w[v], xk);
            }
        }
        for (int i = 0; i < tm; i++) {
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + 16 * v, a[i][v]);
            int4_scale(y[i], acc, j->s + (g * N + b * 64) * 2, j->xs[(m + i) * groups + g], 64);
        }
    }
    for (int i = 0; i < tm; i++)
        for (int c = 0; c < 64; c++) j->out[(m + i) * N + b * 64 + c] = f32_bf16(y[i][c]);
}
#endif

/* Rows of x one pass over the weights serves (Python reads it: where it is 1, many rows are torch's) */
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
const long int4_shared_rows = TILE4;
#else
const long int4_shared_rows = 1;
#endif

/* Blocks b0..b1 for every row of x */
static void int4_rows(const job *j, long b0, long b1) {
    for (long b = b0; b < b1; b++) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
        if (j->half == 32) {
            long m = 0;
            for (; m + TILE4 <= j->M; m += TILE4) int4_dots(j, b, m, TILE4);
            for (; m < j->M; m++) int4_dots(j, b, m, 1);
            continue;
        }
#endif
        for (long m = 0; m < j->M; m++) {
            if (j->half == 32) int4_block(j, b, m, 32);
            else if (j->half == 16) int4_block(j, b, m, 16);
            else int4_block(j, b, m, j->half);
        }
    }
}

/* x [K] bfloat16 as float32 in xf, and (group > 0) its sums per group in xs */
static void widen(const uint16_t *x, float *xf, float *xs, long K, long group) {
    for (long k = 0; k < K; k++) xf[k] = bf16_f32(x[k]);
    for (long g = 0; group && g < K / group; g++) {
        float sum = 0.0f;
        for (long k = g * group; k < (g + 1) * group; k++) sum += xf[k];
        xs[g] = sum;
    }
}

/* --- the steps ----------------------------------------------------------------------------------- */
/* y = x @ (q * scale[:, None]).T for one bfloat16 row x [K]: q [N, K] int8, scale [N] bfloat16 */
void int8_gemv(const uint16_t *x, const int8_t *q, const uint16_t *scale, uint16_t *y, long N, long K) {
    float *xf = malloc(K * sizeof(float));
    widen(x, xf, 0, K, 0);
    job j = {.rows = int8_rows, .x = xf, .N = N, .K = K, .q = q, .s = scale, .out = y};
    run(&j);
    free(xf);
}

/* y = x @ w.T for bfloat16 rows x [M, K] and w [N, K] bfloat16 (nn.Linear's orientation): y [M, N] */
void bf16_gemm(const uint16_t *x, const uint16_t *w, uint16_t *y, long M, long N, long K) {
    float *xf = malloc(M * K * sizeof(float));
    widen(x, xf, 0, M * K, 0);
#if defined(__AVX512F__)
    job j = {.rows = M == 1 ? bf16_rows : bf16_tiles, .x = xf, .N = N, .K = K, .q = w, .out = y, .xb = x, .M = M};
    run(&j);
#else
    for (long m = 0; m < M; m++) {
        job j = {.rows = bf16_rows, .x = xf + m * K, .N = N, .K = K, .q = w, .out = y + m * N, .xb = x + m * K};
        run(&j);
    }
#endif
    free(xf);
}

/* y = x @ W for bfloat16 rows x [M, K], W group-wise int4 in torch's CPU packing: packed [N, K / 2]
   in blocks of `block` channels ("halves"), sz [K / group, N, 2] bfloat16 scales and zero points */
void int4_gemm(const uint16_t *x, const uint8_t *packed, const uint16_t *sz, uint16_t *y, long M, long N, long K,
               long group, long block) {
    float *xf = malloc(M * (K + K / group) * sizeof(float));
    for (long m = 0; m < M; m++) widen(x + m * K, xf + m * K, xf + M * K + m * (K / group), K, group);
    job j = {.rows = int4_rows, .x = xf, .N = N / block, .K = M * K * block, .q = packed, .s = sz, .out = y,
             .xs = xf + M * K, .xb = x, .k = K, .group = group, .half = block / 2, .M = M};
    run(&j);
    free(xf);
}


/* y = W x for W^T [N, K] (nn.Linear's orientation), rows contiguous */
void gemv(const float *w, const float *x, float *y, long N, long K) {
    job j = {gemv_rows, w, x, 0, y, N, K};
    run(&j);
}

/* y = r + W x */
void gemv_add(const float *w, const float *x, const float *r, float *y, long N, long K) {
    job j = {gemv_add_rows, w, x, r, y, N, K};
    run(&j);
}

/* y = x / sqrt(mean(x^2) + eps) * g (g NULL: weightless); y may be x */
void rms_norm(const float *x, const float *g, float eps, float *y, long D) {
    float r = 1.0f / sqrtf(dot(x, x, D) / (float)D + eps);
    for (long d = 0; d < D; d++) y[d] = g ? x[d] * r * g[d] : x[d] * r;
}

/* y = W rms_norm(x, g); h (may be NULL) keeps the normed x */
void norm_gemv(const float *x, const float *g, float eps, const float *w, float *h, float *y, long N, long K) {
    float *hn = h ? h : malloc(K * sizeof(float));
    rms_norm(x, g, eps, hn, K);
    gemv(w, hn, y, N, K);
    if (hn != h) free(hn);
}

/* Heads [n, hd] in place: rotate interleaved pairs by rot (hd/2 complex numbers, re/im), then
   (qk_norm) divide each head by its root mean square */
void rope_heads(float *restrict x, const float *restrict rot, long n, long hd, int qk_norm, float eps) {
    for (long i = 0; i < n; i++) {
        float *head = x + i * hd;
        for (long p = 0; p < hd / 2; p++) {
            float a = head[2 * p], b = head[2 * p + 1], c = rot[2 * p], s = rot[2 * p + 1];
            head[2 * p] = a * c - b * s;
            head[2 * p + 1] = a * s + b * c;
        }
        if (qk_norm) rms_norm(head, 0, eps, head, hd);
    }
}

/* The k largest of logits[E] (the first index on ties), and their sigmoids */
void top_k(const float *restrict logits, long E, long k, int64_t *restrict idx, float *restrict score) {
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= idx[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        idx[j] = best;
        score[j] = 1.0f / (1.0f + expf(-logits[best]));
    }
}

/* y = down (silu(gate x) * (up x)) for gate_up [2F, D] (gate rows, then up rows), down [D, F] */
void swiglu(const float *x, const float *gate_up, const float *down, float *y, long F, long D) {
    float *a = malloc(F * sizeof(float));
    job j = {swiglu_rows, gate_up, x, 0, a, F, D};
    run(&j);
    gemv(down, a, y, D, F);
    free(a);
}

/* One query token over S keys: q [H, hd], k and v [S, Hkv, hd] contiguous, out [H, hd]; query head h
   reads key head h / (H / Hkv) */
void decode_attention(const float *restrict q, const float *restrict k, const float *restrict v,
                      float *restrict out, long S, long H, long Hkv, long hd) {
    float *p = malloc(S * sizeof(float));
    float scale = 1.0f / sqrtf((float)hd);
    for (long h = 0; h < H; h++) {
        long g = h / (H / Hkv);
        const float *qh = q + h * hd;
        float top = -INFINITY, sum = 0.0f;
        for (long s = 0; s < S; s++) {
            p[s] = dot(qh, k + (s * Hkv + g) * hd, hd) * scale;
            top = p[s] > top ? p[s] : top;
        }
        for (long s = 0; s < S; s++) { p[s] = expf(p[s] - top); sum += p[s]; }
        float *o = out + h * hd;
        for (long d = 0; d < hd; d++) o[d] = 0.0f;
        for (long s = 0; s < S; s++) {
            const float *vs = v + (s * Hkv + g) * hd;
            for (long d = 0; d < hd; d++) o[d] += p[s] * vs[d];
        }
        for (long d = 0; d < hd; d++) o[d] /= sum;
    }
    free(p);
}

/* One token's k and v [Hkv, hd] stored at slot n of K and V [slots, Hkv, hd], then q [H, hd] attended
   over slots 0..n: a chunk's cache step in one call */
void append_attention(const float *q, const float *k, const float *v, float *K, float *V, float *out, long n,
                      long H, long Hkv, long hd) {
    memcpy(K + n * Hkv * hd, k, Hkv * hd * sizeof(float));
    memcpy(V + n * Hkv * hd, v, Hkv * hd * sizeof(float));
    decode_attention(q, K, V, out, n + 1, H, Hkv, hd);
}
"""
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")


SIGNATURES = {"gemv": "pppll", "gemv_add": "ppppll", "rms_norm": "ppfpl", "norm_gemv": "ppfpppll",
              "rope_heads": "ppllif", "top_k": "pllpp", "swiglu": "ppppll", "decode_attention": "ppppllll",
              "append_attention": "ppppppllll", "int8_gemv": "ppppll", "bf16_gemm": "ppplll",
              "int4_gemm": "pppplllll"}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    if os.environ.get("MOESTREAM_NATIVE", "1") == "0":
        return None, "off (MOESTREAM_NATIVE=0)"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return None, f"not built on {platform.system()} {platform.machine()}"
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None, "no C compiler (cc) on PATH: install gcc, or set CC"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    flags = FLAGS + (("-fopenmp",) if _torch_gomp() else ())
    key = hashlib.sha256("\0".join((SOURCE, *flags, version, _cpu_flags(), platform.machine())).encode()).hexdigest()[:16]
    directory = cache_dir() / "native"
    path = directory / f"gemv-{key}.so"
    try:
        if not path.exists():
            make_directory(directory)
            with FileLock(directory / ".build.lock", "the native kernels' build", "wait for it", blocking=True):
                if not path.exists():  # another process may have built it while we waited
                    _compile(cc, path, flags)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError, MoestreamError) as e:  # an unwritable cache too
        return None, f"build failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    for name, types in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [{"p": ctypes.c_void_p, "l": ctypes.c_long, "f": ctypes.c_float, "i": ctypes.c_int}[t]
                                   for t in types], None
    return lib, ""


def _torch_gomp() -> bool:
    """Whether torch's OpenMP runtime is GNU's libgomp, loaded for everyone to link against: then the
    kernels share its threads. Any other (or none), and a library of ours linked with -fopenmp would
    bring a second team of spinning threads that fights torch's for the cores: one thread, then."""
    try:
        ctypes.CDLL(None).GOMP_parallel
    except AttributeError:
        return False
    return "OpenMP" in torch.__config__.parallel_info()


def _compile(cc: str, path: Path, flags: tuple[str, ...]) -> None:
    src, obj = temporary_name(path.with_suffix(".c")), temporary_name(path)
    try:
        src.write_text(SOURCE)
        for attempt in (flags, FLAGS):  # a compiler without OpenMP: the kernels run on one thread
            done = subprocess.run([cc, *attempt, "-o", str(obj), "-x", "c", str(src), "-lm"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or f"{cc} exited with {done.returncode}")
        os.replace(obj, path)
    finally:
        for p in (src, obj):
            p.unlink(missing_ok=True)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "on") or (None, why not): built and checked once per process."""
    lib, why = _build()
    if lib is not None and not _agrees(lib):
        return None, "built, but disagreed with torch on a check product: using torch's"
    return lib, why or "on"


def _library() -> ctypes.CDLL | None:
    return _load()[0]


def status() -> str:
    """"on", or why one-row float32 (and few-row bfloat16) products are torch's."""
    return _load()[1]


def _agrees(lib) -> bool:
    """The matrix-vector kernel against torch, with and without a tail past the last 16 inputs (the
    others are tested against their torch formulas by the tests)."""
    gen = torch.Generator().manual_seed(0)
    for n, k in ((40, 37), (16, 16), (5, 200)):
        w, x = torch.randn(n, k, generator=gen), torch.randn(1, k, generator=gen)
        y = torch.empty(1, n)
        lib.gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), n, k)
        if not torch.allclose(y, F.linear(x, w), rtol=1e-5, atol=1e-5):
            return False
    return True


# --- the kernels, for one float32 row on the CPU ---------------------------------------------------
# `ready` says whether a row and its weights take them; each function below assumes it said yes.
def ready(x: torch.Tensor, *weights) -> bool:
    """x one float32 row on the CPU, each weight (None allowed) a contiguous float32 CPU tensor, and
    the library built."""
    if x.dtype != torch.float32 or not x.is_cpu or x.numel() != x.shape[-1] or x.requires_grad:
        return False
    return plain(*weights)


def plain(*tensors) -> bool:
    """Each (None allowed) a contiguous float32 CPU tensor, and the library built."""
    return _library() is not None and all(
        t is None or (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()
                      and not t.requires_grad) for t in tensors)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for w [N, K]; one float32 row, or fewer than bf16_rows() bfloat16 rows, on the CPU
    through a C kernel; more bfloat16 rows by oneDNN's GEMM."""
    if ready(x, w):
        y = torch.empty(x.shape[:-1] + (w.shape[0],))
        _library().gemv(w.data_ptr(), x.contiguous().data_ptr(), y.data_ptr(), *w.shape)
        return y
    if bf16_ready(x, w):
        rows, shape = x.numel() // x.shape[-1], x.shape[:-1] + (w.shape[0],)
        if rows >= bf16_rows():
            return F.linear(x, w)
        y = torch.empty(shape, dtype=torch.bfloat16)
        _library().bf16_gemm(x.contiguous().data_ptr(), w.data_ptr(), y.data_ptr(), rows, *w.shape)
        return y
    return F.linear(x, w)


# Fewer bfloat16 rows than this take the C kernel (a decode step, a batch's, a prompt's rows through a
# routed expert); from here on oneDNN's GEMM, which reorders w first, is as fast. Scout's matrices on
# an EPYC (AVX512-BF16), 2 threads, GFLOP/s of the kernel / oneDNN's best orientation: 1 row 2x; 16
# rows gate_up [16384, 5120] 323 / 307, down [5120, 8192] 338 / 192; 32 rows 417 / 368, 414 / 273;
# 64 rows 403 / 387, 386 / 343; 128 rows 401 / 412, 407 / 395; 256 rows 406 / 423, 381 / 425.
BF16_ROWS = 128
BF16_AMX_ROWS = 5  # where oneDNN may use AMX, whose tiles outrun any AVX-512 loop: a decode step's rows only


def bf16_rows() -> int:
    """Fewer bfloat16 rows than this take bf16_gemm on this CPU."""
    return BF16_AMX_ROWS if onednn_may_use_amx() else BF16_ROWS


@functools.cache
def onednn_may_use_amx() -> bool:
    """True unless this CPU is known to lack AMX (Linux's /proc/cpuinfo lists no amx_bf16) or oneDNN is
    capped below it (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA naming an ISA without AMX)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap and cap.upper() != "ALL" and "AMX" not in cap.upper():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return True  # not Linux: cannot tell, so assume it may


def bf16_ready(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x bfloat16 rows on the CPU, w a contiguous bfloat16 CPU matrix, and the library built: then fewer
    than bf16_rows() rows are bf16_gemm's, float32 sums rounded to bfloat16 once (F.linear's formula),
    each row's the bits it has alone; more rows are oneDNN's GEMM."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.is_cpu and w.is_cpu and w.dim() == 2
            and x.shape[-1] == w.shape[1] and w.is_contiguous() and not (x.requires_grad or w.requires_grad)
            and _library() is not None)


def linear_add(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r + x @ w.T (r contiguous, w's output shape)."""
    y = torch.empty_like(r)
    _library().gemv_add(w.data_ptr(), x.contiguous().data_ptr(), r.data_ptr(), y.data_ptr(), *w.shape)
    return y


def norm_linear(x: torch.Tensor, g: torch.Tensor | None, eps: float, w: torch.Tensor,
                keep: bool = False):
    """rms_norm(x, g) @ w.T; keep: (the normed x, that product)."""
    h = torch.empty_like(x) if keep else None
    y = torch.empty(x.shape[:-1] + (w.shape[0],))
    _library().norm_gemv(x.contiguous().data_ptr(), _ptr(g), eps, w.data_ptr(), _ptr(h), y.data_ptr(), *w.shape)
    return (h, y) if keep else y


def rms_norm(x: torch.Tensor, g: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = torch.empty_like(x)
    _library().rms_norm(x.contiguous().data_ptr(), _ptr(g), eps, y.data_ptr(), x.shape[-1])
    return y


def rope_heads_(heads: torch.Tensor, rotations: torch.Tensor, n: int, qk_norm: bool, eps: float) -> None:
    """In place on the first n heads of one row of heads [1, H', hd]: RoPE by rotations [1, hd/2]
    complex64, then the weightless QK-norm."""
    _library().rope_heads(heads.data_ptr(), rotations.contiguous().data_ptr(), n, heads.shape[-1], int(qk_norm), eps)


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest router logits of one row [1, E] and their sigmoids: ([1, k] int64, [1, k])."""
    idx, scores = torch.empty(1, k, dtype=torch.int64), torch.empty(1, k)
    _library().top_k(logits.data_ptr(), logits.shape[-1], k, idx.data_ptr(), scores.data_ptr())
    return idx, scores


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * (up x)), gate_up [2F, D] gate rows then up rows, down [D, F]."""
    y = torch.empty(x.shape[:-1] + (down.shape[0],))
    _library().swiglu(x.contiguous().data_ptr(), gate_up.data_ptr(), down.data_ptr(), y.data_ptr(), down.shape[1],
                      down.shape[0])
    return y


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query q [H, hd] over keys and values [S, Hkv, hd]: [1, H * hd]."""
    H, hd = q.shape
    out = torch.empty(1, H * hd)
    _library().decode_attention(q.contiguous().data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), k.shape[0], H,
                                k.shape[1], hd)
    return out


def append_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     n: int) -> torch.Tensor:
    """One token (q [1, H, hd], k and v [1, Hkv, hd]): k and v stored at slot n of keys and values
    [slots, Hkv, hd], then q attended over slots 0..n: [1, H * hd], decode_attention's numbers."""
    H, Hkv, hd = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty(1, H * hd)
    _library().append_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                out.data_ptr(), n, H, Hkv, hd)
    return out


def available() -> bool:
    """Whether the library is built (the quantized products check their own layouts)."""
    return _library() is not None


def int4_shares_rows(block: int) -> bool:
    """Whether int4_linear reads weights in blocks of `block` channels once for several rows (AVX512-BF16
    and VBMI, blocks of 64): then it beats torch's kernel at every row count; elsewhere it walks the
    weights once per row."""
    lib = _library()
    return block == 64 and lib is not None and ctypes.c_long.in_dll(lib, "int4_shared_rows").value > 1


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One bfloat16 row x [1, K] @ (q [N, K] int8 * scale [N] bfloat16).T: [1, N] bfloat16, the numbers of
    aten._weight_int8pack_mm within float32 rounding, rounded to bfloat16 once."""
    y = torch.empty(1, q.shape[0], dtype=torch.bfloat16)
    _library().int8_gemv(x.contiguous().data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), *q.shape)
    return y


def int4_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, block: int) -> torch.Tensor:
    """bfloat16 rows x [M, K] @ W, W group-wise int4 in aten._convert_weight_to_int4pack_for_cpu's
    "halves" packing (blocks of `block` channels): [M, N] bfloat16, the numbers of
    aten._weight_int4pack_mm_for_cpu within float32 rounding, rounded to bfloat16 once; each row's
    bits the ones it has alone."""
    n, k = packed.shape[0], packed.shape[1] * 2
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    _library().int4_gemm(x.contiguous().data_ptr(), packed.data_ptr(), sz.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                         k // sz.shape[0], block)
    return y
