"""The Llama 4 text model, in plain tensors, readable top to bottom.

One decoder block is   h = x + attention(rms_norm(x));   out = h + ffn(rms_norm(h))
where ffn is a dense SwiGLU MLP or a mixture of experts, and attention is one of two kinds:
- RoPE layers: rotary positions (interleaved pairs, optional llama3 scaling), optional weightless
  QK-norm, and *chunked local* causal attention (a token sees only its own aligned chunk);
- NoPE layers (every 4th by default): no positions, *global* causal attention, and optionally a
  query temperature that grows with log(position) so long contexts stay sharp.
The MoE block routes each token to its top-k experts by router logit, scales the expert *input*
by sigmoid(logit), and adds an always-on shared expert. Routed experts come through the experts
seam (model/experts.py), the only place the model knows they might not be resident; the KV cache
is another object's (cache/kv.py): attention hands a layer's cache its new keys and gets the
output back, never seeing tiers.

Shapes: a sequence is [T, D] (one sequence at a time, as a runtime serves it); heads are [T, H, hd].
The pure functions at the top are reused by scripts/train_tiny.py with a batch dimension in front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import memory
from ..profiling.recorder import NULL
from .attention import attend
from .checkpoint import Checkpoint
from .config import ModelConfig
from .experts import ExpertSource
from .formats import Int4Linear, Int8Linear, PackedLinear, prepacks
from . import native
from .graphs import CaptureFailed, StepGraphs


# --- building blocks (shape-agnostic in the leading dimensions) ----------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the reference does; weight None = weightless (QK-norm).
    torch's kernel gives the reference's bits (tested): in float32 with the weight; in 16 bits only
    without it (the reference rounds before it multiplies by the weight), so the weight comes after."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    out = F.rms_norm(x, x.shape[-1:], None, eps)
    return out if weight is None else out * weight


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with llama3 wavelength scaling when configured."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)  # long wavelengths: stretched
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)  # in between: interpolate
    return torch.where(medium, smoothed, scaled)


def rope_rotations(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations e^(i * pos * freq), [..., T, hd/2] complex64, for absolute positions."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [..., T, H, hd], as complex numbers."""
    xf = x if x.dtype == torch.float32 else x.float()
    out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * rotations[..., None, :]).flatten(-2)
    return out if x.dtype == torch.float32 else out.type_as(x)


def attention_temperature(positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Per-query scale for NoPE layers: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / config.floor_scale)) * config.attn_scale + 1.0


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T: w a weight tensor [N, K] (nn.Linear orientation; one float32 row on the CPU through
    native.linear), or one in another storage that multiplies itself (Int8Linear, Int4Linear, PackedLinear)."""
    return native.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def swiglu(x: torch.Tensor, gate_up, down) -> torch.Tensor:
    """Dense / shared-expert MLP; nn.Linear orientation, gate and up stacked: gate_up [2F, D]."""
    if native.ready(x, gate_up, down):
        return native.swiglu(x, gate_up, down)
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int):
    """Top-k experts per token and their input scales sigmoid(logit) (not softmax, no renorm)."""
    logits = linear(x, router)
    top_logits, top_experts = logits.topk(top_k, dim=-1)
    scores = torch.sigmoid(top_logits) if x.dtype == torch.float32 else torch.sigmoid(top_logits.float()).to(x.dtype)
    return top_experts, scores, logits


# --- one decoder block as the steps every path runs: a prompt, a decode step, a batch, graph parts --
# On one float32 row on the CPU each step is one or two calls into model/native.py's C kernels
# instead of a dozen torch ops: the same formulas, rounded in another order (within float32's
# rounding of torch's; tests/test_native.py), and the same for every one-row path of a run.
def attention_inputs(c: ModelConfig, x: torch.Tensor, block: "Block", rotations, temperature):
    """Queries, keys and values of x [T, D]: the attention norm, the qkv projection, then RoPE and
    QK-norm, or the NoPE temperature."""
    T, H, Hkv, eps = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps
    rope = c.uses_rope(block.index)
    if native.ready(x, block.attn_norm, block.attn.qkv):
        qkv = native.norm_linear(x, block.attn_norm, eps, block.attn.qkv).view(T, H + 2 * Hkv, c.head_dim)
        if rope:
            native.rope_heads_(qkv, rotations, H + Hkv, c.use_qk_norm, eps)
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
    else:
        qkv = linear(rms_norm(x, block.attn_norm, eps), block.attn.qkv).view(T, H + 2 * Hkv, c.head_dim)
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]  # heads: queries | keys | values
        if rope:  # RoPE and QK-norm act per head alike on queries and keys: one call for both
            qk = apply_rope(qk, rotations)
            if c.use_qk_norm:
                qk = rms_norm(qk, None, eps)
    q, k = qk[:, :H], qk[:, H:]
    if not rope and c.attn_temperature_tuning:
        q = (q * temperature).to(q.dtype)
    return q, k, v


def attention_output(x: torch.Tensor, out: torch.Tensor, block: "Block") -> torch.Tensor:
    """The residual stream after attention: x + the output projection of the heads' outputs."""
    if native.ready(out, block.attn.o, x):
        return native.linear_add(out, block.attn.o, x)
    return x + linear(out, block.attn.o)


def moe_inputs(c: ModelConfig, x: torch.Tensor, block: "Block"):
    """The FFN norm of x and its routing: (h, top-k experts [T, k], their input scales [T, k])."""
    ffn: MoEWeights = block.ffn
    if native.ready(x, block.ffn_norm, ffn.router):
        h, logits = native.norm_linear(x, block.ffn_norm, c.rms_norm_eps, ffn.router, keep=True)
        return (h, *native.top_k(logits, c.num_experts_per_tok))
    h = rms_norm(x, block.ffn_norm, c.rms_norm_eps)
    return (h, *route(h, ffn.router, c.num_experts_per_tok)[:2])


def dense_mlp(c: ModelConfig, x: torch.Tensor, block: "Block") -> torch.Tensor:
    """A dense layer's FFN on the residual stream: x + mlp(rms_norm(x))."""
    norm = native.rms_norm if native.ready(x, block.ffn_norm) else rms_norm
    return x + swiglu(norm(x, block.ffn_norm, c.rms_norm_eps), block.ffn.gate_up, block.ffn.down)


def lm_head(c: ModelConfig, x: torch.Tensor, norm: torch.Tensor, head) -> torch.Tensor:
    """Logits (float32) of the final norm of x."""
    if native.ready(x, norm, head):
        return native.norm_linear(x, norm, c.rms_norm_eps, head)
    return linear(rms_norm(x, norm, c.rms_norm_eps), head).float()


# --- weights -------------------------------------------------------------------------------------
# A matrix below is a tensor at the compute dtype, with --resident-dtype int8 / int4 an Int8Linear /
# Int4Linear, or in bf16 on a CPU without the C kernels a PackedLinear (embeddings, norms and routers always stay
# tensors); `linear` multiplies any of them.
Matrix = torch.Tensor | Int8Linear | Int4Linear | PackedLinear


@dataclass
class AttentionWeights:
    qkv: Matrix  # q, k and v projections stacked: one matmul instead of three
    o: Matrix


@dataclass
class MLPWeights:
    gate_up: Matrix  # [2F, D]: gate rows, then up rows
    down: Matrix  # [D, F]


@dataclass
class MoEWeights:
    router: torch.Tensor  # [E, D]
    shared: MLPWeights  # the always-on shared expert; routed experts come from the ExpertStore


@dataclass
class Block:
    index: int
    attn_norm: torch.Tensor
    attn: AttentionWeights
    ffn_norm: torch.Tensor
    ffn: MLPWeights | MoEWeights


@dataclass
class Weights:
    """Everything held outside the expert store: attention, norms, routers, shared/dense MLPs, embeddings."""

    blocks: list[Block]
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: Matrix

    def routers(self) -> dict[int, torch.Tensor]:
        """Each MoE layer's router, by layer (the prefetcher applies them ahead of time)."""
        return {b.index: b.ffn.router for b in self.blocks if isinstance(b.ffn, MoEWeights)}

    def tensors(self) -> list:
        """Every weight: tensors, and PackedLinears (opaque matrices), tied embeddings counted once."""
        def flat(obj):
            if isinstance(obj, (torch.Tensor, PackedLinear)):
                yield obj
            elif hasattr(obj, "__dataclass_fields__"):  # a block, its parts, an Int8Linear
                for value in vars(obj).values():
                    yield from flat(value)

        found = [t for part in (self.embed, self.norm, self.lm_head, *self.blocks) for t in flat(part)]
        return list({t.data_ptr() if isinstance(t, torch.Tensor) else id(t): t for t in found}.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


def load_weights(ckpt: Checkpoint, device, dtype, resident_dtype: str = "auto") -> Weights:
    """The resident weights, read from the checkpoint onto the compute device (never a routed expert).
    resident_dtype "int8" / "int4": the attention, shared-expert, dense-MLP and lm_head matrices are
    quantized as they are read (one matrix at a time, so the peak is one bf16 matrix).
    Large ones sit on huge pages (memory.streamed). In bf16 on the CPU without native.py's kernels they
    are re-laid for oneDNN instead (PackedLinear: the same numbers, faster), but for an lm_head tied to
    the embedding table, which stays one tensor."""
    def w(name: str) -> torch.Tensor:
        return ckpt.read(name).to(device=device, dtype=dtype)

    def matrix(*names: str, pack: bool = True) -> Matrix:
        m = torch.cat([w(n) for n in names]) if len(names) > 1 else w(names[0])
        if resident_dtype in ("int8", "int4"):
            return (Int8Linear if resident_dtype == "int8" else Int4Linear).quantize(m)
        return PackedLinear(m) if pack and prepacks(m.dtype, m.device) else memory.streamed(m)

    def mlp(prefix: str) -> MLPWeights:
        return MLPWeights(matrix(prefix + "gate_proj.weight", prefix + "up_proj.weight"), matrix(prefix + "down_proj.weight"))

    blocks = []
    for i in range(ckpt.config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = AttentionWeights(matrix(*(p + f"self_attn.{n}_proj.weight" for n in "qkv")), matrix(p + "self_attn.o_proj.weight"))
        if ckpt.config.is_moe(i):
            ffn = MoEWeights(w(p + "feed_forward.router.weight"), mlp(p + "feed_forward.shared_expert."))
        else:
            ffn = mlp(p + "feed_forward.")
        blocks.append(Block(i, w(p + "input_layernorm.weight"), attn, w(p + "post_attention_layernorm.weight"), ffn))
    embed = w("model.embed_tokens.weight")
    head = matrix("lm_head.weight", pack=not ckpt.config.tie_word_embeddings)
    return Weights(blocks, embed, w("model.norm.weight"), head)


# --- the model -----------------------------------------------------------------------------------
class Llama4:
    """Resident weights + an expert source, run one sequence step at a time.

    experts: the expert source (model/experts.py); rec: the profiling recorder (NULL = off);
    on_route: an optional hook called with (layer, experts [T, k], scores [T, k]) at every MoE layer
    (the routing trace's buffer append); image_token_id: the <|patch|> token whose embeddings an image's
    replace (None: a text-only model)."""

    def __init__(self, config: ModelConfig, weights: Weights, experts: ExpertSource, device, dtype, rec=NULL,
                 on_route=None, image_token_id: int | None = None):
        self.config, self.blocks = config, weights.blocks
        self.image_token_id = image_token_id
        self.embed, self.norm, self.lm_head = weights.embed, weights.norm, weights.lm_head
        self.experts = experts
        self.device, self.dtype = torch.device(device), dtype
        self.inv_freq = rope_inv_freq(config).to(self.device)
        self.on_route = on_route
        self.rec = rec
        self.resident_bytes = weights.nbytes
        self.position_tables: dict[int, tuple] = {}  # block start -> (positions, RoPE rotations, NoPE temperatures)
        self.graphs: StepGraphs | None = None  # the one-token step's parts, once capture_graphs built them

    POSITION_BLOCK = 1024
    POSITION_TABLES = 16  # blocks kept (sequences of a batch may sit at different positions)

    def positions(self, pos0: int, T: int):
        """Positions pos0.., their RoPE rotations and NoPE temperatures, sliced from tables built a
        block of positions at a time: a decode step reads one row instead of running ~10 small ops.
        Every entry depends on its position alone, so the values are those of a direct computation
        (a step that crosses a block boundary computes its own, directly)."""
        start = pos0 - pos0 % self.POSITION_BLOCK
        if pos0 + T > start + self.POSITION_BLOCK:
            return self._position_table(pos0, T)
        tables = self.position_tables.get(start)
        if tables is None:
            if len(self.position_tables) >= self.POSITION_TABLES:
                self.position_tables.pop(next(iter(self.position_tables)))  # the oldest block
            tables = self.position_tables[start] = self._position_table(start, self.POSITION_BLOCK)
        i = pos0 - start
        return tables[0][i:i + T], tables[1][i:i + T], tables[2][i:i + T]

    def _position_table(self, pos0: int, T: int):
        positions = torch.arange(pos0, pos0 + T, device=self.device)
        return (positions, rope_rotations(self.inv_freq, positions),
                attention_temperature(positions, self.config)[:, None, None])

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache=None, last_only: bool = False, images: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) for token ids [T] continuing `cache` (a KVCache: its `pos` and one cache per
        layer; None = a fresh sequence, no cache). images: early fusion, the projected image embeddings
        [P, D] that take the places of the P <|patch|> tokens of ids, in order (model/vision.py)."""
        if self.graphs is not None and ids.shape[0] == 1 and cache is not None and images is None:
            return self.graphed_step(ids, cache)
        rec = self.rec  # profiling: rec.mark() reads the clock, rec.add(span) keeps one (builtins; no-ops when off)
        t = rec.mark()
        pos0 = cache.pos if cache is not None else 0
        positions, rotations, temperature = self.positions(pos0, ids.shape[0])
        x = F.embedding(ids.to(self.device), self.embed)
        if images is not None:  # as transformers' masked_scatter: the i-th <|patch|> gets row i
            x[ids.to(self.device) == self.image_token_id] = images.to(device=x.device, dtype=x.dtype)
        rec.add(("embed", t, rec.mark(), -1))  # with the positions' rotations and temperatures
        c = self.config
        for block in self.blocks:
            layer_cache = cache.layers[block.index] if cache is not None else None
            t0 = rec.mark()
            q, k, v = attention_inputs(c, x, block, rotations, temperature)
            x = attention_output(x, self.attend(q, k, v, block, pos0, positions, layer_cache), block)
            rec.add(("attention", t0, rec.mark(), block.index))
            if isinstance(block.ffn, MoEWeights):
                x = x + self.moe(x, block)
            else:
                t = rec.mark()
                x = dense_mlp(c, x, block)
                rec.add(("dense mlp", t, rec.mark(), block.index))
        if cache is not None:
            cache.pos += ids.shape[0]
        if last_only:
            x = x[-1:]
        t = rec.mark()
        logits = lm_head(c, x, self.norm, self.lm_head)
        rec.add(("lm head", t, rec.mark(), -1))
        return logits

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], caches: list) -> torch.Tensor:
        """One decode step of several sequences at once: logits [B, V] (float32) of token i continuing caches[i].

        Attention runs per sequence, over its own cache at its own position. Each MoE layer asks the
        expert source once for the union of the sequences' experts — one fetch each, however many
        sequences want it — then computes every sequence's rows with the same shapes as a step of
        that sequence alone, so the logits are those of running them one by one, bit for bit (with
        top-1 routing, as Llama 4 has; with top-k the experts' contributions are added in the union's
        order). Prefill is not batched: a prompt runs through `forward` alone."""
        c, rec = self.config, self.rec
        xs = [F.embedding(torch.tensor([t], device=self.device), self.embed) for t in tokens]
        where = [(cache.pos, *self.positions(cache.pos, 1)) for cache in caches]
        for block in self.blocks:
            t0 = rec.mark()
            for i, cache in enumerate(caches):
                pos0, positions, rotations, temperature = where[i]
                q, k, v = attention_inputs(c, xs[i], block, rotations, temperature)
                xs[i] = attention_output(xs[i], self.attend(q, k, v, block, pos0, positions, cache.layers[block.index]), block)
            rec.add(("attention", t0, rec.mark(), block.index))
            if isinstance(block.ffn, MoEWeights):
                xs = [x + out for x, out in zip(xs, self.moe_batch(xs, block))]
            else:
                xs = [dense_mlp(c, x, block) for x in xs]
        for cache in caches:
            cache.pos += 1
        t = rec.mark()
        logits = torch.cat([lm_head(c, x, self.norm, self.lm_head) for x in xs])
        rec.add(("lm head", t, rec.mark(), -1))
        return logits

    def moe_batch(self, xs: list[torch.Tensor], block: Block) -> list[torch.Tensor]:
        """The MoE of one token of each sequence: one `prepare` for all, each expert fetched once."""
        ffn: MoEWeights = block.ffn
        rec, layer = self.rec, block.index
        t = rec.mark()
        hs, routes = [], []
        for x in xs:
            h, top_experts, scores = moe_inputs(self.config, x, block)
            hs.append(h)
            routes.append((top_experts, scores))
        if self.on_route is not None:
            self.on_route((layer, torch.cat([r[0] for r in routes]), torch.cat([r[1] for r in routes])))
        chosen = [r[0][0].tolist() for r in routes]
        users: dict[int, list[int]] = {}  # expert -> the sequences that chose it
        for i, experts in enumerate(chosen):
            for e in experts:
                users.setdefault(e, []).append(i)
        wanted = self.experts.prepare(layer, list(users), torch.cat(hs))
        t_router = rec.mark()
        rec.add(("router", t, t_router, layer))
        outs = [swiglu(h, ffn.shared.gate_up, ffn.shared.down) for h in hs]
        rec.add(("shared expert", t_router, rec.mark(), layer))
        for e in wanted:
            expert = self.experts.get(layer, e)  # once per step, whichever sequences use it
            t = rec.mark()
            for i in users[e]:
                k = chosen[i].index(e)
                outs[i] = outs[i] + expert(hs[i] * routes[i][1][:, k:k + 1])
            rec.add(("expert", t, rec.mark(), (layer, e, "CPU experts" if expert.on_cpu else "compute")))
        return outs

    def attend(self, q, k, v, block: Block, pos0: int, positions, layer_cache) -> torch.Tensor:
        if layer_cache is not None:  # the cache stores k/v and attends over whatever tiers hold them
            return layer_cache.attend(q, k, v, pos0, positions)
        chunk = self.config.attention_chunk_size if self.config.uses_rope(block.index) else None
        return attend(q, k, v, positions, pos0, chunk)

    def moe(self, x: torch.Tensor, block: Block) -> torch.Tensor:
        """The MoE block's output for the residual stream x (its norm, routing, shared and routed experts)."""
        ffn: MoEWeights = block.ffn
        rec, layer = self.rec, block.index
        t = rec.mark()
        h, top_experts, scores = moe_inputs(self.config, x, block)
        wanted = self.choose(h, block, top_experts, scores)
        t_router = rec.mark()
        rec.add(("router", t, t_router, layer))
        out = swiglu(h, ffn.shared.gate_up, ffn.shared.down)
        rec.add(("shared expert", t_router, rec.mark(), layer))
        return self.routed(h, block, top_experts, scores, wanted, out)

    def choose(self, x: torch.Tensor, block: Block, top_experts: torch.Tensor, scores: torch.Tensor) -> list[int]:
        """Tell the expert source everything this step needs first: it starts every copy, and answers
        with the order to compute in (experts already in place first)."""
        if self.on_route is not None:
            self.on_route((block.index, top_experts, scores))
        chosen = top_experts[0].tolist() if x.shape[0] == 1 else top_experts.unique().tolist()
        return self.experts.prepare(block.index, chosen, x)

    def routed(self, x: torch.Tensor, block: Block, top_experts, scores, wanted: list[int], out: torch.Tensor) -> torch.Tensor:
        """out (the shared expert's) plus each token's routed experts, computed in the order `wanted`."""
        rec, layer = self.rec, block.index
        for e in wanted:
            expert = self.experts.get(layer, e)  # the only place routed weights are touched
            t = rec.mark()
            if x.shape[0] == 1 and len(wanted) == 1:  # decode, top-1: one expert, no scatter
                out = out + expert(x * scores)
            else:
                rows, slots = (top_experts == e).nonzero(as_tuple=True)
                out.index_add_(0, rows, expert(x[rows] * scores[rows, slots, None]))
            rec.add(("expert", t, rec.mark(), (layer, e, "CPU experts" if expert.on_cpu else "compute")))
        return out

    # --- the one-token step as replayed parts (model/graphs.py) ------------------------------------
    @torch.inference_mode()
    def capture_graphs(self, capture: bool = True) -> str | None:
        """Build the one-token step's fixed-shape parts: CUDA graphs, or (capture=False) their CPU twin.
        None when built (later one-token steps replay them), else the note saying why not."""
        self.graphs = None
        c = self.config
        if capture and any(isinstance(m, (Int8Linear, Int4Linear)) for m in self._matrices()):
            return ("CUDA graphs off with --resident-dtype int8 / int4: on a GPU each call dequantizes a whole matrix, "
                    "and a graph's memory pool would hold those copies for good")
        x = torch.zeros(1, c.hidden_size, device=self.device, dtype=self.dtype)
        out = torch.zeros(1, c.num_attention_heads * c.head_dim, device=self.device, dtype=self.dtype)
        graphs = StepGraphs(capture)
        try:
            graphs.build(self._graph_parts(x, out, *self.positions(0, 1)[1:]))
        except CaptureFailed as e:
            return f"CUDA graphs off, decoding op by op ({e}); --enforce-eager skips trying"
        self.graphs = graphs
        return None

    def _matrices(self):
        for b in self.blocks:
            mlp = b.ffn.shared if isinstance(b.ffn, MoEWeights) else b.ffn
            yield from (b.attn.qkv, b.attn.o, mlp.gate_up, mlp.down)
        yield self.lm_head

    def _position_input(self, block: Block, rotations, temperature):
        """What a layer's qkv part takes besides x: RoPE rotations, the NoPE temperature, or nothing."""
        c = self.config
        if c.uses_rope(block.index):
            return (rotations,)
        return (temperature,) if c.attn_temperature_tuning else ()

    def _graph_parts(self, x, out, rotations, temperature) -> list:
        """(key, function, example inputs) of every part, in step order. The functions hold the weights
        and the config, not the model (which holds them: no reference cycle keeps a closed model alive)."""
        c = self.config
        parts = []
        for b in self.blocks:
            def qkv(x, position=None, b=b):  # position: the layer's rotations or temperature, whichever it uses
                return attention_inputs(c, x, b, position, position)

            parts.append(((b.index, "qkv"), qkv, (x, *self._position_input(b, rotations, temperature))))
            if isinstance(b.ffn, MoEWeights):
                def route_part(x, out, b=b):
                    x = attention_output(x, out, b)
                    return (x, *moe_inputs(c, x, b))

                def shared(h, b=b):
                    return swiglu(h, b.ffn.shared.gate_up, b.ffn.shared.down)

                parts += [((b.index, "route"), route_part, (x, out)), ((b.index, "shared"), shared, (x,))]
            else:
                def mlp(x, out, b=b):
                    return dense_mlp(c, attention_output(x, out, b), b)

                parts.append(((b.index, "mlp"), mlp, (x, out)))
        norm, head = self.norm, self.lm_head
        parts.append(("head", lambda x: lm_head(c, x, norm, head), (x,)))
        return parts

    def graphed_step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """forward() of one token through the parts: the same ops in the same order, attention and the
        routed experts eager between them. Not profiled: a profiled run decodes op by op."""
        g, pos0 = self.graphs, cache.pos
        positions, rotations, temperature = self.positions(pos0, 1)
        x = F.embedding(ids.to(self.device), self.embed)
        for block in self.blocks:
            i = block.index
            q, k, v = g((i, "qkv"), x, *self._position_input(block, rotations, temperature))
            out = self.attend(q, k, v, block, pos0, positions, cache.layers[i])
            if isinstance(block.ffn, MoEWeights):
                x, h, top_experts, scores = g((i, "route"), x, out)
                if self.on_route is not None:  # the trace keeps them: not the parts' own tensors
                    top_experts, scores = top_experts.clone(), scores.clone()
                wanted = self.choose(h, block, top_experts, scores)
                x = x + self.routed(h, block, top_experts, scores, wanted, g((i, "shared"), h))
            else:
                x = g((i, "mlp"), x, out)
        cache.pos += 1
        return g("head", x).clone()
