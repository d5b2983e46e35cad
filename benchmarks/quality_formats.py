"""Quality of each expert format on the embedded model's held-out text: perplexity vs bf16, one run.

    python benchmarks/quality_formats.py [--tokens 8192]

Every routed expert is stored and multiplied in the format (quantized once, when placed); attention,
routers and the shared experts stay as they are, except in the last rows (`--resident-dtype int8`:
the attention, shared-expert and lm_head matrices in int8 too). The held-out text is the last 10% of the
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

FORMATS = ("bf16", "fp8", "int8", "int4", "int2")


def perplexity(llm, ids: torch.Tensor, window: int = 512) -> float:
    total, count = 0.0, 0
    for i in range(0, ids.numel(), window):
        chunk = ids[i:i + window]
        if chunk.numel() < 2:
            break
        total += F.cross_entropy(llm.logits(chunk)[:-1], chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--resident-int8", default="bf16,int4", help="expert formats to score again with --resident-dtype int8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = moestream.load(expert_dtype="bf16")
    ids = torch.tensor(held_out_ids(base.tokenizer, args.tokens))
    ref = perplexity(base, ids)
    print(f"embedded model, {ids.numel()} held-out tokens, windows of 512, CPU float32 activations")
    print("| experts | bytes per expert | vs bf16 | held-out perplexity | vs bf16 |")
    print("|---|---|---|---|---|")
    bf16_bytes = base.plan.expert_bytes
    rows = [(name, "auto") for name in args.formats.split(",")] + [(name, "int8") for name in args.resident_int8.split(",") if name]
    for name, resident in rows:
        same = name == "bf16" and resident == "auto"
        llm = base if same else moestream.load(expert_dtype=name, resident_dtype=resident)
        ppl = ref if same else perplexity(llm, ids)
        eb = llm.plan.expert_bytes
        label = name + (" + resident int8" if resident == "int8" else "")
        print(f"| {label} | {eb} | {eb / bf16_bytes:.3f} | {ppl:.4f} | {100 * (ppl / ref - 1):+.2f}% |")


if __name__ == "__main__":
    main()
