"""The server under malformed request bodies: every field of the chat and completion requests given
values of every wrong type, huge and non-finite numbers, deeply nested JSON, bodies that are not JSON
or not UTF-8, prompts past the context, thousands of stop strings, n > 1, unknown roles, missing
messages. Each must get a 4xx with an OpenAI error body that names the field (or the body) at fault,
never a 5xx or a hang, and the server must answer a valid request the same way afterwards."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import CHAT, chat_ids, expected, folder, live, model  # noqa: E402,F401

TIMEOUT = 20  # seconds for one answer; the tiny model answers a valid request in well under one

# The JSON types each field takes; a value of any other type must be refused naming the field.
TAKES = {
    "model": (str,), "stream": (bool,), "stream_options": (dict,), "max_tokens": (int,),
    "max_completion_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "seed": (int,),
    "stop": (str, list), "n": (int,), "user": (str,), "top_k": (int,), "repetition_penalty": (int, float),
    "chat_template_kwargs": (dict,), "messages": (list,), "prompt": (str, list),
}
CHAT_FIELDS = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "seed", "stop", "n", "user", "top_k", "repetition_penalty", "chat_template_kwargs",
               "messages"}
COMPLETION_FIELDS = CHAT_FIELDS - {"max_completion_tokens", "chat_template_kwargs", "messages"} | {"prompt"}
# one or two of each JSON type, and the edges of the ranges: 0, negatives, huge, the smallest float
SAMPLES = [True, 0, -1, 7, 2.5, "", "x", [], ["x"], [1, 2], [None], {}, {"a": 1}, 10 ** 18, 10 ** 400, 1e308,
           -1e308, 5e-324]
NON_FINITE = ["NaN", "Infinity", "-Infinity"]  # Python's json reads these words; the server must refuse them


def json_type_ok(field, value) -> bool:
    if isinstance(value, bool):
        return bool in TAKES[field]
    return isinstance(value, TAKES[field]) and not (isinstance(value, float) and int in TAKES[field]
                                                    and float not in TAKES[field])


def base_body(kind: str) -> dict:
    if kind == "chat":
        return {"messages": CHAT, "max_tokens": 2, "temperature": 0}
    return {"prompt": "The quick", "max_tokens": 2, "temperature": 0}


def path_of(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


class Answers:
    """Every answer the fuzz got, tallied, with the ones that broke the rules kept for the message."""

    def __init__(self, http: httpx.Client):
        self.http, self.count, self.broken = http, 0, []

    def post(self, kind: str, content: bytes, case: str, param=..., status=(400,)):
        """POST raw bytes; the answer must be a status in `status` with an OpenAI error body, naming
        `param` when given (None: the body as a whole)."""
        self.count += 1
        try:
            r = self.http.post(path_of(kind), content=content, headers={"content-type": "application/json"})
        except httpx.TimeoutException:
            self.broken.append((case, "no answer within the timeout"))
            return None
        except httpx.TransportError as e:
            self.broken.append((case, f"the connection failed: {e!r}"))
            return None
        if r.status_code == 200:
            if status != (200,) and 200 not in status:
                self.broken.append((case, f"accepted: {r.text[:120]}"))
            return r
        try:
            err = r.json()["error"]
            ok = set(err) == {"message", "type", "param", "code"} and err["message"]
        except (ValueError, KeyError, TypeError):
            ok, err = False, r.text[:200]
        if r.status_code not in status or not ok:
            self.broken.append((case, f"{r.status_code} {err}"))
        elif param is not ... and err["param"] != param and 200 not in status:
            self.broken.append((case, f"param {err['param']!r}, not {param!r}: {err['message']}"))
        return r

    def post_json(self, kind, body, case, **kw):
        return self.post(kind, json.dumps(body).encode(), case, **kw)


@pytest.fixture(scope="module")
def answers(model):  # noqa: F811
    with live(model) as (base, _, app_server):
        with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            yield Answers(http), app_server


def still_serves(answers: Answers, model) -> None:  # noqa: F811
    want = expected(model, model.encode("The quick"), 2)[0]
    r = answers.http.post("/v1/completions", json=base_body("completion"))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text[:300]
    want_chat = expected(model, chat_ids(model), 2)[0]
    r = answers.http.post("/v1/chat/completions", json=base_body("chat"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want_chat, r.text[:300]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_field_of_every_wrong_type_is_refused_naming_it(answers, model, kind):  # noqa: F811
    a, _ = answers
    fields = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    before = a.count
    for field in sorted(fields):
        for value in SAMPLES:
            body = {**base_body(kind), field: value}
            case = f"{kind} {field}={json.dumps(value)[:30]}"
            if json_type_ok(field, value):
                # a value of the right type may be valid or out of range: never a 5xx, and a
                # refusal names this field (a prompt that is too long may name max_tokens)
                limit = "max_completion_tokens" if field == "max_completion_tokens" else "max_tokens"
                r = a.post_json(kind, body, case, status=(200, 400, 404))
                if r is not None and r.status_code >= 400:
                    param = r.json()["error"]["param"]
                    if param not in (field, limit):
                        a.broken.append((case, f"refused naming {param!r}: {r.json()['error']['message']}"))
            else:
                a.post_json(kind, body, case, param=field)
        for word in NON_FINITE:
            if float in TAKES[field] or int in TAKES[field]:
                raw = json.dumps(base_body(kind))[:-1] + f', "{field}": {word}}}'
                a.post(kind, raw.encode(), f"{kind} {field}={word}", param=field)
    assert not a.broken, "\n".join(map(str, a.broken))
    assert a.count - before > 200
    still_serves(a, model)


def test_huge_numbers_nesting_bad_bytes_and_bad_messages(answers, model):  # noqa: F811
    a, app_server = answers
    ctx = model.context_length
    cases = [  # (kind, raw body, case, param the error must name or ... for any, allowed statuses)
        ("completion", {"prompt": "hi", "max_tokens": 10 ** 18}, "max_tokens 1e18", "max_tokens"),
        ("chat", {"messages": CHAT, "max_tokens": 10 ** 18}, "chat max_tokens 1e18", "max_tokens"),
        ("chat", {"messages": CHAT, "max_completion_tokens": 10 ** 18}, "max_completion_tokens 1e18",
         "max_completion_tokens"),
        ("completion", {"prompt": "hi", "temperature": 1e308}, "temperature 1e308", "temperature"),
        ("completion", {"prompt": "hi", "n": 10 ** 9}, "n 1e9", "n"),
        ("completion", {"prompt": "hi", "n": 2}, "n 2", "n"),
        ("chat", {"messages": CHAT, "n": 3}, "chat n 3", "n"),
        ("completion", {"prompt": "hi", "seed": 10 ** 40, "max_tokens": 2}, "seed 1e40", ...),
        ("completion", {"prompt": "hi", "top_k": 10 ** 18, "temperature": 1, "max_tokens": 2}, "top_k 1e18", ...),
        ("completion", {"prompt": "fox " * (2 * ctx), "max_tokens": 1}, "prompt past the context", "max_tokens"),
        ("chat", {"messages": [{"role": "user", "content": "fox " * (2 * ctx)}]}, "chat past the context",
         "messages"),
        ("completion", {"prompt": [1] * (ctx + 5)}, "token ids past the context", "max_tokens"),
        ("completion", {"prompt": [10 ** 18]}, "token id 1e18", "prompt"),
        ("completion", {"prompt": [-1, 2]}, "token id -1", "prompt"),
        ("completion", {"prompt": ["a", "b"]}, "a batch of two prompts", "prompt"),
        ("completion", {"prompt": "hi", "stop": ["s"] * 5000}, "5000 stop strings", "stop"),
        ("completion", {"prompt": "hi", "stop": [str(i) for i in range(3000)]}, "3000 distinct stops", "stop"),
        ("completion", {"prompt": "hi", "stop": [""]}, "an empty stop string", "stop"),
        ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "unknown role", "messages"),
        ("chat", {"messages": [{"role": None, "content": "x"}]}, "null role", "messages"),
        ("chat", {"messages": [{"content": "x"}]}, "no role", "messages"),
        ("chat", {"messages": [{"role": "user"}]}, "no content", "messages"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, "numeric content", "messages"),
        ("chat", {"messages": [{"role": "user", "content": {"text": "x"}}]}, "object content", "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
         "an image part", "messages"),
        ("chat", {"messages": [{"role": "user", "content": [5]}]}, "a numeric part", "messages"),
        ("chat", {"messages": ["hi"]}, "a string message", "messages"),
        ("chat", {"messages": []}, "no messages", "messages"),
        ("chat", {"max_tokens": 2}, "missing messages", "messages"),
        ("completion", {"max_tokens": 2}, "missing prompt", "prompt"),
        ("chat", {"messages": CHAT, "chat_template_kwargs": {"messages": []}}, "kwargs set messages",
         "chat_template_kwargs"),
        ("chat", {"messages": CHAT, "stream_options": {"include_usage": 1}}, "include_usage 1",
         "stream_options.include_usage"),
        ("chat", {"messages": CHAT, "stream_options": {"x": True}}, "stream_options x", "stream_options"),
        ("completion", {"prompt": "hi", "logprobs": 3}, "an unsupported field", "logprobs"),
        ("completion", {"prompt": "\ud800 lone surrogate"}, "a lone surrogate in the prompt", "prompt"),
        ("chat", {"messages": [{"role": "user", "content": "\udfff"}]}, "a lone surrogate in a message",
         "messages"),
        ("completion", {"prompt": "hi", "stop": ["\ud800"], "max_tokens": 2}, "a lone surrogate in stop", "stop"),
    ]
    for kind, body, case, param in cases:
        a.post_json({"completion": "completion"}.get(kind, "chat"), body, case, param=param,
                    status=(200, 400) if param is ... else (400,))

    depth = 10 ** 5
    raw_bodies = [  # (kind, bytes, case, statuses)
        ("completion", b"[" * depth + b"]" * depth, "10**5 nested lists", (400,)),
        ("completion", b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}", "10**5 nested in the prompt", (400,)),
        ("chat", b'{"messages": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}", "10**5 nested objects", (400,)),
        ("completion", b"[" * depth, "10**5 unclosed lists", (400,)),
        ("completion", b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "a 5001-digit integer", (400,)),
        ("completion", b'{"prompt": "hi", "temperature": 0.' + b"1" * 5000 + b"}", "a 5001-digit float (valid)",
         (200,)),
        ("completion", b'{"prompt": "hi", "temperature": 1e99999}', "a float that overflows", (400,)),
        ("completion", b'{"prompt": "\xff\xfe\xfa"}', "invalid UTF-8 in a string", (400,)),
        ("completion", b"\xff\xfe\x00\xd8", "a UTF-16 mark and a lone surrogate", (400,)),
        ("completion", b"\xc3\x28", "an invalid two-byte sequence", (400,)),
        ("completion", b"", "an empty body", (400,)),
        ("completion", b"not json at all", "not JSON", (400,)),
        ("completion", b'{"prompt": "hi",}', "a trailing comma", (400,)),
        ("completion", b'{"prompt": "hi"} {"prompt": "hi"}', "two objects", (400,)),
        ("completion", b'"just a string"', "a JSON string", (400,)),
        ("completion", b"null", "JSON null", (400,)),
        ("chat", b'{"messages": null}', "null messages", (400,)),
        ("completion", b'{"prompt": "a", "prompt": 5}', "a repeated key", (400,)),
    ]
    for levels in range(900, 1001, 12):  # about as deep as the parser goes: later steps must cope too
        for field in ("prompt", "stop", "model"):
            raw = b'{"max_tokens": 2, "%s": ' % field.encode() + b"[" * levels + b"]" * levels + b"}"
            raw_bodies.append(("completion", raw, f"{field} nested {levels} deep", (400,)))
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": ' + \
            b"[" * levels + b"]" * levels + b"}}"
        raw_bodies.append(("chat", raw, f"chat_template_kwargs nested {levels} deep", (200, 400)))
    for kind, raw, case, statuses in raw_bodies:
        a.post(kind, raw, case, status=statuses)

    rng = random.Random(19)  # random bytes, and valid bodies with bytes flipped
    valid = json.dumps(base_body("completion")).encode()
    for i in range(40):
        if i % 2:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        else:
            raw = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(raw)
        a.post("completion", raw, f"random bytes #{i}: {raw[:40]!r}", status=(200, 400, 404))

    assert not a.broken, "\n".join(map(str, a.broken))
    still_serves(a, model)
    assert app_server.engine.jobs.qsize() == 0


def test_long_stop_strings_cost_little(answers, model):  # noqa: F811
    """The most stop text a request may send (16 strings of 60,000 characters) must not hold the one
    worker thread that every client shares: the answer equals the one without stops, and is quick."""
    a, _ = answers
    body = {**base_body("completion"), "max_tokens": 8}
    plain = a.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stops = ["\u2603" + "ab" * 30000 + str(i) for i in range(16)]  # never in the answer
    t0 = time.monotonic()
    r = a.http.post("/v1/completions", json={**body, "stop": stops})
    seconds = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain, r.text[:300]
    assert seconds < 2, f"{seconds:.1f} s for 8 tokens"
