"""The OpenAI-compatible server: HTTP in, the batcher's tokens out as text.

    POST /v1/chat/completions   messages rendered with the checkpoint's own chat template (images inline)
    POST /v1/completions        a prompt (text or token ids) completed as is
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"} while the batch worker runs (never behind the key)
    GET  /metrics               Prometheus text (metrics.py)

Every reply is one Request of the batcher (scheduler/batch.py), which runs on its own thread; its
tokens reach the event loop through an asyncio queue, and each reply turns them into text with its
own incremental decoder, holding back text that may begin a stop string (cut there, not sent:
finish_reason "stop", as OpenAI defines it). A client that goes away cancels its request, and the
batcher frees its KV cache at the next step. Anything wrong with a request is a 400 in OpenAI's
error JSON; a full batch and queue is a 503 with Retry-After; nothing a request sends stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from dataclasses import replace

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import MoestreamError
from ..model.sampling import SamplingParams
from ..scheduler.batch import Batcher, QueueFull, Request
from . import metrics

MAX_BODY = 32 * 2**20  # bytes of one request's JSON: a long context's text fits many times over
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4)
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An answer in OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, self.status, headers=self.headers)

    def body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


# --- reading a request -----------------------------------------------------------------------------
def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float's range
        return False


JSON_TYPES = {
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _shown(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or _finite(v) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def get(body: dict, name: str, kind: str):
    """body[name] if given (null = not given), of JSON type `kind`; else a 400 naming the field."""
    v = body.get(name)
    if v is not None and not JSON_TYPES[kind](v):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ApiError(400, f"'{name}' must be {article} {kind}, not {_shown(v)}", param=name)
    return v


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


async def read_json(http: HTTPRequest) -> dict:
    """The body as a JSON object, at most MAX_BODY bytes."""
    try:
        declared = int(http.headers.get("content-length") or 0)
    except ValueError:
        raise ApiError(400, "the Content-Length header is not a number") from None
    if declared > MAX_BODY:
        raise ApiError(413, f"the body is over {MAX_BODY} bytes")
    chunks, n = [], 0
    async for chunk in http.stream():
        n += len(chunk)
        if n > MAX_BODY:
            raise ApiError(413, f"the body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def sampling(body: dict, defaults: SamplingParams, chat: bool) -> SamplingParams:
    """The request's sampling fields over the server's defaults (its sampling flags), checked as the
    flags are. A field the server cannot honour is a 400, never silently ignored."""
    given = {}
    max_tokens = get(body, "max_completion_tokens", "integer") if chat else None
    name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = get(body, "max_tokens", "integer")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ApiError(400, f"'{name}' must be at least 1, not {max_tokens}", param=name)
        given["max_tokens"] = max_tokens
    fields = (("temperature", "temperature", "number"), ("top_p", "top_p", "number"), ("top_k", "top_k", "integer"),
              ("seed", "seed", "integer"), ("repeat_penalty", "repetition_penalty", "number"),
              ("repetition_penalty", "repetition_penalty", "number"), ("ignore_eos", "ignore_eos", "boolean"))
    for field, key, kind in fields:  # repeat_penalty, top_k, ignore_eos: llama-server's extensions
        v = get(body, field, kind)
        if v is not None:
            given[key] = v
    for field in ("presence_penalty", "frequency_penalty"):
        if get(body, field, "number"):
            raise ApiError(400, f"'{field}' is not supported: use repeat_penalty (1.0 = off)", param=field)
    n = get(body, "n", "integer")
    if n is not None and n != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request), not {n}", param="n")
    if get(body, "logprobs", "boolean" if chat else "integer"):
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    if get(body, "tools", "array"):
        raise ApiError(400, "'tools' are not supported", param="tools")
    if get(body, "logit_bias", "object"):
        raise ApiError(400, "'logit_bias' is not supported", param="logit_bias")
    fmt = get(body, "response_format", "object")
    if fmt and fmt.get("type", "text") != "text":
        raise ApiError(400, "'response_format' must be text: structured output is not supported", param="response_format")
    if not chat:
        if get(body, "echo", "boolean"):
            raise ApiError(400, "'echo' is not supported", param="echo")
        if get(body, "suffix", "string"):
            raise ApiError(400, "'suffix' is not supported", param="suffix")
        best_of = get(body, "best_of", "integer")
        if best_of is not None and best_of != 1:
            raise ApiError(400, "'best_of' must be 1", param="best_of")
    get(body, "model", "string")
    get(body, "user", "string")
    try:
        return replace(defaults, **given)
    except MoestreamError as e:
        raise ApiError(400, str(e)) from None


def stop_strings(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")
    if len(v) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings, not {len(v)}", param="stop")
    return [s for s in v if s]


def chat_messages(body: dict) -> tuple[list[dict], int]:
    """messages as the chat template takes them (text parts joined; with images, the parts kept in
    order), and how many images they carry. An image comes as OpenAI sends one, an image_url part
    with a data: URL, or {"type": "image", "data": BASE64}: the server fetches no URL and reads no
    file of its own disk for a client."""
    messages = get(body, "messages", "array")
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
    out, n_images = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with a role and content", param="messages")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, not {_shown(role)}", param="messages")
        if isinstance(content, list):
            parts = [_content_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
            images = sum(part["type"] != "text" for part in parts)
            n_images += images
            content = parts if images else "\n".join(part["text"] for part in parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text and image parts", param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out, n_images


def _content_part(part, where: str) -> dict:
    """One content part, checked: text, or an image given inline (a data: URL or base64 data)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else None
        if isinstance(url, str) and url.startswith("data:"):
            return {"type": "image_url", "image_url": {"url": url}}
        raise ApiError(400, f"'{where}.image_url.url' must be a data: URL (data:image/png;base64,...): this server "
                            "fetches no URL", param="messages")
    if kind == "image" and isinstance(part.get("data"), str):
        return {"type": "image", "data": part["data"]}
    if kind == "image":
        raise ApiError(400, f"'{where}' must carry its image as base64 'data' (or send an image_url part with a "
                            "data: URL): this server reads no file of its own disk for a client", param="messages")
    raise ApiError(400, f"'{where}' must be a text part ({{\"type\": \"text\", \"text\": ...}}) or an image part "
                        "({\"type\": \"image_url\", \"image_url\": {\"url\": \"data:...\"}})", param="messages")


def completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """prompt: a string, or token ids; either may come as a one-element array (n=1: one prompt)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return tokenizer.encode(p)
    if isinstance(p, list) and p and all(JSON_TYPES["integer"](t) for t in p):
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside this model's vocabulary [0, {vocab_size})", param="prompt")
        return p
    raise ApiError(400, "'prompt' must be a string or an array of token ids (one prompt per request)", param="prompt")


# --- a reply: tokens to text -----------------------------------------------------------------------
class ReplyFailed(Exception):
    """The model's step failed for this request (or the server is shutting down)."""


class Reply:
    """One request's tokens as text, on the event loop: incremental decoding, stop strings, the
    finish reason and the token count."""

    def __init__(self, batcher: Batcher, tokenizer, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 stops: list[str], images=None):
        self.batcher, self.stops = batcher, stops
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.text_of = tokenizer.stream_decoder()
        self.held = ""  # decoded text not sent yet: it may be the start of a stop string
        self.prompt_tokens, self.completion_tokens = len(prompt), 0
        self.finish_reason: str | None = None
        self.request = Request(prompt, params, stop_ids, self._on_token, self._on_done, images)
        batcher.submit(self.request)  # QueueFull when there is no room

    # called on the batcher's thread: hand over, nothing more
    def _on_token(self, token: int) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (token, None, None))

    def _on_done(self, reason: str, error: BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (None, reason, error))

    def cancel(self) -> None:
        self.batcher.cancel(self.request)

    async def pieces(self):
        """Text as it becomes final; finish_reason is set when this ends."""
        while True:
            token, reason, error = await self.events.get()
            if token is None:
                if reason == "error":
                    raise ReplyFailed(str(error) if isinstance(error, MoestreamError) else
                                      f"the model failed on this request: {type(error).__name__}: {error}")
                if reason == "cancelled":
                    raise ReplyFailed("the server is shutting down")
                if self.held:  # the reply ended inside what might have become a stop string
                    yield self.held
                self.finish_reason = reason  # "stop" (a stop token) or "length"
                return
            self.completion_tokens += 1
            text = self.held + self.text_of(token)
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.cancel()
                self.finish_reason = "stop"
                if cut:
                    yield text[:cut]
                return
            keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                        if text.endswith(s[:k])), default=0)
            send, self.held = text[:len(text) - keep], text[len(text) - keep:]
            if send:
                yield send

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


# --- the app ---------------------------------------------------------------------------------------
class Server:
    """The endpoints over one loaded LLM and its batcher. defaults: the server's sampling flags, what
    a request gets for each field it leaves out (max_tokens included: -n)."""

    def __init__(self, llm, batcher: Batcher, model_name: str, api_key: str | None = None,
                 defaults: SamplingParams | None = None):
        if llm.tokenizer is None:
            raise MoestreamError(f"{llm.runtime.model} has no tokenizer.json: serve needs one")
        self.llm, self.batcher, self.model_name, self.api_key = llm, batcher, model_name, api_key
        self.defaults = defaults or SamplingParams()
        self.created = int(time.time())
        routes = [
            Route("/v1/chat/completions", self.guarded(self.chat), methods=["POST"]),
            Route("/v1/completions", self.guarded(self.completions), methods=["POST"]),
            Route("/v1/models", self.guarded(self.models), methods=["GET"]),
            Route("/health", self.guarded(self.health, public=True), methods=["GET"]),
            Route("/metrics", self.guarded(self.metrics), methods=["GET"]),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error,
                                                                Exception: self.crash})

    def guarded(self, handler, public: bool = False):
        """The key check, and any ApiError as its JSON answer."""

        async def endpoint(http: HTTPRequest):
            try:
                if not public and not self.authorized(http):
                    raise ApiError(401, "invalid or missing API key: send it as 'Authorization: Bearer KEY'",
                                   code="invalid_api_key")
                return await handler(http)
            except ApiError as e:
                return e.response()
            except MoestreamError as e:  # the chat template refused these messages, say
                return ApiError(400, " ".join(str(e).split())).response()

        return endpoint

    def authorized(self, http: HTTPRequest) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def http_error(self, http, e: HTTPException):  # 404, 405: in the same JSON as every error
        return ApiError(e.status_code, f"{http.method} {http.url.path}: {e.detail}", code=None).response()

    async def crash(self, http, e: Exception):  # a bug: this request fails, the server goes on
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()

    # --- endpoints ---------------------------------------------------------------------------------
    async def chat(self, http: HTTPRequest):
        body = await read_json(http)
        params, stops = sampling(body, self.defaults, chat=True), stop_strings(body)
        messages, n_images = chat_messages(body)
        if not n_images:
            ids = await run_in_threadpool(self.llm.tokenizer.encode_chat, messages)  # long text: off the loop
            return await self.answer(http, body, ids, params, stops, chat=True)
        # the vision tower is torch work: on the batcher's thread, between steps (one OpenMP team)
        ids, rows = await asyncio.wrap_future(self.batcher.call(lambda: self.encode_with_images(messages)))
        return await self.answer(http, body, ids, params, stops, chat=True, images=rows)

    def encode_with_images(self, messages: list[dict]):
        """(token ids, the embeddings of their <|patch|> tokens) of a chat with images, each image through
        the tower once; bad images and a text-only model are one MoestreamError line (a 400)."""
        ids, encoded = self.llm.encode_chat(messages)
        return ids, self.llm.image_rows(ids, encoded)

    async def completions(self, http: HTTPRequest):
        body = await read_json(http)
        params, stops = sampling(body, self.defaults, chat=False), stop_strings(body)
        ids = await run_in_threadpool(completion_prompt, body, self.llm.tokenizer, self.llm.config.vocab_size)
        return await self.answer(http, body, ids, params, stops, chat=False)

    async def models(self, http: HTTPRequest):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "moestream"}]})

    async def health(self, http: HTTPRequest):
        if not self.batcher.alive:
            return JSONResponse({"status": "error", "error": "the batch worker stopped"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, http: HTTPRequest):
        stats, batch = await asyncio.wrap_future(self.batcher.call(lambda: (self.llm.stats(), self.batcher.snapshot())))
        return PlainTextResponse(metrics.render(stats, batch), media_type="text/plain; version=0.0.4")

    # --- one reply ---------------------------------------------------------------------------------
    async def answer(self, http: HTTPRequest, body: dict, ids: list[int], params: SamplingParams, stops: list[str],
                     chat: bool, images=None):
        stream = get(body, "stream", "boolean") or False
        options = get(body, "stream_options", "object") or {}
        include_usage = get(options, "include_usage", "boolean") or False
        where = "messages" if chat else "prompt"
        ctx = self.llm.ctx_size
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens and the context holds {ctx} (this server's -c): "
                                f"shorten the {where}", param=where, code="context_length_exceeded")
        stop_ids = set() if params.ignore_eos else self.llm.stop_ids
        try:
            reply = Reply(self.batcher, self.llm.tokenizer, ids, params, stop_ids, stops, images)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}", kind="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if stream:
            return EventSourceResponse(self.stream(reply, rid, chat, include_usage), ping=0, sep="\n")
        try:
            text = await self.collect(reply, http)
        except ReplyFailed as e:
            raise ApiError(500, str(e), kind="server_error") from None
        if text is None:  # the client went away: nobody reads an answer
            return Response(status_code=499)
        choice = {"index": 0, "logprobs": None, "finish_reason": reply.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_name, "choices": [choice],
                             "usage": reply.usage()})

    async def collect(self, reply: Reply, http: HTTPRequest) -> str | None:
        """The whole text, or None if the client disconnects first (its request is cancelled)."""

        async def disconnected():
            while (await http.receive())["type"] != "http.disconnect":
                pass

        text, gone = asyncio.ensure_future(reply.text()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({text, gone}, return_when=asyncio.FIRST_COMPLETED)
            return text.result() if text.done() else None
        finally:
            for task in (text, gone):
                task.cancel()
            reply.cancel()

    async def stream(self, reply: Reply, rid: str, chat: bool, include_usage: bool):
        """Server-sent events as OpenAI's clients read them; the request is cancelled however this ends
        (sse-starlette cancels it when the client disconnects)."""
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return json.dumps(out)

        try:
            if chat:
                yield chunk("", role=True)
            async for piece in reply.pieces():
                yield chunk(piece)
            yield chunk(None, reply.finish_reason)
            if include_usage:
                yield json.dumps({"id": rid, "object": kind, "created": created, "model": self.model_name,
                                  "choices": [], "usage": reply.usage()})
            yield "[DONE]"
        except ReplyFailed as e:
            yield json.dumps({"error": ApiError(500, str(e), kind="server_error").body()})
        finally:
            reply.cancel()
