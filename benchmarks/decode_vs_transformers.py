"""Decode speed of moestream vs transformers (eager) on the same model, same CPU, one run.

    python benchmarks/decode_vs_transformers.py            # the embedded model
    python benchmarks/decode_vs_transformers.py -m DIR -n 64

transformers' eager Llama 4 MoE multiplies every expert every step (a zeroed input for the ones a
token did not pick); moestream runs only the chosen ones. Both decode greedily with a KV cache from
the same prompt; prefill is timed separately and subtracted, so the figure is decode tokens/s.
Requires the test extra (transformers).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import moestream
from moestream.model.sampling import SamplingParams


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None, help="checkpoint directory (default: embedded model)")
    ap.add_argument("-n", type=int, default=64, help="tokens to decode")
    ap.add_argument("-r", type=int, default=3, help="repetitions (best is kept)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Llama4ForCausalLM

    llm = moestream.load(args.model, device="cpu", dtype="float32")
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What say you to this, my good lord?"}])
    hf = Llama4ForCausalLM.from_pretrained(llm.runtime.model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # both decode exactly n tokens, end-of-turn or not
    ids = torch.tensor([prompt])

    def ours(n):
        llm.reset()
        return llm.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=n), stop_ids=set())

    def theirs(n):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()

    assert ours(16) == theirs(16), "greedy tokens differ: the comparison would be meaningless"
    rows = []
    for name, fn in (("moestream", ours), ("transformers eager", theirs)):
        fn(4)  # warm-up
        prefill = best_of(lambda: fn(1), args.r)
        total = best_of(lambda: fn(args.n + 1), args.r)
        rows.append((name, args.n / (total - prefill)))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {llm.runtime.model} ({llm.config.num_hidden_layers} layers, {llm.config.num_local_experts} experts, top-{llm.config.num_experts_per_tok})")
    print(f"| runtime | decode tok/s (greedy, {args.n} tokens, best of {args.r}) |")
    print("|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.1f} |")
    print(f"ratio moestream / transformers: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
