"""`alpaca-local serve`: flags and the startup line around `serve` (llama-cpp-python's server)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys

from alpaca_local.cli import cpu_flags, gpu_split, lora_flags

DESCRIPTION = """Serve a GGUF model on an OpenAI-compatible HTTP API: /v1/chat/completions
(streaming and not), /v1/completions and /v1/models, built on llama-cpp-python's server.
Chat messages become one Stanford Alpaca prompt: the last user message is the instruction,
an "input" field on a user message is its Input block, a system message replaces the
preamble, earlier user/assistant pairs are history. Message text is tokenized as plain
text: it can never inject special tokens or change the template. /v1/completions sends
its prompt as it is (no template, plain-text tokenization, no default stop strings).
Requests are served one at a time, in arrival order; up to --max-queue wait, more get 503
with Retry-After. The chat page is at http://HOST:PORT/ (no API key needed for the page
itself; it asks for one when the server wants it)."""

EXAMPLES = """examples:
  alpaca-local serve models/alpaca-7b.Q4_K_M.gguf
  alpaca-local serve alpaca-7b --port 8080 -ngl -1
  ALPACA_LOCAL_API_KEY=secret alpaca-local serve --host 0.0.0.0
  alpaca-local serve --max-queue 4 --cors-origin http://localhost:3000

MODEL is a .gguf path, a name in models/ (alpaca-7b -> models/alpaca-7b.*.gguf),
or left out for the most recently converted model there.
exit codes: 0 stopped (Ctrl-C or SIGTERM), 1 bad model, 2 usage error."""

API_KEY_ENV = "ALPACA_LOCAL_API_KEY"
# Repeated here (not imported) so `serve --help` stays instant; tests check they match.
DEFAULT_MAX_WAITING, DEFAULT_SEND_TIMEOUT = 16, 30.0


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(
        name, help=help_text, description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="GGUF file or name in models/ (default: newest there)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--alias", metavar="NAME", help="model name in /v1/models and responses (default: the file name)")
    p.add_argument("-c", "--ctx", type=int, default=2048, metavar="N", help="context length in tokens (default: 2048)")
    gpu_split.add_arguments(p)
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: llama.cpp's)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                   help=f"requests that may wait behind the running one; more get 503 (default: {DEFAULT_MAX_WAITING})")
    p.add_argument("--send-timeout", type=float, default=DEFAULT_SEND_TIMEOUT, metavar="S",
                   help="drop a client that accepts no data for S seconds, so it cannot hold the model "
                        f"(default: {DEFAULT_SEND_TIMEOUT:g})")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. http://localhost:3000) to call the API; "
                        "repeatable (default: none)")
    lora_flags.add_runtime_arguments(p)
    cpu_flags.add_no_repack(p)
    p.add_argument("--show-prompt", action="store_true",
                   help="print each prompt and its token ids on stderr as the model receives them")


def run(args: argparse.Namespace) -> int:
    from alpaca_local.run.chat import lora_kwargs, resolve_model
    from alpaca_local.run.serve import bind, build_app, load_server_model, serve_forever

    _check_args(args)
    _check_extra()
    path = resolve_model(args.model)
    lora = lora_kwargs(args.lora, args.lora_scale, path)
    sock = bind(args.host, args.port)  # before loading: a busy port fails in a second, not after a load
    split = gpu_split.resolve(args, path)
    if split.note:
        print(f"note: {split.note}", file=sys.stderr, flush=True)
    llm = load_server_model(path, args.ctx, split.n_gpu_layers, args.threads,
                            on_prompt=print_prompt if args.show_prompt else None, no_repack=args.no_repack,
                            n_cpu_moe=split.n_cpu_moe, **lora)
    from alpaca_local.convert.split import model_name

    alias = args.alias or model_name(path)
    app = build_app(llm, alias, args.api_key, max_queue=args.max_queue, send_timeout=args.send_timeout,
                    cors_origins=tuple(args.cors_origin))
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    print(f"serving {alias} on {url} (context {args.ctx}{', API key required' if args.api_key else ''}); "
          "Ctrl-C to stop", flush=True)
    print(f"chat page: {url.removesuffix('/v1')}/", flush=True)
    if not args.api_key and not _is_loopback(args.host):
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr, flush=True)
    try:
        serve_forever(app, sock)
    finally:
        llm.close()
    print("stopped", flush=True)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    from alpaca_local.errors import UsageError

    checks = [
        (0 <= args.port <= 65535, f"--port {args.port}: give 0 to 65535"),
        (args.threads is None or 1 <= args.threads <= 1024, f"--threads {args.threads}: give 1 to 1024"),
        (args.api_key is None or args.api_key.strip() == args.api_key != "",
         "--api-key: give a key without spaces at its ends"),
        (0 <= args.max_queue <= 100_000, f"--max-queue {args.max_queue}: give 0 to 100000"),
        (0 < args.send_timeout <= 86_400, f"--send-timeout {args.send_timeout:g}: give more than 0 seconds"),
    ]
    for origin in args.cors_origin:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise UsageError(f"--cors-origin {origin!r}: give scheme://host[:port] with no path, "
                             "e.g. http://localhost:3000 (or * for any)")
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    gpu_split.check(args)


def _check_extra() -> None:
    """The server's packages come with the `serve` extra; say so instead of an ImportError."""
    import importlib.util

    from alpaca_local.errors import UsageError

    missing = [m for m in ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs {', '.join(missing)}: pip install 'alpaca-local[serve]'")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def print_prompt(prompt: str, ids: list[int]) -> None:
    from alpaca_local.cli.chat_cmd import print_prompt as show  # the same layout as `chat --show-prompt`

    show(prompt, ids, sys.stderr)
