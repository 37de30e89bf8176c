"""Load on an OpenAI-compatible server: concurrent streaming clients, time to first token, throughput.

    .venv/bin/python tools/bench_server.py out/demo/w4g128-onnx [--clients 1,4,8] [--requests 10] [--max-tokens 64]
    .venv/bin/python tools/bench_server.py --llama-cpp MODEL.gguf [--llama-python /tmp/llama-srv/bin/python] ...
    .venv/bin/python tools/bench_server.py --url http://127.0.0.1:8000 [--api-key KEY] ...

Given a model folder it starts `signround-run serve` on a free loopback port (and stops it after);
given --llama-cpp it starts llama-cpp-python's own OpenAI server on the GGUF file the same way (from a
Python that has `llama-cpp-python[server]`, e.g. a throwaway venv; with --interrupt_requests False, so
that a new request waits for the running one as a queue would, instead of cutting it); given --url it
loads a server that is already running. For each number of clients in --clients, each client sends its
requests one after another, streamed, greedy, with the same prompt, client k starting k * --stagger s
after the first (so that requests arrive while others decode, as users' do); the time to the first
token and to the last are measured per request. Throughput is the completion tokens of all clients
over the wall time of that level (the usage the server reports; a server that reports none, as
llama-cpp-python's, is counted one token per streamed chunk, as it streams them). Requests the server
refuses (503: queue full) are counted, not retried. Both servers reuse the KV of a previous prompt's
common start, so with one prompt for all requests only its last token is prefilled after the first:
--distinct makes the prompts differ at their end.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Explain in a few sentences why the sky is blue."


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def one_request(client: httpx.Client, args, model: str, tag: str = "") -> dict:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    prompt = f"{args.prompt} (request {tag})" if args.distinct and tag else args.prompt
    if args.completions:
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "error": r.text[:200]}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices"):
                c = chunk["choices"][0]
                if c.get("text") or (c.get("delta") or {}).get("content"):
                    first = time.perf_counter() - t0
            if chunk.get("choices"):
                c = chunk["choices"][0]
                chunks += bool(c.get("text") or (c.get("delta") or {}).get("content"))
    total = time.perf_counter() - t0
    return {"status": 200, "latency": total, "ttft": first if first is not None else total,
            "tokens": tokens or chunks}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int) -> tuple[subprocess.Popen, str]:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its access log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before answering; run the command above "
                             "to see why")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not come up in 300 s")


def ours(folder: str, threads: int | None, max_queue: int, prefix_cache_mb: float | None) -> list[str]:
    port = free_port()
    return ([str(REPO / ".venv" / "bin" / "signround-run"), "serve", folder, "--port", str(port),
             "--max-queue", str(max_queue)] + (["--threads", str(threads)] if threads else []) +
            (["--prefix-cache-mb", str(prefix_cache_mb)] if prefix_cache_mb is not None else []))


def llama_cpp(gguf: str, python: str, threads: int | None) -> list[str]:
    port = free_port()
    threads_args = ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
    return [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--interrupt_requests", "False", "--verbose", "False"] + threads_args


def run_level(client: httpx.Client, args, model: str, clients: int) -> dict:
    """args.requests streamed requests from each of `clients` clients, client k starting k * stagger s late."""
    def run_client(k):
        time.sleep(k * args.stagger)
        return [one_request(client, args, model, f"{clients}.{k}.{i}") for i in range(args.requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(run_client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(results), "ok": len(ok),
        "refused": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results} if s != 200},
        "first_error": next((r["error"] for r in results if r["status"] != 200), None),
        "max_tokens": args.max_tokens, "stagger_s": args.stagger, "wall_s": wall,
        "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "mean_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", help="a folder from `signround export onnx` (a server is started on it)")
    p.add_argument("--llama-cpp", metavar="GGUF", help="start llama-cpp-python's server on this file instead")
    p.add_argument("--llama-python", default="/tmp/llama-srv/bin/python",
                   help="a Python with llama-cpp-python[server] installed (default /tmp/llama-srv/bin/python)")
    p.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", default="4", help="numbers of concurrent clients, comma-separated (e.g. 1,4,8)")
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stagger", type=float, default=0.0, help="seconds between the starts of two clients")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--distinct", action="store_true",
                   help="end each request's prompt with its own number, so that no two are the same (a server's "
                        "prompt cache then reuses only their common start, as with chats sharing a system prompt)")
    p.add_argument("--completions", action="store_true", help="POST /v1/completions (plain prompt), not chat")
    p.add_argument("--threads", type=int, help="threads of the started server")
    p.add_argument("--prefix-cache-mb", type=float, help="the started `signround-run serve`'s prefix cache (0: off)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if sum(map(bool, (args.model_dir, args.url, args.llama_cpp))) != 1:
        p.error("give one of MODEL_DIR, --llama-cpp GGUF or --url")
    levels = [int(c) for c in args.clients.split(",")]

    if args.url:
        proc, url = None, args.url
    else:
        cmd = (ours(args.model_dir, args.threads, max(levels), args.prefix_cache_mb) if args.model_dir else
               llama_cpp(args.llama_cpp, args.llama_python, args.threads))
        proc, url = start_server(cmd, int(cmd[cmd.index("--port") + 1]))
    summaries = []
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=url, headers=headers, timeout=600,
                          limits=httpx.Limits(max_connections=max(levels) + 2)) as client:
            model = client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
            one_request(client, args, model)  # warm-up, not counted
            for clients in levels:
                s = run_level(client, args, model, clients)
                summaries.append({"url": url, "model": model, **s})
                print(f"{s['clients']} clients: {s['ok']}/{s['requests']} ok in {s['wall_s']:.1f} s, "
                      f"{s['tokens_per_s']:.1f} tok/s, {s['requests_per_s']:.2f} req/s; first token p50 "
                      f"{s['ttft_p50_s']:.3f} s, p95 {s['ttft_p95_s']:.3f} s; latency p50 {s['latency_p50_s']:.3f} s, "
                      f"p95 {s['latency_p95_s']:.3f} s ({s['mean_tokens']:.1f} tokens per reply)", flush=True)
                if s["refused"]:
                    print(f"  refused: {s['refused']}; first error: {s['first_error']}")
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")
    return 0 if all(s["ok"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
