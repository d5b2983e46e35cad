"""moestream against llama.cpp on the CPU, side by side, on the same weights, in one run.

What it measures (llama-bench's tests, both engines one after the other, never two at once):
pp<P> (prefill P tokens) and tg<N> (decode N tokens) tokens/s of llama.cpp (`llama-bench -o json`,
median of its -r samples, after its own warm-up) and of moestream (its Python API in a fresh
process: one load per format, every expert placed before timing, then per thread count the test
`moestream bench` runs, moestream/cli/bench.py run_test, a warm-up and the median of -r
repetitions), and their ratio, at each --threads count, on

  embedded  moestream/data/default (bf16 in the file), converted by llama.cpp's own
            convert_hf_to_gguf.py to GGUF f32 (against moestream in float32, its CPU default) and
            bf16 (against moestream in bfloat16 with bf16 experts).
  scout     a synthetic checkpoint of Llama 4 Scout's real shapes (hidden 5120, 16 experts of
            F 8192 and a shared one, top-1, 40 / 8 heads of 128) and --layers layers of random bf16
            weights, written to disk in Hugging Face Llama4 layout (fused experts gate_up_proj
            [E, D, 2F] and down_proj [E, F, D]; the embedded model's tokenizer, vocab 4096 unless
            --vocab), converted to GGUF BF16 and quantized by llama-quantize to Q8_0 and Q4_0,
            against moestream in bfloat16 with --expert-dtype bf16, int8 and int4 (and with
            --resident-dtype int8 / int4 / matched, the rest quantized too, as Q8_0 / Q4_0 quantize
            it). Also printed:
            the weight bytes one decode token reads in each engine, the achieved weight GB/s
            (bytes per token x tg tok/s) and this machine's memory read bandwidth, measured in the
            same run (the sum of a 1 GiB buffer, torch, at each thread count).

llama.cpp: --llama-cpp DIR (a tree with convert_hf_to_gguf.py, gguf-py/ and llama-bench and
llama-quantize in build/bin, bin or the top), else built once into --cache/llama.cpp from the
llama-cpp-python sdist (0.3.36 vendors llama.cpp at 0c1e57098): pip download, then a CPU Release
build with cmake (GGML_NATIVE=ON, LLAMA_CURL=OFF, GGML_CUDA=OFF, targets llama-bench and
llama-quantize, -j 2); if llama-bench then dies of SIGILL or SIGSEGV, as ggml's AMX kernels do on
some AMX machines (a Xeon VM: SIGILL at pp64, SIGSEGV at pp512), it is rebuilt once into build-no-amx
without them and rerun. The copy built there has one
fix (LLAMA4_PATCHED below): this llama.cpp aborts on Llama 4 models of fewer than 4 layers,
whatever the weights. The converter runs unchanged through a wrapper written into --cache that
maps the embedded tokenizer's pre-tokenizer (its hash is
not in llama.cpp's table) to llama.cpp's "gpt-2", the plain ByteLevel split it is; with this
Python when it has the converter's imports, else in a venv made in --cache. GGUF files and the
synthetic checkpoint stay in --cache for the next run (2 Scout layers: about 26 GB on disk, 9 GB
of RAM while either engine runs).

--rounds R repeats the pair (llama-bench, then moestream; every second round moestream first, so a
drift one way favours neither) R times per format: a shared VM's memory bandwidth moves by a third
within minutes (2 cores of an EPYC VM read 32 GB/s and, ten minutes later, 48; 52 and, a minute
later, 35), so each round's ratio compares two measurements taken close together, and the table
gives the median of the rounds' ratios beside each engine's median over the rounds.

Rerun (on an idle machine):

    python benchmarks/vs_llamacpp.py                    # both models, -p 512 -n 128 -r 5, 1 and 2 threads
    python benchmarks/vs_llamacpp.py --only embedded --threads 2
    python benchmarks/vs_llamacpp.py --only scout --layers 2 -p 64 -n 32 -r 3 --resident-dtype matched
    python benchmarks/vs_llamacpp.py --only scout --formats BF16 --threads 2    # one format
    python benchmarks/vs_llamacpp.py --only scout --layers 2 -p 512 -n 16 -r 1 --rounds 3   # paired rounds
    python benchmarks/vs_llamacpp.py --llama-cpp ~/src/llama.cpp   # an existing llama.cpp build

Output ends with markdown tables (to paste into the README) and the exact commands that were run.
Never run in CI: a benchmark, not a test. Logits are not compared (see NOTE).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "moestream" / "data" / "default"
LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp (ggml commit 0c1e57098)
CONVERTER_REQUIREMENTS = ["torch", "numpy", "sentencepiece", "transformers", "protobuf", "safetensors"]
NOTE = ("Known difference (issue 14): llama.cpp hard-codes Llama 4 Scout's attention chunk (8192) and its "
        "attention temperature-tuning constants instead of reading them from the model, so on the embedded "
        "model (chunk 64) its logits diverge from moestream's from position 63 on (with those two values read "
        "from the GGUF they agree: equal perplexity, identical greedy tokens). For speed this means llama.cpp "
        "attends over more keys than moestream past 64 tokens, not fewer. Logits are not compared here.")

COMMANDS: list[str] = []  # every external command run, printed at the end
placing: list[tuple] = []  # (model, moestream format, load s, placing every expert s)
TIMINGS: dict[str, float] = {}  # setup steps (download, build, convert, quantize) -> seconds


def say(*args) -> None:
    print(*args, flush=True)


def sh(cmd: list, *, env: dict | None = None, cwd: Path | None = None, capture: bool = False, record: bool = True,
       check: bool = True, allow: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """Run one external command (logged, and kept for the list printed at the end). check: a non-zero
    exit ends the run, but for the return codes in `allow`, which the caller handles."""
    cmd = [str(c) for c in cmd]
    text = shlex.join(cmd)
    if env:
        extra = {k: v for k, v in env.items() if os.environ.get(k) != v}
        text = " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items()) + (" " if extra else "") + text
    if cwd:
        text = f"(cd {shlex.quote(str(cwd))} && {text})"
    if record:
        COMMANDS.append(text)
    say(f"$ {text}")
    out = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, text=True,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if check and out.returncode != 0 and out.returncode not in allow:
        if capture:
            say(out.stdout[-4000:] if out.stdout else "", out.stderr[-4000:] if out.stderr else "")
        raise SystemExit(f"failed ({out.returncode}): {text}")
    return out


def timed(label: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            TIMINGS[label] = TIMINGS.get(label, 0.0) + time.perf_counter() - self.t
            say(f"[{label}: {time.perf_counter() - self.t:.1f} s]")

    return _T()


def available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


# --- llama.cpp: find or build ------------------------------------------------------------------------
@dataclass
class LlamaCpp:
    source: Path  # has convert_hf_to_gguf.py and gguf-py/
    bench: Path
    quantize: Path
    commit: str
    version: str = ""
    cache: Path | None = None  # the --cache it was built into (None: an existing --llama-cpp tree)
    amx: bool = True  # False: rebuilt without AMX kernels (see llama_bench)

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"


def find_binary(root: Path, name: str) -> Path | None:
    for sub in ("build/bin", "bin", "build", "."):
        p = root / sub / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def source_commit(source: Path) -> str:
    out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    head = source / ".git"  # a submodule's .git file: "gitdir: ../../.git/modules/vendor/llama.cpp"
    if head.is_file():
        gitdir = (source / head.read_text().split(":", 1)[1].strip()).resolve()
        if (gitdir / "HEAD").is_file():
            return (gitdir / "HEAD").read_text().strip()
    return "unknown"


# llama.cpp (at 0c1e57098) aborts on a Llama 4 GGUF with fewer than 4 layers: its graph always makes the
# attention-temperature input, which only NoPE layers (every 4th) use, and setting an input no op reads
# fails (GGML_ASSERT "tensor buffer not set" in llm_graph_input_attn_temp::set_input). The copy built in
# --cache makes that input only when some layer uses it; nothing else changes, and models of 4 or more
# layers build the same graph as before.
LLAMA4_UNPATCHED = """    ggml_tensor * inp_attn_scale = nullptr;
    inp_attn_scale = build_inp_attn_scale();
"""
LLAMA4_PATCHED = """    ggml_tensor * inp_attn_scale = nullptr;
    if (hparams.n_no_rope_layer_step > 0 && (uint32_t) n_layer >= hparams.n_no_rope_layer_step) {  // moestream benchmark: some layer is NoPE
        inp_attn_scale = build_inp_attn_scale();
    }
"""


def patch_llama4(source: Path) -> bool:
    """Apply the fewer-than-4-layers fix to src/models/llama4.cpp; True when the file changed."""
    f = source / "src" / "models" / "llama4.cpp"
    text = f.read_text() if f.is_file() else ""
    if LLAMA4_PATCHED in text or LLAMA4_UNPATCHED not in text:
        return False
    f.write_text(text.replace(LLAMA4_UNPATCHED, LLAMA4_PATCHED))
    say(f"patched {f}: the attention-temperature input is made only when a NoPE layer reads it "
        f"(llama.cpp aborts on Llama 4 models of fewer than 4 layers otherwise)")
    return True


def llama4_small_ok(source: Path) -> bool:
    f = source / "src" / "models" / "llama4.cpp"
    return not f.is_file() or LLAMA4_UNPATCHED not in f.read_text()


def build_llama_cpp(cache: Path, amx: bool = True) -> Path:
    """The llama-cpp-python sdist's vendored llama.cpp, CPU-built under cache/llama.cpp; its source dir.
    amx False: built into build-no-amx with ggml's AMX kernels left out (NO_AMX_FLAGS), for a CPU
    where they fault."""
    root = cache / "llama.cpp"
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    build = build_dir(cache, amx)
    if not (source / "convert_hf_to_gguf.py").is_file():
        sdist = root / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.is_file():
            with timed("download llama-cpp-python sdist"):
                sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist.parent])
        with timed("extract sdist"):
            say(f"extracting {sdist} into {root}")
            with tarfile.open(sdist) as tar:
                tar.extractall(root, filter="tar") if hasattr(tarfile, "data_filter") else tar.extractall(root)
    patched = patch_llama4(source)
    if patched or not (find_binary(build, "llama-bench") and find_binary(build, "llama-quantize")):
        with timed("build llama.cpp (cmake, -j 2)"):
            if not (build / "CMakeCache.txt").is_file():
                sh(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    *([] if amx else [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"])])
            sh(["cmake", "--build", build, "--config", "Release", "-j", "2", "--target", "llama-bench", "llama-quantize"])
    return source


def build_dir(cache: Path, amx: bool = True) -> Path:
    return cache / "llama.cpp" / ("build" if amx else "build-no-amx")


# GCC's explicit -mno-* flags win over -march=native's, wherever they stand on the command line: with
# them ggml compiles no AMX kernels (they are under #if __AMX_INT8__) and uses its AVX-512 ones.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def llama_cpp(args) -> LlamaCpp:
    if args.llama_cpp:
        root = Path(args.llama_cpp).expanduser().resolve()
        source = root
    else:
        source = build_llama_cpp(args.cache)
        root = args.cache / "llama.cpp"
    bench, quantize = find_binary(root, "llama-bench"), find_binary(root, "llama-quantize")
    if not (bench and quantize and (source / "convert_hf_to_gguf.py").is_file() and (source / "gguf-py").is_dir()):
        raise SystemExit(f"{root}: needs llama-bench and llama-quantize (in build/bin, bin or the top) and "
                         f"convert_hf_to_gguf.py with gguf-py/ next to it")
    lc = LlamaCpp(source, bench, quantize, source_commit(source), cache=None if args.llama_cpp else args.cache)
    version = sh([bench, "--version"], capture=True, record=False, check=False)
    lc.version = "; ".join(line.strip() for line in (version.stdout + version.stderr).splitlines() if line.strip())
    say(f"llama.cpp: {source} (ggml/llama.cpp commit {lc.commit}); llama-bench --version: {lc.version or '?'}")
    return lc


# --- converting to GGUF --------------------------------------------------------------------------------
# Runs llama.cpp's convert_hf_to_gguf.py unchanged, with one method wrapped: a BPE pre-tokenizer whose hash
# is not in llama.cpp's table (the embedded tokenizer's) is given the name in MOESTREAM_PRE_TOKENIZER
# instead of failing. Written into --cache; the llama.cpp files themselves are never edited.
CONVERT_WRAPPER = '''"""convert_hf_to_gguf.py with an unknown BPE pre-tokenizer mapped to $MOESTREAM_PRE_TOKENIZER
(written by moestream's benchmarks/vs_llamacpp.py). Usage: python convert.py LLAMA_CPP_DIR <converter args>"""
import os
import sys

source = sys.argv.pop(1)
sys.path.insert(0, source)
import convert_hf_to_gguf as conv  # puts its own gguf-py on sys.path

base = sys.modules.get("conversion.base")  # newer llama.cpp: the model classes live in conversion/
cls = getattr(base, "TextModel", None) or conv.TextModel
original = cls.get_vocab_base_pre
mapped = os.environ.get("MOESTREAM_PRE_TOKENIZER")


def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        if not mapped:
            raise
        print(f"moestream: pre-tokenizer hash not in llama.cpp's table: mapped to {mapped!r}", file=sys.stderr, flush=True)
        return mapped


cls.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = conv.__file__
conv.main()
'''


def converter_python(lc: LlamaCpp, cache: Path) -> str:
    """This Python when it has the converter's imports, else a venv in the cache with its requirements."""
    probe = "import torch, numpy, transformers, safetensors, yaml"  # yaml: gguf-py's metadata
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return sys.executable
    venv = cache / "llama.cpp" / "convert-venv"
    py = venv / "bin" / "python"
    if not (py.is_file() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0):
        with timed("converter venv"):
            sh([sys.executable, "-m", "venv", venv])
            req = lc.source / "requirements" / "requirements-convert_hf_to_gguf.txt"
            sh([py, "-m", "pip", "install", "-r", req] if req.is_file() else
               [py, "-m", "pip", "install", *CONVERTER_REQUIREMENTS], cwd=req.parent if req.is_file() else None)
            sh([py, "-m", "pip", "install", "pyyaml", "safetensors"])
    return str(py)


def convert(lc: LlamaCpp, cache: Path, model: Path, outtype: str, out: Path) -> Path:
    if out.is_file():
        say(f"{out} exists: reused")
        return out
    wrapper = cache / "llama.cpp" / "convert.py"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    if not wrapper.is_file() or wrapper.read_text() != CONVERT_WRAPPER:
        wrapper.write_text(CONVERT_WRAPPER)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with timed(f"convert {model.name} -> {out.name}"):
        sh([converter_python(lc, cache), wrapper, lc.source, model, "--outtype", outtype, "--outfile", tmp],
           env={"MOESTREAM_PRE_TOKENIZER": "gpt-2", "PYTHONPATH": str(lc.source / "gguf-py"), "TQDM_DISABLE": "1"})
    tmp.rename(out)
    return out


def quantize(lc: LlamaCpp, source: Path, qtype: str, out: Path) -> Path:
    if out.is_file():
        say(f"{out} exists: reused")
        return out
    tmp = out.with_name(out.name + ".partial")
    with timed(f"llama-quantize {qtype}"):
        sh([lc.quantize, source, tmp, qtype, "2"])
    tmp.rename(out)
    return out


def gguf_bytes_per_token(lc: LlamaCpp, path: Path, top_k: int, n_experts: int) -> int:
    """Weight bytes one decode token reads: every tensor but the embedding table, the routed experts'
    tensors (ffn_*_exps) for top_k of n_experts only."""
    if str(lc.source / "gguf-py") not in sys.path:
        sys.path.insert(0, str(lc.source / "gguf-py"))
    from gguf import GGUFReader

    total = 0.0
    for t in GGUFReader(str(path)).tensors:
        if t.name == "token_embd.weight":
            continue
        total += int(t.n_bytes) * (top_k / n_experts if "_exps" in t.name else 1)
    return int(total)


# --- the synthetic Scout-shaped checkpoint -------------------------------------------------------------
def scout_config(layers: int, vocab: int) -> dict:
    """Llama 4 Scout's text config (moestream/model/presets.py), as transformers 5 saves it, with
    `layers` layers and the embedded tokenizer's special tokens."""
    emb = json.loads((EMBEDDED / "config.json").read_text())
    return {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "dtype": "bfloat16",
            "vocab_size": vocab, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_hidden_layers": layers, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
            "moe_layers": list(range(layers)), "attention_chunk_size": 8192, "use_qk_norm": True,
            "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
            "no_rope_layer_interval": 4, "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(layers)],
            "layer_types": ["chunked_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)],
            "max_position_embeddings": 10485760, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "initializer_range": 0.02, "attention_bias": False, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "bos_token_id": emb["bos_token_id"], "eos_token_id": emb["eos_token_id"],
            "pad_token_id": emb.get("pad_token_id"), "tie_word_embeddings": False, "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0, "output_router_logits": False, "use_cache": True}


def layer_shapes(c: dict, i: int) -> list[tuple[str, tuple[int, ...]]]:
    D, F, E, hd = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (q, D)), (p + "self_attn.k_proj.weight", (kv, D)),
            (p + "self_attn.v_proj.weight", (kv, D)), (p + "self_attn.o_proj.weight", (D, q)),
            (p + "feed_forward.router.weight", (E, D)),
            (p + "feed_forward.experts.gate_up_proj", (E, D, 2 * F)),  # fused, x @ W, as transformers saves it
            (p + "feed_forward.experts.down_proj", (E, F, D)),
            (p + "feed_forward.shared_expert.gate_proj.weight", (F, D)),
            (p + "feed_forward.shared_expert.up_proj.weight", (F, D)),
            (p + "feed_forward.shared_expert.down_proj.weight", (D, F))]


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], gen) -> None:
    """A bf16 safetensors file written tensor by tensor (and slab by slab along the first dim of 3-D
    ones), so memory stays at one slab: 8-byte header length, JSON header, then the raw data."""
    import torch

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes:
            for slab_shape in ([shape[1:]] * shape[0] if len(shape) == 3 else [shape]):
                t = gen(name, slab_shape)
                f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
                del t
    tmp.rename(path)


def synthetic_scout(cache: Path, layers: int, vocab: int, seed: int = 0) -> Path:
    """The synthetic checkpoint in HF Llama4 layout (one safetensors file per layer + index), made once."""
    import torch

    out = cache / f"scout-synthetic-{layers}L-v{vocab}"
    config = scout_config(layers, vocab)
    done = out / ".complete"
    if done.is_file() and json.loads((out / "config.json").read_text()) == config:
        say(f"{out} exists: reused")
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (EMBEDDED / name).is_file():
            shutil.copy(EMBEDDED / name, out / name)
    g = torch.Generator().manual_seed(seed)

    def gen(name: str, shape) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)

    D = config["hidden_size"]
    files = [("model.embed_tokens.weight", (vocab, D)), ("model.norm.weight", (D,)), ("lm_head.weight", (vocab, D))]
    groups = [files] + [layer_shapes(config, i) for i in range(layers)]
    weight_map, size = {}, 0
    with timed(f"write synthetic Scout checkpoint ({layers} layers)"):
        for k, shapes in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            say(f"writing {out / fname} ({', '.join(n.split('.')[-2] + '.' + n.split('.')[-1] for n, _ in shapes[:3])}, ...)")
            write_safetensors(out / fname, shapes, gen)
            for name, shape in shapes:
                weight_map[name] = fname
                n = 2
                for s in shape:
                    n *= s
                size += n
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    done.write_text("ok\n")
    return out


# --- memory read bandwidth -----------------------------------------------------------------------------
def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 7) -> float:
    """GB/s of a large float32 buffer's sum (torch, `threads` threads), best of reps."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        buf.sum()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t)
        return buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)


# --- the two engines -----------------------------------------------------------------------------------
def llama_bench(lc: LlamaCpp, gguf: Path, p: int, n: int, threads: list[int], reps: int) -> dict:
    """{threads: {"pp": t/s, "tg": t/s, ...}}: the median of llama-bench's samples per test; one
    llama-bench run (-t takes the list) after its own warm-up per test."""
    cmd = ["-m", gguf, "-p", p, "-n", n, "-t", ",".join(map(str, threads)), "-r", reps, "-o", "json"]
    rebuildable = lc.cache is not None and lc.amx  # our own build, not yet without AMX
    crashes = {-signal.SIGILL: "an illegal instruction (SIGILL)", -signal.SIGSEGV: "a segmentation fault (SIGSEGV)"}
    out = sh([lc.bench, *cmd], capture=True, allow=tuple(crashes) if rebuildable else ())
    if out.returncode in crashes:
        # Seen on a Xeon VM with AMX (oneDNN runs its AMX kernels there): ggml's AMX Q8_0 / Q4_0 kernel,
        # compiled in by -march=native, faults on tilezero at pp64 and segfaults at pp512, where the
        # build without them runs. The build, not the model: rebuild without.
        say(f"llama-bench died of {crashes[out.returncode]}, as ggml's AMX kernels do on some "
            f"AMX machines: rebuilding llama.cpp without them ({NO_AMX_FLAGS}) and running again")
        build_llama_cpp(lc.cache, amx=False)
        root = build_dir(lc.cache, amx=False)
        lc.bench, lc.quantize, lc.amx = find_binary(root, "llama-bench"), find_binary(root, "llama-quantize"), False
        out = sh([lc.bench, *cmd], capture=True)
    res: dict[int, dict] = {t: {} for t in threads}
    for row in json.loads(out.stdout):
        r = res.setdefault(int(row["n_threads"]), {})
        kind = "pp" if row["n_gen"] == 0 else "tg"
        samples = row.get("samples_ts") or [row["avg_ts"]]
        r[kind], r[kind + "_samples"] = statistics.median(samples), samples
        r["build"] = f"{row.get('build_commit', '?')} ({row.get('build_number', '?')})"
        r["type"] = row.get("model_type", "?")
    return res


def moestream_bench(model: Path, p: int, n: int, threads: list[int], reps: int, dtype: str, expert_dtype: str,
                    resident_dtype: str = "auto") -> dict:
    """moestream's numbers for the same tests, in a fresh process (this script's --worker mode):
    {threads: {"pp": t/s, "tg": t/s, ...}, "bytes_per_token": ..., ...}."""
    spec = dict(model=str(model), p=p, n=n, threads=threads, reps=reps, dtype=dtype, expert_dtype=expert_dtype)
    if resident_dtype != "auto":
        spec["resident_dtype"] = resident_dtype
    out = sh([sys.executable, Path(__file__).resolve(), "--worker", json.dumps(spec)], capture=True)
    for line in out.stdout.splitlines():
        if line.startswith("note:"):
            say(line)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["by_threads"] = {int(t): v for t, v in res["by_threads"].items()}
            return res
    say(out.stdout[-4000:], out.stderr[-4000:])
    raise SystemExit("the moestream worker printed no RESULT line")


def worker(spec: dict) -> None:
    """One moestream load, then per thread count its pp / tg tests as `moestream bench` runs them
    (cli/bench.py run_test): a warm-up, then spec["reps"] repetitions; prints RESULT {json} with the
    medians. The load takes threads=the first count; each further count is torch.set_num_threads(T),
    which is all `load(threads=T)` does, so int8 / int4 experts are packed once, not per count."""
    import torch

    import moestream
    from moestream.cli.bench import run_test

    threads = spec["threads"]
    t0 = time.perf_counter()
    llm = moestream.load(spec["model"], device="cpu", threads=threads[0], dtype=spec["dtype"],
                         expert_dtype=spec["expert_dtype"], ctx_size=spec["p"] + spec["n"] + 2,
                         **({"resident_dtype": spec["resident_dtype"]} if "resident_dtype" in spec else {}))
    load_s = time.perf_counter() - t0
    # ResidentExperts reads (and packs: int8 / int4 quantize) each expert the first time a token routes to
    # it; place them all now, so no timed test pays for that (llama.cpp's weights are mmapped, ready)
    t0, source = time.perf_counter(), llm.experts
    if hasattr(source, "place_all"):  # as `moestream bench` does
        source.place_all()
    else:
        print(f"note: experts are offloaded ({type(source).__name__}), not all resident: timings include moving them")
    res = {"load_s": load_s, "place_experts_s": time.perf_counter() - t0, "dtype": str(llm.dtype).removeprefix("torch."),
           "expert_format": llm.expert_format.name, "by_threads": {}}
    for t in threads:
        torch.set_num_threads(t)
        r = res["by_threads"][t] = {"torch_threads": torch.get_num_threads()}
        for kind, n_p, n_g in (("pp", spec["p"], 0), ("tg", 0, spec["n"])):
            if not (n_p or n_g):
                continue
            run_test(llm, min(n_p, 8), min(n_g, 2), 0, seed=0)  # warm-up, as moestream bench
            samples = [run_test(llm, n_p, n_g, 0, seed=k + 1)["tps"] for k in range(spec["reps"])]
            r[kind], r[kind + "_samples"] = statistics.median(samples), samples
    plan, c = llm.plan, llm.config
    item = torch.empty((), dtype=llm.dtype).element_size()
    embedding = c.vocab_size * c.hidden_size * item  # one row of it is read per token
    res["bytes_per_token"] = plan.resident_bytes - embedding + len(c.moe_layers) * c.num_experts_per_tok * plan.expert_bytes
    llm.close()
    print("RESULT " + json.dumps(res), flush=True)


# --- tables --------------------------------------------------------------------------------------------
def fmt_tps(v) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def speed_table(rows: list[dict]) -> str:
    """With rounds, each engine's median over them and the median of the rounds' ratios, then each ratio."""
    rounds = any(len(r["ratios"]) > 1 for r in rows)
    lines = ["| model | llama.cpp | moestream | threads | test | llama.cpp t/s | moestream t/s | moestream / llama.cpp |"
             + (" ratio per round |" if rounds else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if rounds else "")]
    for r in rows:
        ratio = r["ratio"]
        lines.append(f"| {r['model']} | {r['lc_fmt']} | {r['ms_fmt']} | {r['threads']} | {r['test']} | {fmt_tps(r['lc'])} | "
                     f"{fmt_tps(r['ms'])} | {'-' if ratio is None else f'{ratio:.2f}'} |"
                     + (f" {', '.join(f'{v:.2f}' for v in r['ratios'])} |" if rounds else ""))
    return "\n".join(lines)


def bandwidth_table(rows: list[dict], bw: dict) -> str:
    lines = ["| llama.cpp | moestream | threads | llama.cpp GB/token | llama.cpp GB/s | moestream GB/token | "
             "moestream GB/s | memory read GB/s | llama.cpp % | moestream % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["test"].startswith("tg"):
            continue
        lc_gbs, ms_gbs, mem = r["lc_bpt"] * r["lc"] / 1e9, r["ms_bpt"] * r["ms"] / 1e9, bw[r["threads"]]
        lines.append(f"| {r['lc_fmt']} | {r['ms_fmt']} | {r['threads']} | {r['lc_bpt'] / 1e9:.3f} | {lc_gbs:.1f} | "
                     f"{r['ms_bpt'] / 1e9:.3f} | {ms_gbs:.1f} | {mem:.1f} | {100 * lc_gbs / mem:.0f}% | {100 * ms_gbs / mem:.0f}% |")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------------------
# (name, GGUF type, how the GGUF is made, moestream compute dtype, moestream --expert-dtype)
EMBEDDED_RUNS = [("f32", "f32", "convert", "float32", "auto"), ("bf16", "bf16", "convert", "bfloat16", "bf16")]
SCOUT_RUNS = [("BF16", "bf16", "convert", "bfloat16", "bf16"), ("Q8_0", "q8_0", "Q8_0", "bfloat16", "int8"),
              ("Q4_0", "q4_0", "Q4_0", "bfloat16", "int4")]


def machine() -> str:
    """The CPU (with its family and model: a VM's "AMD EPYC" alone does not say which generation), the
    software and the commit."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", "?") + (f" (family {fields['cpu family']} model {fields['model']})"
                                           if "cpu family" in fields and "model" in fields else "")
    import torch

    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, moestream "
            f"{rev.stdout.strip() or '?'}{' (+ uncommitted changes)' if dirty else ''}")


def checkpoint_key(hf_dir: Path) -> str:
    """Names the GGUFs made from a checkpoint: its config and its weight files' sizes and times."""
    h = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for f in sorted(hf_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def compare(lc: LlamaCpp, args, model_name: str, hf_dir: Path, gguf_dir: Path, runs, rows: list, bytes_of) -> None:
    """Every format of one model: make its GGUFs, then per thread count llama-bench, then moestream."""
    ggufs, stem = {}, f"{hf_dir.name}-{checkpoint_key(hf_dir)}-{lc.commit[:9]}"
    for name, gtype, how, _, _ in runs:
        if how == "convert":
            ggufs[name] = convert(lc, args.cache, hf_dir, gtype, gguf_dir / f"{stem}-{gtype}.gguf")
    for name, gtype, how, _, _ in runs:
        if how != "convert":
            ggufs[name] = quantize(lc, ggufs[runs[0][0]], how, gguf_dir / f"{stem}-{gtype}.gguf")
    for name, gtype, how, dtype, expert_dtype in runs:
        if args.formats and name.lower() not in args.formats:
            continue
        lc_bpt = bytes_of(ggufs[name])
        resident = "auto" if how == "convert" else {"matched": expert_dtype}.get(args.resident_dtype, args.resident_dtype)
        ms_fmt = (f"{dtype}" + (f", experts {expert_dtype}" if expert_dtype != "auto" else "")
                  + (f", resident {resident}" if resident != "auto" else ""))
        say(f"\n== {model_name}: llama.cpp {name} vs moestream {ms_fmt}, threads {args.threads} ==")
        rounds = []  # (llama.cpp's result, moestream's), one pair per round, measured one after the other
        for k in range(args.rounds):
            if args.rounds > 1:
                say(f"-- round {k + 1} of {args.rounds}" + (": moestream first" if k % 2 else ""))
            bench = {"llama.cpp": lambda: llama_bench(lc, ggufs[name], args.p, args.n, args.threads, args.r),
                     "moestream": lambda: moestream_bench(hf_dir, args.p, args.n, args.threads, args.r, dtype,
                                                          expert_dtype, resident)}
            got = {}
            for engine in (("moestream", "llama.cpp") if k % 2 else ("llama.cpp", "moestream")):
                got[engine] = bench[engine]()
                say(f"{engine} {got[engine]}")
            rounds.append((got["llama.cpp"], got["moestream"]))
        placing.append((model_name, ms_fmt, rounds[0][1]["load_s"], rounds[0][1]["place_experts_s"]))
        for t in args.threads:
            for kind, count in (("pp", args.p), ("tg", args.n)):
                if count:
                    lcs = [lcr.get(t, {}).get(kind) for lcr, _ in rounds]
                    mss = [msr["by_threads"][t].get(kind) for _, msr in rounds]
                    ratios = [m / l for l, m in zip(lcs, mss) if l and m]
                    rows.append({"model": model_name, "lc_fmt": name, "ms_fmt": ms_fmt, "threads": t,
                                 "test": f"{kind}{count}", "lc": median_of(lcs), "ms": median_of(mss),
                                 "ratio": median_of(ratios), "ratios": ratios, "lc_bpt": lc_bpt,
                                 "ms_bpt": rounds[0][1]["bytes_per_token"], "build": rounds[0][0].get(t, {}).get("build")})


def median_of(values: list):
    """The median of the values that were measured (None: none were)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("embedded", "scout"), default=None, help="One model (default: both).")
    ap.add_argument("-p", type=int, default=512, help="Prompt tokens of the pp test (0: none). Default 512.")
    ap.add_argument("-n", type=int, default=128, help="Generated tokens of the tg test (0: none). Default 128.")
    ap.add_argument("-r", type=int, default=5, help="Repetitions per test (median reported). Default 5.")
    ap.add_argument("--threads", default="1,2", help="Thread counts, comma list. Default 1,2.")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Times the pair (llama-bench, then moestream; every second round the other way round) runs "
                         "per format; the ratio is the median of the rounds' ratios. Default 1.")
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="An existing llama.cpp tree (convert_hf_to_gguf.py, gguf-py, llama-bench, llama-quantize).")
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/moestream").expanduser(),
                    help="Where llama.cpp is built and GGUFs / the synthetic checkpoint are kept. Default ~/.cache/moestream.")
    ap.add_argument("--layers", type=int, default=2, help="Layers of the synthetic Scout checkpoint (4.4 GB each in bf16). Default 2.")
    ap.add_argument("--vocab", type=int, default=None,
                    help="Synthetic Scout vocabulary (default: the embedded tokenizer's 4096, so the layers dominate; "
                         "202048 = Scout's, padded by the converter).")
    ap.add_argument("--resident-dtype", choices=("auto", "int8", "int4", "matched"), default="auto",
                    help="moestream's --resident-dtype for the Q8_0 / Q4_0 rows: int8 / int4 (attention, shared expert "
                         "and lm_head quantized too, as llama.cpp's Q8_0 / Q4_0 quantize them), or matched (int8 "
                         "beside Q8_0, int4 beside Q4_0). Default auto (bf16).")
    ap.add_argument("--formats", default=None,
                    help="Only these GGUF types of each model, comma list (f32,bf16 / BF16,Q8_0,Q4_0). Default: all.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one moestream measurement
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    args.cache = args.cache.expanduser().resolve()
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    args.formats = {f.strip().lower() for f in args.formats.split(",") if f.strip()} if args.formats else None
    if any(t < 1 or t > len(os.sched_getaffinity(0)) for t in args.threads):
        raise SystemExit(f"--threads: each count must be 1..{len(os.sched_getaffinity(0))} (the usable CPUs)")
    if args.p < 0 or args.n < 0 or not (args.p or args.n) or args.r < 1 or args.layers < 1 or args.rounds < 1:
        raise SystemExit("-p / -n must be >= 0 (not both 0), -r >= 1, --rounds >= 1, --layers >= 1")
    emb_vocab = json.loads((EMBEDDED / "config.json").read_text())["vocab_size"]
    vocab = args.vocab or emb_vocab
    if vocab < emb_vocab:
        raise SystemExit(f"--vocab must be at least the tokenizer's {emb_vocab}")
    started = time.perf_counter()
    say(f"machine: {machine()}")
    say(f"command: {shlex.join([sys.executable, *sys.argv])}")
    lc = llama_cpp(args)
    if args.only in (None, "scout") and args.layers < 4 and not llama4_small_ok(lc.source):
        raise SystemExit(f"{lc.source}: this llama.cpp aborts on Llama 4 models of fewer than 4 layers (see "
                         f"LLAMA4_PATCHED in {Path(__file__).name}): apply that change and rebuild, or use --layers 4")
    gguf_dir = args.cache / "gguf"
    rows: dict[str, list] = {}
    bw: dict[int, float] = {}
    if args.only in (None, "embedded"):
        rows["embedded"] = []
        cfg = json.loads((EMBEDDED / "config.json").read_text())
        bpt = lambda g: gguf_bytes_per_token(lc, g, cfg["num_experts_per_tok"], cfg["num_local_experts"])
        compare(lc, args, "embedded", EMBEDDED, gguf_dir, EMBEDDED_RUNS, rows["embedded"], bpt)
    if args.only in (None, "scout"):
        need = args.layers * 4.45e9 * 2.83 + vocab * 5120 * 2 * 2 * 2  # HF bf16 + GGUF BF16 + Q8_0 + Q4_0
        args.cache.mkdir(parents=True, exist_ok=True)
        have = dir_bytes(args.cache / f"scout-synthetic-{args.layers}L-v{vocab}") + sum(
            f.stat().st_size for f in gguf_dir.glob(f"scout-synthetic-{args.layers}L-v{vocab}-*.gguf"))
        free, ram = shutil.disk_usage(args.cache).free, available_ram()
        say(f"synthetic Scout, {args.layers} layers: about {need / 1e9:.0f} GB of files in {args.cache} "
            f"({have / 1e9:.0f} GB there already, {free / 1e9:.0f} GB free) and {args.layers * 4.5:.0f} GB of RAM "
            f"while either engine runs ({ram / 1e9:.0f} GB available)")
        if need - have > free:
            raise SystemExit(f"not enough disk in {args.cache} for {args.layers} Scout layers: use fewer --layers "
                             f"or another --cache")
        if args.layers * 4.5e9 > 0.9 * ram:
            say(f"warning: {args.layers} Scout layers may not fit in RAM ({ram / 1e9:.0f} GB available): "
                f"consider --layers {max(1, int(0.9 * ram / 4.5e9))}")
        hf = synthetic_scout(args.cache, args.layers, vocab)
        rows["scout"] = []
        bpt = lambda g: gguf_bytes_per_token(lc, g, 1, 16)
        compare(lc, args, f"Scout-shaped x{args.layers}L", hf, gguf_dir, SCOUT_RUNS, rows["scout"], bpt)
        for t in args.threads:
            bw[t] = read_bandwidth(t)
            say(f"memory read bandwidth, {t} thread{'s' * (t > 1)}: {bw[t]:.1f} GB/s")
    total = time.perf_counter() - started

    say("\n" + "=" * 100)
    say(f"# moestream vs llama.cpp, CPU, one run ({time.strftime('%Y-%m-%d %H:%M')})\n")
    say(f"- machine: {machine()}")
    builds = {r["build"] for rs in rows.values() for r in rs if r.get("build")}
    say(f"- llama.cpp: commit {lc.commit} ({lc.version}; llama-bench JSON build_commit "
        f"{', '.join(sorted(builds)) or '?'}), CPU build{'' if lc.amx else ' without AMX kernels (they fault on this CPU)'}, {lc.bench}")
    say(f"- tests: pp{args.p} / tg{args.n}, {args.r} repetitions, median t/s"
        + (f", in {args.rounds} rounds of (llama-bench, moestream) per format, every second one moestream first, "
           "the ratio the rounds' median"
           if args.rounds > 1 else "") + "; llama-bench (mmap, its defaults) after its "
        f"own warm-up; moestream (Python API, one load per format, every expert placed first) after one warm-up "
        f"test per thread count (moestream/cli/bench.py run_test, as `moestream bench`); one engine at a time")
    say(f"- {NOTE}\n")
    if "embedded" in rows:
        say("## Embedded model (moestream/data/default; GGUF by convert_hf_to_gguf.py)\n")
        say(speed_table(rows["embedded"]) + "\n")
    if "scout" in rows:
        say(f"## Scout-shaped layers: {args.layers} layer{'s' * (args.layers > 1)} of Llama 4 Scout's shapes, "
            f"random bf16 weights, vocab {vocab}\n")
        say(speed_table(rows["scout"]) + "\n")
        if args.n:
            say("Decode weight traffic: GB/token = weight bytes one token reads (all but the embedding table; "
                "routed experts top-1 of 16), GB/s = GB/token x tg t/s; memory read GB/s = a 1 GiB float32 sum "
                "(torch) in this run; % = of that.\n")
            say(bandwidth_table(rows["scout"], bw) + "\n")
    say("moestream load / placing every expert (read, and for int8 / int4 quantize; untimed): " +
        "; ".join(f"{m} {f}: {a:.1f} s / {b:.1f} s" for m, f, a, b in placing) + "\n")
    say(f"Setup steps: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items()) if TIMINGS else "Setup: all cached")
    say(f"Total wall time {total:.0f} s; disk used in {args.cache}: llama.cpp {dir_bytes(args.cache / 'llama.cpp') / 1e9:.2f} GB, "
        f"GGUF {dir_bytes(gguf_dir) / 1e9:.2f} GB" +
        (f", synthetic checkpoint {dir_bytes(hf) / 1e9:.2f} GB" if "scout" in rows else ""))
    say("\n## Commands run\n")
    say("```")
    for c in COMMANDS:
        say(c)
    say("```")


if __name__ == "__main__":
    main()
