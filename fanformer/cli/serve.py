"""`fanformer serve`: an OpenAI-compatible HTTP server over any model form (runtime/server.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fanformer.cli.flags import positive_int
from fanformer.cli.run import add_backend_flags, backend_options


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model (checkpoint, quantized checkpoint, ONNX folder, genai, GGUF file) over HTTP with OpenAI's
    completions API, batching the requests that arrive together; Ctrl-C stops it."""
    from fanformer.runtime import load_backend
    from fanformer.runtime.server import serve

    backend = load_backend(args.path, format=args.format, **backend_options(args))
    name = args.model_name or Path(args.path).resolve().name
    serve(backend, name, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue)


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.description = cmd_serve.__doc__
    add_backend_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--model-name", help="the model's id in the API (default: the file or folder name)")
    parser.add_argument("--max-batch", type=positive_int, default=16,
                        help="sequences decoded together (default 16; genai serves one at a time)")
    parser.add_argument("--max-queue", type=positive_int, default=64,
                        help="sequences that may wait; more get HTTP 503 (default 64)")


def run(name: str, args: argparse.Namespace):
    return cmd_serve(args)
