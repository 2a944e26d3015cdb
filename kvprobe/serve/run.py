"""``kvprobe serve FOLDER_OR_ALIAS``: serve a generator folder (or a shipped alias) over the OpenAI API.

    kvprobe serve smollm2 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is 17 * 3?"}]}'

SIGTERM (or Ctrl-C) drains: new requests get 503, running ones finish, then the process exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parser() -> argparse.ArgumentParser:
    from kvprobe.serve.app import ServeSettings

    d = ServeSettings(path="")
    p = argparse.ArgumentParser(prog="kvprobe serve", description="Serve a kvprobe generator over the OpenAI API "
                                "(/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics).")
    p.add_argument("path", metavar="FOLDER_OR_ALIAS", help="a generator folder or a shipped alias (smollm2, qwen2.5-coder-0.5b)")
    p.add_argument("--policy", default=None, help="the default policy (default: the folder's)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on; any other than loopback must be named")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KVPROBE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $KVPROBE_API_KEY; unset = no key)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="rows decoded together (n counts n rows)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a new batch waits for more requests (default 0: arrivals join a running batch at its "
                   "next step; a wait gathers sample's closed batches)")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting, help="queued requests beyond this get 429 at once")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds from arrival to the last token")
    p.add_argument("--max-n", type=int, default=d.max_n, help="the largest n a request may ask for")
    p.add_argument("--dtype", default=None, help="the base model's dtype: float32, bfloat16 or float16 (default: the "
                   "folder's; bfloat16 batches far better on CPUs with AVX512-BF16, docs/performance.md)")
    p.add_argument("--log-level", default="info")
    return p


def settings_of(args: argparse.Namespace):
    from kvprobe.models import DTYPES
    from kvprobe.serve.app import ServeSettings
    from kvprobe.steering.config import POLICIES

    for name in ("max_batch_size", "max_waiting", "max_n"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
    if args.batch_wait_ms < 0 or args.request_timeout <= 0:
        raise ValueError("--batch-wait-ms must be >= 0 and --request-timeout > 0")
    if args.policy is not None and (args.policy not in POLICIES or args.policy == "oracle"):
        raise ValueError(f"--policy {args.policy!r} is not one of {POLICIES[:-1]}")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {args.dtype!r}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, not {args.port}")
    return ServeSettings(path=args.path, policy=args.policy, api_key=args.api_key or None,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_waiting=args.max_waiting, request_timeout=args.request_timeout, max_n=args.max_n,
                         dtype=args.dtype)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = settings_of(args)
    try:
        import uvicorn

        from kvprobe.serve.app import create_app
    except ImportError as err:
        raise ImportError(f"kvprobe serve needs the serve extra (pip install 'kvprobe[serve]'): {err}") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):  # new requests get 503 while the running ones finish
            app.state.server.draining = True
            super().handle_exit(sig, frame)

    Draining(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=
                            int(settings.request_timeout))).run()


if __name__ == "__main__":
    from kvprobe.cli import run_module

    run_module(main, "kvprobe serve")
