"""`moestream serve`: the batcher in-process, then the real server process through the official `openai` client.

The batcher first (scheduler/batch.py): replies decoded together equal each one generated alone by the
LLM, token for token, with experts offloaded (a 25% cache) and KV spilled to host RAM. Then the
command itself on a free loopback port: chat and completions, streaming or not, stop strings, seeds,
the key, every bad request answered with a 400 in OpenAI's error JSON, batched replies equal to the
same requests run alone, a bounded queue (503 + Retry-After), and a load of streaming clients of
which a quarter disconnect midway: the server stays up and returns to idle (read from /metrics).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import signal
import subprocess
import sys
import threading
import time

import http.client
import openai
import psutil
import pytest

import moestream
from moestream.errors import MoestreamError
from moestream.model.sampling import SamplingParams
from moestream.scheduler.batch import Batcher, QueueFull, Request

KEY = "test-key-7f3a"
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. ")
# offloaded and spilled, as the issue asks: a 25% expert cache (32 of the embedded model's 128 experts),
# 100 hot tokens per global layer (300KB), 16-token KV blocks, 16-token prefill micro-batches
EXPERTS_CACHED = 32
SPILL = ["--kv-gpu-mem", "300KB", "--kv-block", "16", "-ub", "16"]


@pytest.fixture(scope="module")
def expert_bytes(embedded):
    return embedded.plan.expert_bytes


# --- the batcher, in-process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def offloaded(expert_bytes):
    llm = moestream.load(expert_cache=str(EXPERTS_CACHED * expert_bytes), kv_gpu_mem="300KB", kv_block=16, ubatch=16)
    yield llm
    llm.close()


def run_batch(batcher, prompts, params, stop_ids=frozenset(), on_token=None):
    """Submit every request at once; (tokens, finish reason) of each."""
    out = [([], None) for _ in prompts]
    done = [threading.Event() for _ in prompts]
    requests = []
    for i, (p, prm) in enumerate(zip(prompts, params)):
        def token(t, i=i):
            out[i][0].append(t)
            if on_token is not None:
                on_token(i, t)

        def finished(reason, error, i=i):
            out[i] = (out[i][0], reason if error is None else f"{reason}: {error}")
            done[i].set()

        requests.append(Request(p, prm, set(stop_ids), token, finished))
        batcher.submit(requests[-1])
    for d in done:
        assert d.wait(120)
    return out, requests


def test_batched_replies_equal_each_alone_offloaded_and_spilled(offloaded):
    llm, tok = offloaded, offloaded.tokenizer
    prompts = [tok.encode(TEXT * (1 + i % 3))[: 40 + 17 * i] for i in range(8)]  # 40..159 tokens
    params = [SamplingParams.build(temperature=0, max_tokens=20 + i, ignore_eos=True) if i % 2 == 0 else
              SamplingParams.build(temperature=0.9, top_k=0, seed=100 + i, max_tokens=20 + i, ignore_eos=True,
                                   repetition_penalty=1.3 if i == 3 else 1.0) for i in range(8)]
    alone = [llm.generate_ids(p, prm, stop_ids=set()) for p, prm in zip(prompts, params)]
    batcher = Batcher(llm.generator, llm.request_sequence, llm.ctx_size, max_batch=8)
    seen = {"host": 0}

    def on_token(i, t):  # on the worker: its snapshot may be read here
        seen["host"] = max(seen["host"], batcher.snapshot().kv_tokens_host)

    try:
        out, _ = run_batch(batcher, prompts, params, on_token=on_token)
        stats = batcher.call(batcher.snapshot).result()
    finally:
        batcher.close()
    for i in range(8):
        assert out[i] == (alone[i], "length"), i
    assert seen["host"] > 0  # KV spilled while they ran
    assert stats.decode_tokens / stats.decode_steps > 2  # they did decode together
    assert stats.running == stats.queued == 0 and stats.kv_device_bytes == stats.kv_host_bytes == 0
    assert stats.generated_tokens == sum(p.max_tokens for p in params)


def test_batcher_cancels_bounds_its_queue_and_survives_a_failing_request(offloaded):
    llm, tok = offloaded, offloaded.tokenizer
    made = []

    def new_sequence(slot):
        made.append(slot)
        if len(made) == 2:  # the second sequence's KV cannot be made: that request fails, not the batcher
            raise MoestreamError("cannot write the KV disk file")
        return llm.request_sequence(slot)

    batcher = Batcher(llm.generator, new_sequence, llm.ctx_size, max_batch=1, max_queue=1)
    prompt = tok.encode(TEXT)
    long = SamplingParams.build(temperature=0, max_tokens=4000, ignore_eos=True)
    ended = {}
    events = {name: threading.Event() for name in ("first", "queued", "failing")}

    def request(name, on_token=print):
        def done(reason, error):
            ended[name] = (reason, str(error) if error else None)
            events[name].set()

        return Request(prompt, long, set(), on_token, done)

    try:
        with pytest.raises(MoestreamError):
            batcher.submit(Request(tok.encode(TEXT * 100), long, set(), print, print))  # over the context
        started = threading.Event()
        first = request("first", lambda t: started.set())
        batcher.submit(first)
        assert started.wait(60)
        queued = request("queued")
        batcher.submit(queued)  # the batch is full: it waits
        with pytest.raises(QueueFull):  # 1 in the batch + 1 waiting: no more room
            batcher.submit(request("more"))
        batcher.cancel(queued)  # dropped from the queue
        assert events["queued"].wait(30)
        batcher.cancel(first)  # dropped from the batch, its cache closed
        assert events["first"].wait(30)
        stats = batcher.call(batcher.snapshot).result()
        batcher.submit(request("failing"))
        assert events["failing"].wait(30)
        ok, _ = run_batch(batcher, [prompt], [SamplingParams.build(temperature=0, max_tokens=5)])
    finally:
        batcher.close()
    assert ended == {"first": ("cancelled", None), "queued": ("cancelled", None),
                     "failing": ("error", "cannot write the KV disk file")}
    assert stats.running == stats.queued == 0 and stats.kv_device_bytes == 0
    assert stats.finished["cancelled"] == 2 and stats.requests == 1
    assert ok[0][1] in ("stop", "length") and ok[0][0]  # it still serves


def test_each_request_spills_to_a_kv_disk_file_of_its_own(tmp_path):
    disk = tmp_path / "kv.bin"
    llm = moestream.load(kv_gpu_mem="300KB", kv_cpu_mem="40KB", kv_disk=str(disk), kv_block=16, ubatch=16)
    tok, files, most_on_disk = llm.tokenizer, set(), [0]
    prompts = [tok.encode(TEXT * 4)[: 170 + 20 * i] for i in range(3)]  # past 100 hot + 32 host tokens
    params = [SamplingParams.build(temperature=0, max_tokens=12, ignore_eos=True)] * 3
    batcher = None
    try:
        alone = [llm.generate_ids(p, prm, stop_ids=set()) for p, prm in zip(prompts, params)]
        batcher = Batcher(llm.generator, llm.request_sequence, llm.ctx_size, max_batch=3)

        def on_token(i, t):
            files.update(p.name for p in tmp_path.iterdir())
            most_on_disk[0] = max(most_on_disk[0], batcher.snapshot().kv_tokens_disk)

        out, _ = run_batch(batcher, prompts, params, on_token=on_token)
        assert [tokens for tokens, _ in out] == alone
        assert files == {"kv.bin", "kv.bin.0", "kv.bin.1", "kv.bin.2"} and most_on_disk[0] > 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kv.bin"]  # each removed with its request
    finally:
        if batcher is not None:
            batcher.close()
        llm.close()
    assert not disk.exists()


# --- the real server -----------------------------------------------------------------------------
class Answer:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status_code, self.headers, self.text = status, headers, body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


def http_request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 60) -> Answer:
    """One plain HTTP request (the stdlib's client): for what the openai client would not send."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class Served:
    """A `moestream serve` process on a free loopback port (--port 0: it prints the one it got)."""

    def __init__(self, *flags: str, key: str | None = None):
        argv = [sys.executable, "-m", "moestream", "serve", "--port", "0", *flags] + (["--api-key", key] if key else [])
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.key, self.lines, self.url = key, [], None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                if " on http://" in line:
                    self.url = line.split(" on ", 1)[1].split()[0].rstrip("/").removesuffix("/v1")
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.url is None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        deadline = time.time() + 60
        while True:
            try:
                if self.get("/health", timeout=5).status_code == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "".join(self.lines)
            time.sleep(0.1)

    def client(self, key: str | None = "default", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key if key == "default" else key, max_retries=0,
                             timeout=120, **kw)

    def get(self, path: str, key: bool = False, timeout: float = 60) -> Answer:
        return http_request(self.url, "GET", path, headers=self.headers() if key else {}, timeout=timeout)

    def post(self, path: str, body, timeout: float = 60) -> Answer:
        content = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        return http_request(self.url, "POST", path, content, {**self.headers(), "Content-Type": "application/json"},
                            timeout)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def metrics(self) -> dict[str, float]:
        r = self.get("/metrics", key=True)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in r.text.splitlines()
                if line and not line.startswith("#")}

    def idle(self, timeout: float = 30) -> dict[str, float]:
        """/metrics once nothing runs or waits (cancelled requests are dropped at the next step)."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if m["moestream_requests_running"] == 0 and m["moestream_requests_queued"] == 0:
                return m
            assert time.time() < deadline, m
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(expert_bytes):
    served = Served("--max-batch", "8", "--max-queue", "32", "--expert-cache", str(EXPERTS_CACHED * expert_bytes),
                    *SPILL, "--temp", "0", key=KEY)
    yield served
    assert served.stop() == 0, "".join(served.lines)
    assert "Traceback" not in "".join(served.lines), "".join(served.lines)


def chat(client, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def streamed(stream):
    """(text, finish reason, usage) of a stream of chat or completion chunks."""
    text, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(delta or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_models_health_and_the_key(server):
    assert server.get("/health").json() == {"status": "ok"}  # no key needed
    assert [m.id for m in server.client().models.list()] == ["moestream-embedded"]
    wrong = server.client(key="wrong")
    with pytest.raises(openai.AuthenticationError):
        chat(wrong, "Hello", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="m", prompt="Hi", max_tokens=2)
    body = json.dumps({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")):  # no key at all
        r = http_request(server.url, method, path, body if method == "POST" else None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_chat_and_completion_streaming_and_not(server, embedded):
    client = server.client()
    r = chat(client, "Good morrow, sir.", max_tokens=24)
    text, finish, usage = streamed(chat(client, "Good morrow, sir.", max_tokens=24, stream=True,
                                        stream_options={"include_usage": True}))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert (text, finish) == (r.choices[0].message.content, r.choices[0].finish_reason)
    assert finish in ("stop", "length") and usage == r.usage
    assert r.usage.prompt_tokens == len(embedded.tokenizer.encode_chat([{"role": "user", "content": "Good morrow, sir."}]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    c = client.completions.create(model="m", prompt="ROMEO:", max_tokens=12, extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 12
    text, finish, _ = streamed(client.completions.create(model="m", prompt="ROMEO:", max_tokens=12, stream=True,
                                                         extra_body={"ignore_eos": True}))
    assert (text, finish) == (c.choices[0].text, "length")
    # the same text as the library's own generate (the server's --temp 0 default)
    assert c.choices[0].text == embedded.generate("ROMEO:", max_tokens=12, temperature=0, ignore_eos=True)
    ids = embedded.tokenizer.encode("ROMEO:")
    assert client.completions.create(model="m", prompt=ids, max_tokens=12,
                                     extra_body={"ignore_eos": True}).choices[0].text == c.choices[0].text


def test_stop_strings_cut_the_text_there(server):
    client = server.client()
    full = client.completions.create(model="m", prompt="To be, or", max_tokens=40,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    r = client.completions.create(model="m", prompt="To be, or", max_tokens=40, stop=[stop, "never-seen"],
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:full.find(stop)], "stop")
    text, finish, _ = streamed(client.completions.create(model="m", prompt="To be, or", max_tokens=40, stop=stop,
                                                         stream=True, extra_body={"ignore_eos": True}))
    assert (text, finish) == (full[:full.find(stop)], "stop")


def test_seed_makes_sampling_reproducible(server):
    client = server.client()

    def sampled(seed):
        return chat(client, "What news?", max_tokens=30, temperature=1.0, top_p=0.95, seed=seed,
                    extra_body={"ignore_eos": True, "top_k": 0}).choices[0].message.content

    a, b, c = sampled(7), sampled(7), sampled(8)
    assert a == b and a != c


BAD = [
    ("/v1/chat/completions", "{not json", None),
    ("/v1/chat/completions", "[1, 2]", None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("/v1/chat/completions", {"model": "m"}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "king", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": True}, "top_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": 1}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5},
     "presence_penalty"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 999999]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_are_400_in_openai_error_json(server, path, body, param):
    r = server.post(path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "\n" not in error["message"]
    assert error["param"] == param


def test_a_prompt_longer_than_the_context_is_400_and_the_server_lives_on(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=TEXT * 200, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "context holds 4096" in e.value.message
    with pytest.raises(openai.BadRequestError):
        chat(client, TEXT * 200, max_tokens=4)
    assert server.post("/v1/completions", b"\xff\xfe" * 10).status_code == 400
    assert server.post("/v1/completions", "[" * 100000).status_code == 400
    assert server.get("/nowhere", key=True).status_code == 404
    assert server.get("/health").json() == {"status": "ok"}


def requests_of_8():
    """8 different requests: chat and completion, about 20 to 190 prompt tokens (half of them past the
    100 hot KV tokens, so they spill), greedy and seeded sampling."""
    out = []
    for i in range(8):
        extra = {"ignore_eos": True} | ({} if i % 2 == 0 else {"top_k": 0})
        sampling = dict(temperature=0) if i % 2 == 0 else dict(temperature=0.9, seed=50 + i)
        if i % 3 == 0:
            out.append(("chat", dict(messages=[{"role": "user", "content": (TEXT * 3)[: 80 + 120 * i]}],
                                     max_tokens=16 + i, extra_body=extra, **sampling)))
        else:
            out.append(("completion", dict(prompt=(TEXT * 3)[: 100 + 90 * i], max_tokens=16 + i, extra_body=extra,
                                           **sampling)))
    return out


def ask(client, kind, request):
    if kind == "chat":
        r = client.chat.completions.create(model="m", **request)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    r = client.completions.create(model="m", **request)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def test_8_concurrent_requests_equal_each_alone(server):
    client = server.client()
    requests = requests_of_8()
    alone = [ask(client, kind, request) for kind, request in requests]
    before = server.idle()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda kr: ask(client, *kr), requests))
    after = server.idle()
    assert together == alone
    assert all(finish == "length" for _, finish, _ in alone)
    steps = after["moestream_decode_steps_total"] - before["moestream_decode_steps_total"]
    fed = after["moestream_decode_tokens_total"] - before["moestream_decode_tokens_total"]
    assert fed / steps > 1.5  # they shared decode steps
    assert after['moestream_kv_bytes{tier="device"}'] == after['moestream_kv_bytes{tier="host"}'] == 0


def test_32_streaming_clients_a_quarter_disconnecting(server):
    """Bounded load on loopback: every finished reply is right, the disconnected ones are cancelled
    and their KV freed, and a second round leaves RSS where the first did."""
    client = server.client()
    prompts = [TEXT[: 40 + 60 * i] for i in range(4)]
    right = [client.completions.create(model="m", prompt=p, max_tokens=24, extra_body={"ignore_eos": True})
             .choices[0].text for p in prompts]

    def one(i):
        stream = client.completions.create(model="m", prompt=prompts[i % 4], max_tokens=24 if i % 4 else 200,
                                           stream=True, extra_body={"ignore_eos": True})
        if i % 4 == 0:  # a quarter go away after two pieces
            pieces = [next(iter(stream)).choices[0].text for _ in range(2)]
            stream.close()
            return "gone", "".join(pieces)
        return streamed(stream)[:2]

    rss = []
    for _ in range(2):
        before = server.idle()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(32)))
        after = server.idle()
        for i, (text, finish) in enumerate(results):
            if i % 4:
                assert (text, finish) == (right[i % 4], "length"), i
        cancelled = (after['moestream_requests_finished_total{reason="cancelled"}']
                     - before['moestream_requests_finished_total{reason="cancelled"}'])
        assert cancelled == 8
        assert after['moestream_kv_bytes{tier="device"}'] == after['moestream_kv_bytes{tier="host"}'] == 0
        assert after['moestream_kv_tokens{tier="device"}'] == after['moestream_kv_tokens{tier="host"}'] == 0
        rss.append(psutil.Process(server.proc.pid).memory_info().rss)
    assert rss[1] < rss[0] * 1.15 + 16 * 2**20, rss
    assert server.get("/health").json() == {"status": "ok"}


def test_a_client_that_times_out_cancels_its_request(server):
    before = server.idle()
    with pytest.raises(socket.timeout):  # not streaming: the server notices the closed connection
        server.post("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 4000, "ignore_eos": True}, timeout=1.0)
    after = server.idle()
    assert (after['moestream_requests_finished_total{reason="cancelled"}']
            - before['moestream_requests_finished_total{reason="cancelled"}']) == 1
    assert after["moestream_tokens_generated_total"] - before["moestream_tokens_generated_total"] < 4000


def test_metrics_carry_the_stats(server):
    m = server.metrics()
    for name in ("moestream_expert_hits_total", "moestream_expert_misses_total", "moestream_expert_stall_seconds_total",
                 'moestream_expert_bytes_total{link="host_to_device"}', 'moestream_expert_bytes_total{link="disk_to_host"}',
                 'moestream_kv_tokens{tier="device"}', 'moestream_kv_tokens{tier="host"}', 'moestream_kv_tokens{tier="disk"}',
                 "moestream_tokens_generated_total", "moestream_requests_running", "moestream_requests_queued",
                 "process_resident_memory_bytes"):
        assert name in m, name
    assert m["moestream_expert_misses_total"] > 0 and m['moestream_expert_bytes_total{link="host_to_device"}'] > 0
    assert m["moestream_expert_cache_slots"] == EXPERTS_CACHED
    assert m["moestream_tokens_generated_total"] > 0


def test_beyond_the_queue_is_503_with_retry_after():
    served = Served("--max-batch", "1", "--max-queue", "1")
    try:
        client = served.client(key="none")
        body = dict(model="m", prompt="ROMEO:", max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
        running = client.completions.create(**body)
        next(iter(running))
        waiting = client.completions.create(**body)  # the headers come back at once; it waits for a place
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(**body)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["type"] == "server_error"
        running.close()
        next(iter(waiting))  # it gets the place
        waiting.close()
        m = served.idle()
        assert m['moestream_requests_finished_total{reason="cancelled"}'] == 2 and m["moestream_requests_total"] == 2
        # a port in use is one line, before the model loads
        port = served.url.rsplit(":", 1)[1]
        r = subprocess.run([sys.executable, "-m", "moestream", "serve", "--port", port], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and r.stderr.startswith("error: cannot listen on 127.0.0.1:" + port)
        assert r.stderr.count("\n") == 1
    finally:
        assert served.stop() == 0, "".join(served.lines)
