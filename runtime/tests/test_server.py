"""The OpenAI-compatible server, driven by the real `openai` client over loopback: answers equal the
runtime's own, streaming, stop sequences, errors, auth, the bounded queue, client disconnects,
shutdown, and a small load test."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from signround_runtime import Model  # noqa: E402
from signround_runtime.manifest import write_manifest  # noqa: E402
from signround_runtime.server import Server, make_uvicorn  # noqa: E402
from signround_runtime.text import TextStream  # noqa: E402

from conftest import rtn_checkpoint  # noqa: E402
from signround_export.checkpoint.read import read_checkpoint  # noqa: E402
from signround_export.export.onnx.build import export_onnx  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("server")
    ckpt = read_checkpoint(rtn_checkpoint(tiny_model, base / "ckpt", bits=4, group_size=32))
    export_onnx(ckpt, base / "onnx", accuracy_level=0)
    config = base / "onnx" / "tokenizer_config.json"
    tconfig = json.loads(config.read_text()) if config.is_file() else {}
    config.write_text(json.dumps({**tconfig, "chat_template": CHATML}))
    write_manifest(base / "onnx")  # the folder as made here
    return base / "onnx"


@pytest.fixture(scope="module")
def model(folder):
    return Model(folder, threads=1)


class Slow:
    """A model whose every step takes `delay` seconds and that never stops early: long, predictable requests."""

    def __init__(self, model, delay):
        self.model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self.model, name)

    def batch(self, max_rows, stop_ids=None, cache=None):  # what the server's engine runs
        batch = self.model.batch(max_rows, set(), cache)
        step = batch.step

        def slow():
            time.sleep(self.delay)
            step()

        batch.step = slow
        return batch


@contextmanager
def live(model, grace=10.0, **kw):
    """A uvicorn server in a thread on a free loopback port; yields (base_url, uvicorn server, Server)."""
    app_server = Server(model, model_name="tiny", **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app_server.app(), log_level="warning", timeout_graceful_shutdown=grace + 5)
    server = make_uvicorn(app_server, config, grace)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server, app_server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()
        assert not app_server.engine.thread.is_alive(), "the worker thread outlived the server"


@pytest.fixture(scope="module")
def served(model):
    with live(model) as (base, _, app_server):
        yield base, app_server


@pytest.fixture(scope="module")
def url(served):
    return served[0]


def client(base, key="none", **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, **kw)


def expected(model, prompt_ids, n):
    g = model.generate([prompt_ids], n)
    return model.decode(g.tokens[0]), len(g.tokens[0]), g.finish[0]


def chat_ids(model, messages=CHAT):
    return model.encode(model.chat_prompt(messages))


# -- answers ---------------------------------------------------------------------------------------

def test_models_and_health(url):
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    assert client(url).models.retrieve("tiny").id == "tiny"
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["prefix_cache"]) == {"entries", "bytes", "hits", "reused_tokens"}


def test_chat_completion_equals_the_runtime_and_streams_the_same(url, model):
    ids = chat_ids(model)
    text, n, finish = expected(model, ids, 12)
    r = client(url).chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)

    chunks = list(client(url).chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=12,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(ids)
    # the second request reused the first one's prompt KV (all but its last token) and answered the same
    assert httpx.get(url + "/health").json()["prefix_cache"]["reused_tokens"] >= len(ids) - 1


def test_completion_equals_the_runtime_and_streams_the_same(url, model):
    prompt = "def f(x): return"
    text, n, finish = expected(model, model.encode(prompt), 16)
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(model.encode(prompt)) and r.usage.completion_tokens == n
    stream = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == finish
    # token ids work as the prompt too; seeded sampling repeats itself
    assert client(url).completions.create(model="tiny", prompt=model.encode(prompt), max_tokens=16,
                                          temperature=0).choices[0].text == text
    a, b = (client(url).completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9,
                                           seed=3).choices[0].text for _ in range(2))
    assert a == b


def test_stop_sequences_cut_the_text(url, model):
    prompt = model.encode("Quantization maps")
    full = model.decode(model.generate([prompt], 40).tokens[0])
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    want = full[: full.index(stop)]
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client(url).completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_text_stream_holds_back_what_may_start_a_stop_sequence():
    class Chars:  # token i is the character chr(i)
        decode = staticmethod(lambda ids: "".join(map(chr, ids)))

    def run(text, stop):
        stream = TextStream(Chars(), stop)
        pieces = [stream.push(ord(c)) for c in text if not stream.stopped]
        return pieces + [stream.flush()], stream.stopped

    pieces, stopped = run("ab<|x|>cd", ["<|x|>"])
    assert "".join(pieces) == "ab" and stopped and not any("<" in p for p in pieces)
    pieces, stopped = run("a<b<|", ["<|x|>"])  # false starts are let through, a held-back tail at the end
    assert pieces == ["a", "", "<b", "", "", "<|"] and not stopped
    assert "".join(run("hello world", ["lo w", "o"])[0]) == "hell"  # the earliest match wins


# -- errors ----------------------------------------------------------------------------------------

def error_of(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_the_server_goes_on(url, model):
    post = lambda path, **kw: httpx.post(url + path, timeout=10, **kw)  # noqa: E731
    assert error_of(post("/v1/completions", content=b"{not json"), 400)["code"] == "invalid_json"
    assert error_of(post("/v1/completions", content=b"[1, 2]"), 400)["type"] == "invalid_request_error"
    err = error_of(post("/v1/completions", json={"prompt": "hi", "best_of": 2}), 400)
    assert err["param"] == "best_of" and "best_of" in err["message"]
    assert error_of(post("/v1/completions", json={"prompt": "hi", "temperature": "hot"}), 400)["param"] == "temperature"
    assert error_of(post("/v1/completions", json={"prompt": "hi", "max_tokens": True}), 400)["param"] == "max_tokens"
    assert error_of(post("/v1/completions", json={"prompt": "hi", "model": 5}), 400)["param"] == "model"
    assert error_of(post("/v1/completions", json={"prompt": {"text": "hi"}}), 400)["param"] == "prompt"
    assert error_of(post("/v1/completions", json={"prompt": ""}), 400)["code"] == "empty_prompt"
    assert error_of(post("/v1/chat/completions", json={"messages": "hi"}), 400)["param"] == "messages"
    assert error_of(post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    assert error_of(post("/v1/completions", json={"prompt": "hi", "n": 2}), 400)["param"] == "n"
    assert error_of(post("/v1/completions", content=b" " * (1 << 20) + b"{}"), 413)
    assert error_of(httpx.get(url + "/v1/nothing"), 404)
    with pytest.raises(openai.NotFoundError) as e:
        client(url).completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="tiny", prompt="fox " * 100, max_tokens=model.context_length)
    prompt_len = len(model.encode("fox " * 100))
    assert str(prompt_len) in e.value.message and str(model.context_length) in e.value.message
    r = client(url).completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_api_key(model):
    with live(model, api_key="sesame") as (base, _, _):
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert httpx.post(base + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(base + "/health").status_code == 200  # for load balancers, no key
        assert client(base, "sesame").completions.create(model="tiny", prompt="hi", max_tokens=2).choices


# -- the queue, disconnects, shutdown --------------------------------------------------------------

def test_a_full_queue_answers_503_with_retry_after(model):
    # max_batch 1: with more rows free, requests join the running batch between steps and the queue
    # fills only when several come within one step
    with live(Slow(model, 0.02), max_queue=1, max_batch=1) as (base, _, _):
        def post(_):
            return httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 25, "temperature": 0},
                              timeout=30)

        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(post, range(5)))
        codes = sorted(a.status_code for a in answers)
        assert codes.count(200) >= 2 and set(codes) == {200, 503}, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and error_of(busy, 503)["code"] == "server_busy"
        assert post(0).status_code == 200  # and it serves again


def test_a_client_that_goes_away_frees_its_slot(model):
    with live(Slow(model, 0.02), max_queue=1) as (base, _, app_server):
        body = {"prompt": "hi", "max_tokens": 400, "temperature": 0, "stream": True}  # 8 s if it ran to the end
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        t0 = time.monotonic()
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and time.monotonic() - t0 < 3, "the abandoned requests kept the worker busy"
        deadline = time.monotonic() + 3
        while app_server.engine.running is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app_server.engine.running is None


def test_shutdown_ends_open_streams_cleanly(model):
    # max_batch 1: a second request joins a running batch at once, so only then does one wait in the queue
    with live(Slow(model, 0.02), grace=0.3, max_queue=4, max_batch=1) as (base, server, app_server):
        body = {"prompt": "hi", "max_tokens": 400, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, base + "/v1/completions", json={**body, "stream": False}, timeout=30)
                for line in r.iter_lines():
                    lines.append(line)
                    # SIGTERM once the second request waits in the queue
                    if not server.should_exit and len(lines) >= 4 and app_server.engine.jobs.qsize() == 1:
                        server.handle_exit(signal.SIGTERM, None)
                refused = waiting.result()
        assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
        last = json.loads([x for x in lines if x.startswith("data: {")][-1][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        assert refused.status_code == 503 and error_of(refused, 503)["code"] == "shutting_down"
    # live() checks that the server and the worker thread have ended


def test_cli_serve_and_sigterm(folder):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # the runtime must serve without torch: any import of it (or of the exporter) fails the server
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'signround_export'):\n"
            "            raise ImportError('the runtime imported ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from signround_runtime.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(folder), "--port", str(port), "--threads", "1",
                             "--model-name", "tiny", "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
                time.sleep(0.1)
        r = client(base, "k").chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    # uvicorn re-raises the signal after its graceful shutdown: the exit status is SIGTERM's
    assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
    assert "Finished server process" in err and "the runtime imported" not in err


# -- load ------------------------------------------------------------------------------------------

def test_load_eight_clients(served, model):
    """Concurrent requests run in batches, and every answer equals the answer to the request alone."""
    url, app_server = served
    prompts = ["The quick", "def f(x):", "Quantization", "rounding offsets"]
    want = {p: expected(model, model.encode(p), 8)[0] for p in prompts}
    want_chat = expected(model, chat_ids(model), 8)[0]
    c = client(url, timeout=60)

    def one_client(k):
        wrong = []
        for i in range(25):
            p = prompts[(k + i) % len(prompts)]
            if i % 5 == 4:
                got, ok = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                                    temperature=0).choices[0].message.content, want_chat
            else:
                got, ok = c.completions.create(model="tiny", prompt=p, max_tokens=8,
                                               temperature=0).choices[0].text, want[p]
            wrong += [] if got == ok else [(p, got, ok)]
        return wrong

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        wrong = [w for ws in pool.map(one_client, range(8)) for w in ws]
    assert not wrong, wrong[:3]
    assert time.monotonic() - t0 < 40
    assert app_server.engine.largest_batch > 1
