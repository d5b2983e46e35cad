"""Quality of each expert format on the embedded model's held-out text: perplexity vs bf16, one run.

    python benchmarks/quality_formats.py [--tokens 8192]

Every routed expert is stored and multiplied in the format (quantized once, when placed); attention,
routers and the shared experts stay as they are, except in the last rows (`--resident-dtype int8` /
`int4`: the attention, shared-expert and lm_head matrices in int8 / int4 too). The held-out text is the last 10% of the
conversations the model never trained on (moestream/data/shakespeare.py), scored in windows of 512
tokens, each predicting its own next tokens. Also prints host bytes per expert, so quality can be
read next to what each format saves. Deterministic (no sampling): the figures repeat exactly.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import moestream
from moestream.data.shakespeare import held_out_ids
from moestream.model.formats import FORMATS as FORMATS_BY_NAME

FORMATS = ("bf16", "fp8", "int8", "int4", "int2")


def perplexity(logits_of, ids: torch.Tensor, window: int = 512) -> float:
    """exp of the mean next-token loss, each window of `ids` scored by logits_of (llm.logits: the
    window at once; llm.decode_logits: one token at a time through the KV cache, the steps miss
    replicas act on)."""
    total, count = 0.0, 0
    for i in range(0, ids.numel(), window):
        chunk = ids[i:i + window]
        if chunk.numel() < 2:
            break
        total += F.cross_entropy(logits_of(chunk)[:-1], chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)


def miss_rows(base, ids: torch.Tensor, names: list[str]) -> None:
    """--miss-dtype: a 25% expert cache, decoded token by token, every miss from the replica (experts
    at the default dtype, float32 on the CPU: the cache is sized from the base model's shapes)."""
    c = base.config
    slots = base.plan.n_experts // 4
    cache = str(slots * FORMATS_BY_NAME["f32"].nbytes(c.hidden_size, c.intermediate_size))
    print(f"\nmiss replicas: {slots} of {base.plan.n_experts} experts cached, decoded one token at a time ({ids.numel()} tokens), "
          "every decoded miss run from the replica")
    print("| --miss-dtype | decode perplexity | vs off | misses run from the replica | expert bytes host->device per token | replica RAM |")
    print("|---|---|---|---|---|---|")
    ref = None
    for name in ["off", *names]:
        llm = moestream.load(expert_cache=cache, miss_dtype=name, cpu_experts="never")
        ppl = perplexity(llm.decode_logits, ids)
        ref = ppl if ref is None else ref
        e = llm.stats().experts
        print(f"| {name} | {ppl:.4f} | {100 * (ppl / ref - 1):+.2f}% | {e.replica_runs / max(e.misses, 1):.0%} | "
              f"{e.bytes_host_to_device / ids.numel() / 1024:.1f} KiB | {e.replica_bytes / 2**20:.2f} MiB |")
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--miss", default="int4,int2", help="miss-replica formats to score (decoded, 25%% cache)")
    ap.add_argument("--miss-tokens", type=int, default=2048)
    ap.add_argument("--resident-int8", default="bf16,int4", help="expert formats to score again with --resident-dtype int8")
    ap.add_argument("--resident-int4", default="int4", help="expert formats to score again with --resident-dtype int4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = moestream.load(expert_dtype="bf16")
    ids = torch.tensor(held_out_ids(base.tokenizer, args.tokens))
    ref = perplexity(base.logits, ids)
    print(f"embedded model, {ids.numel()} held-out tokens, windows of 512, CPU float32 activations")
    print("| experts | bytes per expert | vs bf16 | held-out perplexity | vs bf16 |")
    print("|---|---|---|---|---|")
    bf16_bytes = base.plan.expert_bytes
    rows = [(name, "auto") for name in args.formats.split(",")] + [
        (name, resident) for resident, names in (("int8", args.resident_int8), ("int4", args.resident_int4))
        for name in names.split(",") if name]
    for name, resident in rows:
        same = name == "bf16" and resident == "auto"
        llm = base if same else moestream.load(expert_dtype=name, resident_dtype=resident)
        ppl = ref if same else perplexity(llm.logits, ids)
        eb = llm.plan.expert_bytes
        label = name + (f" + resident {resident}" if resident != "auto" else "")
        print(f"| {label} | {eb} | {eb / bf16_bytes:.3f} | {ppl:.4f} | {100 * (ppl / ref - 1):+.2f}% |")
    if args.miss:
        miss_rows(base, ids[:args.miss_tokens], args.miss.split(","))


if __name__ == "__main__":
    main()
