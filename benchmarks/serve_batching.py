"""`moestream serve` under concurrent load, one run: aggregate decode tok/s and expert bytes moved per
generated token at batch 1, 4 and 16, on the embedded model with a 25% expert cache.

    python benchmarks/serve_batching.py [--tg 128] [--pp 16] [--client auto|llama-benchy|openai]

The server runs as users run it (`moestream serve --expert-cache <32 of 128 experts> --max-batch 16
--cpu-experts never`: every miss is a copy into the cache, so the bytes are the link's). The load
comes from an independent OpenAI-compatible benchmark client, llama-benchy (`pip install llama-benchy`,
best in a venv of its own; found on PATH), given the embedded model's tokenizer and a book served
from loopback (it cannot download one here); without it, from the official `openai` client, B
threads streaming at once. Each batch size is B concurrent chat requests of --tg tokens (ignore_eos)
after --pp-token prompts of different text; the server's /metrics before and after give the tokens
generated, the expert bytes moved (the prompts' prefill included: short prompts keep decode the most
of it) and the mean decode batch. Bytes per token falls with the batch: each MoE layer fetches the
union of the step's experts once for all of its sequences.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import moestream
from moestream.config import DEFAULT_MODEL

BOOK = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
BATCHES = (1, 4, 16)
CACHED = 32  # of the embedded model's 128 experts: 25%


def start_server(expert_bytes: int) -> tuple[subprocess.Popen, str]:
    argv = [sys.executable, "-m", "moestream", "serve", "--port", "0", "--max-batch", str(max(BATCHES)),
            "--max-queue", "16", "--expert-cache", str(CACHED * expert_bytes), "--cpu-experts", "never", "--temp", "0"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " on http://" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining it
            return proc, line.split(" on ", 1)[1].split()[0].removesuffix("/v1")
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics") as r:
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in r.read().decode().splitlines()
                if line and not line.startswith("#")}


def serve_book() -> tuple[http.server.HTTPServer, str]:
    """The book llama-benchy cuts prompts from, on loopback."""
    text = BOOK.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/tinyshakespeare.txt"


def run_benchy(benchy: str, url: str, book_url: str, batch: int, pp: int, tg: int) -> float:
    """llama-benchy's total generation throughput (tokens/s) for one concurrency level."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([benchy, "--base-url", url + "/v1", "--model", "moestream-embedded", "--tokenizer",
                        str(DEFAULT_MODEL), "--book-url", book_url, "--pp", str(pp), "--tg", str(tg), "--concurrency",
                        str(batch), "--runs", "1", "--no-warmup", "--no-adapt-prompt", "--skip-coherence",
                        "--latency-mode", "none", "--exact-tg", "--format", "json", "--save-result", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        run = json.loads(out.read_text())["benchmarks"][0]
        return run["tg_throughput"]["mean"]


def run_openai(url: str, batch: int, pp: int, tg: int, text: str) -> float:
    """Generated tokens over the span from the first token to the last, B streams at once."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(i):
        start = 4000 * (i + 1)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": text[start:start + 4 * pp]}], max_tokens=tg,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first, tokens = None, 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return first, time.perf_counter(), tokens

    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        results = list(pool.map(one, range(batch)))
    span = max(r[1] for r in results) - min(r[0] for r in results)
    return sum(r[2] for r in results) / span


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tg", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--pp", type=int, default=16, help="prompt tokens per request (about)")
    ap.add_argument("--client", choices=("auto", "llama-benchy", "openai"), default="auto")
    args = ap.parse_args()
    benchy = shutil.which("llama-benchy") if args.client != "openai" else None
    if args.client == "llama-benchy" and benchy is None:
        raise SystemExit("llama-benchy is not on PATH: pip install llama-benchy (in a venv of its own)")
    client = "llama-benchy 0.4.0" if benchy else "openai (threads)"

    llm = moestream.load()
    expert_bytes = llm.plan.expert_bytes
    llm.close()
    proc, url = start_server(expert_bytes)
    book, book_url = serve_book()
    text = BOOK.read_text()
    rows = []
    try:
        run = (lambda b: run_benchy(benchy, url, book_url, b, args.pp, args.tg)) if benchy else \
              (lambda b: run_openai(url, b, args.pp, args.tg, text))
        run(1)  # warm up: first calls, the expert cache's first fills
        for batch in BATCHES:
            before = metrics(url)
            client_tps = run(batch)
            after = metrics(url)
            d = {k: after[k] - before.get(k, 0.0) for k in after}
            tokens = d["moestream_tokens_generated_total"]
            looked = d["moestream_expert_hits_total"] + d["moestream_expert_misses_total"]
            rows.append((batch, int(tokens), client_tps,
                         d['moestream_expert_bytes_total{link="host_to_device"}'] / tokens,
                         d["moestream_decode_tokens_total"] / max(d["moestream_decode_steps_total"], 1),
                         d["moestream_expert_hits_total"] / looked if looked else 0.0))
    finally:
        book.shutdown()
        proc.terminate()
        proc.wait(30)

    print(f"moestream serve, embedded model, expert cache {CACHED}/128 experts ({CACHED * expert_bytes / 2**20:.2f} MiB), "
          f"--cpu-experts never, {platform.processor() or platform.machine()}; client: {client}; "
          f"{args.tg} tokens per request after ~{args.pp}-token prompts\n")
    print("| batch | tokens generated | aggregate decode tok/s | expert bytes / generated token | mean decode batch | "
          "expert hit rate |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, tokens, client_tps, bpt, mean_batch, hit in rows:
        print(f"| {batch} | {tokens} | {client_tps:.1f} | {bpt / 1024:.1f} KiB | {mean_batch:.2f} | {hit:.1%} |")
    per_token = [r[3] for r in rows]
    assert per_token[0] > per_token[1] > per_token[2], "expert bytes per token should fall with the batch"


if __name__ == "__main__":
    main()
