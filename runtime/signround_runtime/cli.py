"""`signround-run MODEL_DIR "prompt"`, `signround-run chat MODEL_DIR` and `signround-run serve MODEL_DIR`:
generate with an exported model, or serve it over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os
import sys

from .model import Model, RuntimeModelError
from .sampling import Sampling

USAGE = """signround-run MODEL_DIR "prompt" [options]    one reply (the chat template is applied; --raw: plain text)
       signround-run chat MODEL_DIR [options]        an interactive chat (empty line or Ctrl-D ends it)
       signround-run serve MODEL_DIR [options]       an OpenAI-compatible HTTP server (see serve --help)"""


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signround-run serve",
                                description="Serve a folder written by `signround export onnx` over an "
                                            "OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
                                            "/v1/models, /health. Needs `pip install 'signround-runtime[serve]'`.")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SIGNROUND_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $SIGNROUND_API_KEY; none: no check)")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 (default 16)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoding together, up to this many; a request that comes while others decode "
                        "joins them at the next step (default 8; 1: one at a time)")
    p.add_argument("--prefix-cache-mb", type=float, default=64,
                   help="MB of recent prompts' KV kept, so that a prompt starting the same way (a chat's system "
                        "prompt) prefills only the rest (default 64; 0: off)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: up to 4)")
    p.add_argument("--model-name", help="the model id clients send (default: the folder's name)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds a running request may go on after SIGTERM before it is cut (default 10)")
    add_verify(p)
    return p


def add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="load without checking the files against the folder's sha256sums.txt (checked by "
                        "default: measured 0.17 s more on a 0.8 s load of SmolLM2-135M's 185 MB folder)")


def serve_main(argv) -> int:
    args = serve_parser().parse_args(argv)
    try:
        from .server import serve
    except ImportError as e:
        print(f"signround-run: error: serving needs starlette and uvicorn ({e}); "
              "pip install 'signround-runtime[serve]'", file=sys.stderr)
        return 2
    if args.max_queue < 1:
        serve_parser().error(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_batch < 1:
        serve_parser().error(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.prefix_cache_mb < 0:
        serve_parser().error(f"--prefix-cache-mb must be 0 (off) or positive, got {args.prefix_cache_mb}")
    try:
        serve(args.model_dir, args.host, args.port, args.api_key, args.max_queue, args.threads, args.model_name,
              args.grace, args.max_batch, args.verify, args.prefix_cache_mb)
    except RuntimeModelError as e:
        print(f"signround-run: error: {e}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signround-run", usage=USAGE,
                                description="Generate with a folder written by `signround export onnx`, on the CPU "
                                            "through onnxruntime. Speed goes to stderr.")
    p.add_argument("words", nargs="+", metavar="MODEL_DIR PROMPT | chat MODEL_DIR")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: up to 4)")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    add_verify(p)
    return p


def reply(model: Model, prompt_ids: list[int], args, sampling: Sampling) -> str:
    pieces = []
    for piece in model.stream(prompt_ids, args.max_new_tokens, sampling):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    g = model.last_generation
    print(f"[{g.prompt_tokens} prompt tokens at {g.prefill_tokens_per_second:.1f} tok/s, {len(g.tokens[0])} new at "
          f"{g.decode_tokens_per_second:.1f} tok/s, {g.finish[0]}]", file=sys.stderr)
    return "".join(pieces)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = parser().parse_args(argv)
    chat = args.words[0] == "chat"
    words = args.words[1:] if chat else args.words
    if len(words) != (1 if chat else 2):
        parser().error("expected: MODEL_DIR \"prompt\", or: chat MODEL_DIR")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    try:
        sampling.check()
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        model = Model(words[0], threads=args.threads, verify=args.verify)
        system = [{"role": "system", "content": args.system}] if args.system else []
        if not chat:
            ids = (model.encode(words[1]) if args.raw else
                   model.chat_ids(system + [{"role": "user", "content": words[1]}]))
            reply(model, ids, args, sampling)
            return 0
        history = list(system)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                break
            history.append({"role": "user", "content": line})
            answer = reply(model, model.chat_ids(history), args, sampling)
            history.append({"role": "assistant", "content": answer})
        return 0
    except (RuntimeModelError, ValueError) as e:
        print(f"signround-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsignround-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
