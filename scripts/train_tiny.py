"""Train the embedded default model: a small Llama-4-architecture MoE that talks like Shakespeare.

    python scripts/train_tiny.py                 # ~15 minutes on 2 CPU cores
    python scripts/train_tiny.py --steps 20 --out /tmp/m   # a smoke run

What it makes (moestream/data/default/, Hugging Face layout, loadable by transformers unchanged):
- a byte-level BPE tokenizer (4096 tokens) carrying the Llama 4 special tokens;
- 8 decoder layers, every one MoE (16 routed experts, top-1, plus a shared expert), RoPE layers
  with chunked attention (chunk 64) and NoPE layers 3 and 7 with global attention and temperature
  tuning, GQA 4 query / 2 KV heads;
- training text formatted as conversations in the chat template: one speaker's lines are the user
  turn, the next speaker's reply (with the speaker's name) is the assistant turn.

The forward pass is top-1 (only the chosen expert runs per token) and reuses the building blocks of
moestream/model/llama4.py, with a batch dimension. A switch-style load-balancing loss keeps every
expert in use. Everything is seeded; the figures it prints go in the README.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moestream.data.shakespeare import conversations, split
from moestream.model.config import ModelConfig
from moestream.model.attention import visibility
from moestream.model.llama4 import apply_rope, attention_temperature, rms_norm, rope_inv_freq, rope_rotations, route
from moestream.model.tokenizer import LLAMA4_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>",
    "<|finetune_right_pad|>", "<|python_start|>", "<|python_end|>",
]
MODEL = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=192, intermediate_size_mlp=384, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=16, num_experts_per_tok=1,
    attention_chunk_size=64, floor_scale=64, attn_scale=0.1, max_position_embeddings=4096,
)


# --- data ----------------------------------------------------------------------------------------
def render(messages: list[dict]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(LLAMA4_TEMPLATE).render(messages=messages, add_generation_prompt=False, bos_token=SPECIAL_TOKENS[0])


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# --- the model being trained (same math as moestream/model/llama4.py, batched, top-1) -------------
class TinyLlama4(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        D, F_, E, L = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_hidden_layers
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        std = 0.02
        P = lambda *shape, s=std: nn.Parameter(torch.randn(*shape) * s)  # noqa: E731
        out_std = std / math.sqrt(2 * L)
        self.embed = P(c.vocab_size, D)
        self.lm_head = P(c.vocab_size, D)
        self.norm = nn.Parameter(torch.ones(D))
        self.layers = nn.ModuleList()
        for _ in range(L):
            layer = nn.ParameterDict(dict(
                attn_norm=nn.Parameter(torch.ones(D)), ffn_norm=nn.Parameter(torch.ones(D)),
                q=P(q, D), k=P(kv, D), v=P(kv, D), o=P(D, q, s=out_std),
                router=P(E, D), gate=P(F_, D), up=P(F_, D), down=P(D, F_, s=out_std),
                gate_up_proj=P(E, D, 2 * F_), down_proj=P(E, F_, D, s=out_std),
            ))
            self.layers.append(layer)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)

    def forward(self, ids: torch.Tensor):
        c = self.config
        B, T = ids.shape
        pos = torch.arange(T)
        rotations = rope_rotations(self.inv_freq, pos)
        masks = {True: visibility(pos, pos, c.attention_chunk_size), False: visibility(pos, pos, None)}
        x = F.embedding(ids, self.embed)
        aux, usage = 0.0, []
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
            q = F.linear(h, w["q"]).view(B, T, c.num_attention_heads, c.head_dim)
            k = F.linear(h, w["k"]).view(B, T, c.num_key_value_heads, c.head_dim)
            v = F.linear(h, w["v"]).view(B, T, c.num_key_value_heads, c.head_dim)
            rope = c.uses_rope(i)
            if rope:
                q, k = apply_rope(q, rotations), apply_rope(k, rotations)
                q, k = rms_norm(q, None, c.rms_norm_eps), rms_norm(k, None, c.rms_norm_eps)
            else:
                q = q * attention_temperature(pos, c)[:, None, None]
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=masks[rope], enable_gqa=True
            )
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, -1), w["o"])

            h = rms_norm(x, w["ffn_norm"], c.rms_norm_eps).reshape(B * T, -1)
            top, scores, logits = route(h, w["router"], 1)
            out = F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])  # shared expert
            top = top[:, 0]
            routed = torch.zeros_like(h)
            for e in range(c.num_local_experts):  # top-1: each expert sees only its own tokens
                rows = (top == e).nonzero(as_tuple=True)[0]
                if rows.numel():
                    gate, up = ((h[rows] * scores[rows]) @ w["gate_up_proj"][e]).chunk(2, dim=-1)
                    routed = routed.index_add(0, rows, (F.silu(gate) * up) @ w["down_proj"][e])
            x = x + (out + routed).view(B, T, -1)
            # switch-transformer balance loss: E * sum_e (token share of e) * (mean router prob of e)
            share = torch.bincount(top, minlength=c.num_local_experts).float() / top.numel()
            aux = aux + c.num_local_experts * (share * logits.softmax(-1).mean(0)).sum()
            usage.append(share)
        logits = F.linear(rms_norm(x, self.norm, c.rms_norm_eps), self.lm_head)
        return logits, aux / len(self.layers), torch.stack(usage)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"model.embed_tokens.weight": self.embed, "lm_head.weight": self.lm_head, "model.norm.weight": self.norm}
        for i, w in enumerate(self.layers):
            p, f = f"model.layers.{i}.", f"model.layers.{i}.feed_forward."
            sd |= {
                p + "input_layernorm.weight": w["attn_norm"], p + "post_attention_layernorm.weight": w["ffn_norm"],
                **{p + f"self_attn.{n}_proj.weight": w[n] for n in "qkvo"},
                f + "router.weight": w["router"], f + "experts.gate_up_proj": w["gate_up_proj"],
                f + "experts.down_proj": w["down_proj"],
                **{f + f"shared_expert.{n}_proj.weight": w[n] for n in ("gate", "up", "down")},
            }
        return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}


# --- files ---------------------------------------------------------------------------------------
def hf_config(tok: Tokenizer) -> dict:
    m = MODEL
    n = m["num_hidden_layers"]
    no_rope = [int((i + 1) % 4 != 0) for i in range(n)]
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "dtype": "bfloat16",
        **m, "hidden_act": "silu", "rms_norm_eps": 1e-5, "initializer_range": 0.02,
        "moe_layers": list(range(n)), "interleave_moe_layer_step": 1, "no_rope_layers": no_rope,
        "no_rope_layer_interval": 4, "layer_types": ["chunked_attention" if r else "full_attention" for r in no_rope],
        "use_qk_norm": True, "attn_temperature_tuning": True, "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
        "eos_token_id": [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom|>", "<|eot|>")],
        "pad_token_id": tok.token_to_id("<|finetune_right_pad|>"), "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.01, "router_jitter_noise": 0.0, "output_router_logits": False, "use_cache": True,
    }


def save(out: Path, model: TinyLlama4, tok: Tokenizer, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(tok)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>", "model_max_length": MODEL["max_position_embeddings"],
        "add_bos_token": False, "chat_template": LLAMA4_TEMPLATE,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"],
        "do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 40,
    }, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")


# --- training ------------------------------------------------------------------------------------
def batches(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: TinyLlama4, stream: torch.Tensor, seq: int, limit: int = 64):
    model.eval()
    losses, usage = [], []
    n = min(limit, (stream.numel() - 1) // seq)
    for i in range(0, n, 8):
        rows = [stream[j * seq:(j + 1) * seq + 1] for j in range(i, min(i + 8, n))]
        chunk = torch.stack(rows)
        logits, _, use = model(chunk[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()).item())
        usage.append(use)
    model.train()
    return sum(losses) / len(losses), torch.stack(usage).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "moestream" / "data" / "default")
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "tinyshakespeare.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)

    train_convs, val_convs = split(conversations(args.text.read_text()))
    tok = train_tokenizer([m["content"] for c in train_convs for m in c], MODEL["vocab_size"])
    encode = lambda convs: torch.tensor([i for c in convs for i in tok.encode(render(c), add_special_tokens=False).ids])  # noqa: E731
    train, val = encode(train_convs), encode(val_convs)
    print(f"{len(train_convs)} + {len(val_convs)} conversations, {train.numel()} train / {val.numel()} validation tokens")

    config = ModelConfig.from_dict(hf_config(tok))
    model = TinyLlama4(config)
    total = sum(p.numel() for p in model.parameters())
    print(f"{total / 1e6:.2f}M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    )
    data = batches(train, args.batch, args.seq, torch.Generator().manual_seed(0))
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x, y = next(data)
        logits, aux, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + args.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step}/{args.steps}  loss {loss.item():.3f}  aux {aux.item():.3f}  {el / step:.2f}s/step", flush=True)

    # report on the bf16 weights actually shipped
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    val_loss, usage = evaluate(model, val, args.seq)
    report = {
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "parameters": total,
        "train_seconds": round(time.time() - t0, 1), "train_loss": round(loss.item(), 4),
        "val_loss": round(val_loss, 4), "val_tokens_evaluated": min(64, (val.numel() - 1) // args.seq) * args.seq,
        "expert_share_min": round(usage.min().item(), 4), "expert_share_max": round(usage.max().item(), 4),
        "expert_share_per_layer": [[round(v, 4) for v in row] for row in usage.tolist()],
    }
    save(args.out, model, tok, report)
    print(json.dumps({k: v for k, v in report.items() if k != "expert_share_per_layer"}))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
