"""`moestream serve`: an OpenAI-compatible HTTP server; concurrent requests decode as one batch.

The model loads as for every command (the same budget flags); the sampling flags are the defaults of
requests that leave a field out, as llama-server's are. The socket is bound before the model loads,
so a port in use is one line at once. The server, the batcher and their threads are imported here,
inside the command: `moestream --help` never pays for them (nor for torch).
"""

from __future__ import annotations

import ipaddress
import signal
import socket

import click

from ..config import DEFAULT_MODEL
from ..errors import MoestreamError
from .app import cli, load_llm, runtime_options, sampling_options


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise MoestreamError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}; "
                             "check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MoestreamError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port "
                             "(or --host)") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default: other machines cannot reach it).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--api-key", default=None, envvar="MOESTREAM_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or set MOESTREAM_API_KEY).")
@click.option("--max-batch", "-np", "--parallel", "max_batch", default=8, show_default=True,
              type=click.IntRange(min=1), metavar="N",
              help="Requests decoded together in one batch, each with its own KV cache (llama-server's -np).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Requests that wait for a place in the batch; beyond them a request gets 503 and Retry-After.")
@click.option("-a", "--alias", default=None, metavar="NAME", help="Model name in /v1/models and replies "
              "(default: the checkpoint directory's name).")
@runtime_options
@sampling_options
def serve(host, port, api_key, max_batch, max_queue, alias, runtime, params):
    """Serve the model over HTTP: OpenAI's /v1/chat/completions and /v1/completions (streaming or not),
    /v1/models, /health and Prometheus /metrics. The sampling flags are the defaults of requests that
    leave a field out (-n: max_tokens). KV budgets (--kv-gpu-mem, --kv-cpu-mem) hold for each request's
    cache; with --kv-disk each batch place spills to a file of its own (PATH.0, PATH.1, ...)."""
    if api_key is not None and not api_key.strip():
        raise MoestreamError("--api-key is empty: give a key, or leave the flag out for no key")
    sock = listen(host, port)
    try:
        import uvicorn

        from ..scheduler.batch import Batcher
        from ..server.app import Server

        llm = load_llm(runtime)
        name = alias or ("moestream-embedded" if runtime.model == DEFAULT_MODEL else runtime.model.name)
        batcher = Batcher(llm.generator, llm.request_sequence, llm.ctx_size, max_batch, max_queue)
        try:
            server = Server(llm, batcher, name, api_key, params)
            bound_host, bound_port = sock.getsockname()[:2]
            shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
            if not is_loopback(bound_host) and api_key is None:
                click.echo(f"note: listening on {bound_host}, beyond loopback, without --api-key: whoever reaches "
                           "this port can use the model", err=True)
            click.echo(f"moestream serve: {name} on http://{shown_host}:{bound_port}/v1 (max batch {max_batch}, "
                       f"queue {max_queue}{', API key required' if api_key else ''}); Ctrl+C stops", err=True)
            config = uvicorn.Config(server.app, log_level="warning", access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=5)
            # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again under the
            # handler it found: this one, so the caches and files are closed below and the exit is 0
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: None)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            batcher.close()
    finally:
        sock.close()
