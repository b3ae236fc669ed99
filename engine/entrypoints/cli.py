"""The `omnistream` command line: `omnistream serve` (the OpenAI-compatible server) and `omnistream generate`."""

from __future__ import annotations

import argparse
import logging
import sys

from omnistream.engine.entrypoints.args import (
    DEFAULT_MAX_FANOUT,
    DEFAULT_MAX_QUEUED_REQUESTS,
    add_engine_args,
    engine_kwargs,
    mm_limits,
    positive,
    positive_float,
)
from omnistream.multimodal.media_fetch.policy import (
    DEFAULT_MAX_MEDIA_BYTES,
    DEFAULT_TIMEOUT_S,
)


def _serve(args: argparse.Namespace) -> int:
    from omnistream.engine.entrypoints.serve import serve

    return serve(args)


def _generate(args: argparse.Namespace) -> int:
    from omnistream.engine.entrypoints.llm import LLM
    from omnistream.scheduler.sampling_params import SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
    )
    prompts = args.prompt or ["Hello, my name is"]
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        completion = out.outputs[0]
        print(f"prompt: {prompt!r}\noutput: {completion.text!r}  [{len(completion.token_ids)} tokens, {completion.finish_reason}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnistream", description="Serve and run the Qwen3-Omni thinker.")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="required as 'Authorization: Bearer KEY' (default: $OMNISTREAM_API_KEY)")
    srv.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use (default: the model path)")
    srv.add_argument("--limit-mm-per-prompt", type=mm_limits, default=None, help='media items per prompt, e.g. \'{"image": 2}\'')
    srv.add_argument("--max-request-body-bytes", type=positive, default=64 << 20)
    srv.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
                     help="fetch http(s) media URLs only from these domains and their subdomains (default: none, "
                          "remote fetching off); addresses that are not public are refused whatever the name")
    srv.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                     help="read file:// media URLs and paths only under this directory (default: none)")
    srv.add_argument("--media-fetch-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help="total time to fetch one media URL, redirects included")
    srv.add_argument("--max-media-bytes", type=positive, default=DEFAULT_MAX_MEDIA_BYTES,
                     help="largest media file fetched from a URL or read from --allowed-local-media-path")
    srv.add_argument("--max-queued-requests", type=positive, default=DEFAULT_MAX_QUEUED_REQUESTS, metavar="N",
                     help="refuse new requests (HTTP 429, gRPC RESOURCE_EXHAUSTED) while N wait for their first "
                          "token")
    srv.add_argument("--max-fanout-per-request", type=positive, default=DEFAULT_MAX_FANOUT, metavar="N",
                     help="refuse (HTTP 400, gRPC INVALID_ARGUMENT) a call that would make more than N engine "
                          "requests (prompts × n)")
    srv.add_argument("--max-live-sessions", type=positive, default=None, metavar="N",
                     help="refuse new live sessions (Realtime, gRPC Session) while N are open (default: no limit)")
    srv.add_argument("--grammar-compile-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                     help="refuse (HTTP 400, gRPC INVALID_ARGUMENT) a structured-output schema, regex or grammar "
                          "whose compilation takes longer")
    srv.add_argument("--engine-in-process", action="store_true",
                     help="run the engine core in a thread of the server process instead of its own process")
    srv.add_argument("--grpc-port", type=int, default=None,
                     help="also serve the gRPC API (omnistream.v1) on this port, on the same engine (0: any free port)")
    srv.add_argument("--grpc-only", action="store_true", help="serve only the gRPC API (needs --grpc-port)")
    srv.set_defaults(handler=_serve, log_level="info")  # a server says where it listens
    gen = sub.add_parser("generate", help="run a generation offline and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.set_defaults(handler=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
