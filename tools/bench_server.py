"""Load on the OpenAI-compatible server: concurrent clients, latency percentiles and throughput.

    .venv/bin/python tools/bench_server.py out/demo/w4g128-onnx [--clients 4] [--requests 10] [--max-tokens 64]
    .venv/bin/python tools/bench_server.py --url http://127.0.0.1:8000 [--api-key KEY] ...

Given a model folder it starts `signround-run serve` on a free loopback port (and stops it after);
given --url it loads a server that is already running. Each client sends its requests one after
another, streamed, greedy, with the same prompt; the time to the first token and to the last are
measured per request. Requests the server refuses (503: queue full) are counted, not retried.
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


def one_request(client: httpx.Client, args, model: str) -> dict:
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.completions:
        path, body["prompt"] = "/v1/completions", args.prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": args.prompt}]
    t0 = time.perf_counter()
    first, tokens = None, 0
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
    total = time.perf_counter() - t0
    return {"status": 200, "latency": total, "ttft": first if first is not None else total, "tokens": tokens}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, threads: int | None, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(REPO / ".venv" / "bin" / "signround-run"), "serve", folder, "--port", str(port),
           "--max-queue", str(max_queue)] + (["--threads", str(threads)] if threads else [])
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # its access log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before answering; run the command above "
                             "to see why")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not come up in 300 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", help="a folder from `signround export onnx` (a server is started on it)")
    p.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--completions", action="store_true", help="POST /v1/completions (plain prompt), not chat")
    p.add_argument("--threads", type=int, help="onnxruntime threads of the started server")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if bool(args.model_dir) == bool(args.url):
        p.error("give either MODEL_DIR or --url")

    if args.model_dir:
        proc, url = start_server(args.model_dir, args.threads, max_queue=args.clients)
    else:
        proc, url = None, args.url
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            model = client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
            one_request(client, args, model)  # warm-up, not counted

            def run_client(_):
                return [one_request(client, args, model) for _ in range(args.requests)]

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = [r for rs in pool.map(run_client, range(args.clients)) for r in rs]
            wall = time.perf_counter() - t0
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)

    ok = [r for r in results if r["status"] == 200]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    summary = {
        "url": url, "model": model, "clients": args.clients, "requests": len(results), "ok": len(ok),
        "refused": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results} if s != 200},
        "max_tokens": args.max_tokens, "wall_s": wall,
        "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "mean_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0,
    }
    print(f"{summary['ok']}/{summary['requests']} ok ({args.clients} clients, max_tokens {args.max_tokens}) in "
          f"{wall:.1f} s: latency p50 {summary['latency_p50_s']:.3f} s, p95 {summary['latency_p95_s']:.3f} s; "
          f"first token p50 {summary['ttft_p50_s']:.3f} s, p95 {summary['ttft_p95_s']:.3f} s; "
          f"{summary['requests_per_s']:.2f} req/s, {summary['tokens_per_s']:.1f} tok/s "
          f"({summary['mean_tokens']:.1f} tokens per reply)")
    if summary["refused"]:
        print(f"refused: {summary['refused']}; first error: {next(r for r in results if r['status'] != 200)['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
