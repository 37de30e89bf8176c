"""An OpenAI-compatible HTTP server: `signround-run serve MODEL_DIR`.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with
`stream: true`), GET /v1/models, GET /health. Starlette and uvicorn do the HTTP; one worker thread
(engine.py) runs the generations. Errors use OpenAI's body, {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job, QueueFull, ShuttingDown
from .model import Model, RuntimeModelError
from .sampling import Sampling

MAX_BODY = 1 << 20  # 1 MB: far more than any prompt the context holds


# Deeper bodies are refused before any check walks them: those checks (and json.dumps in their
# messages) recurse, and a body that parsed just below the interpreter's limit would overflow there.
# Requests themselves are shallow; tool schemas in chat_template_kwargs may nest a few dozen levels.
MAX_NESTING = 64


def nesting(value) -> int:
    """How many levels of lists and dicts value holds, counted without recursion."""
    if not isinstance(value, (list, dict)):
        return 0
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, level = todo.pop()
        deepest = max(deepest, level)
        todo.extend((x, level + 1) for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (list, dict)))
    return deepest


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- request checking ------------------------------------------------------------------------------

def _number(name, v, low=None, high=None, low_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(v)[:40]}", name, "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):  # Python's json reads NaN, which passes any comparison
        raise ApiError(400, f"{name} must be a finite number, got {v}", name, "invalid_value")
    if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
        raise ApiError(400, f"{name} must lie in {'(' if low_open else '['}{low}, {high}], got {v}", name,
                       "invalid_value")
    return float(v)


def _integer(name, v, low=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(v)[:40]}", name, "invalid_type")
    if low is not None and v < low:
        raise ApiError(400, f"{name} must be at least {low}, got {v}", name, "invalid_value")
    return v


def _bool(name, v):
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(v)[:40]}", name, "invalid_type")
    return v


def _stop(v):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise ApiError(400, "stop must be a non-empty string or a list of up to 16 non-empty strings", "stop",
                       "invalid_type")
    return stops


def _one(name, v):
    if _integer(name, v) != 1:
        raise ApiError(400, f"{name} must be 1: this server returns one choice per request, got {v}", name,
                       "unsupported_value")
    return v


def _string(name, v):
    if not isinstance(v, str):
        raise ApiError(400, f"{name} must be a string, got {json.dumps(v)[:40]}", name, "invalid_type")
    return v


def _stream_options(v):
    if not isinstance(v, dict) or set(v) - {"include_usage"}:
        raise ApiError(400, 'stream_options must be {"include_usage": true|false}', "stream_options", "invalid_type")
    return _bool("stream_options.include_usage", v.get("include_usage", False))


def _template_kwargs(v):
    """chat_template_kwargs (as vLLM takes it): more variables for the chat template, such as Qwen3's
    enable_thinking. The ones the server sets itself cannot be replaced."""
    if not isinstance(v, dict):
        raise ApiError(400, 'chat_template_kwargs must be an object, e.g. {"enable_thinking": false}',
                       "chat_template_kwargs", "invalid_type")
    taken = sorted(set(v) & {"messages", "add_generation_prompt", "tools", "documents"})
    if taken:
        raise ApiError(400, f"chat_template_kwargs cannot set {', '.join(taken)}: the server sets "
                            f"{'it' if len(taken) == 1 else 'them'}", "chat_template_kwargs", "invalid_value")
    return v


# Each accepted field and its check (None: checked where it is used). Anything else is a 400, so a
# client learns at once that a parameter it relies on (logprobs, tools, ...) is not honoured here.
COMMON = {
    "model": lambda v: _string("model", v),
    "stream": lambda v: _bool("stream", v),
    "stream_options": _stream_options,
    "max_tokens": lambda v: _integer("max_tokens", v, 1),
    "temperature": lambda v: _number("temperature", v, 0, 2),
    "top_p": lambda v: _number("top_p", v, 0, 1, True),
    "seed": lambda v: _integer("seed", v, 0),
    "stop": _stop,
    "n": lambda v: _one("n", v),
    "user": lambda v: _string("user", v),
    # extensions that other OpenAI-compatible servers accept too
    "top_k": lambda v: _integer("top_k", v, 0),
    "repetition_penalty": lambda v: _number("repetition_penalty", v, 0, 10, True),
}
FIELDS = {
    "chat": {**COMMON, "messages": None,
             "max_completion_tokens": lambda v: _integer("max_completion_tokens", v, 1),
             "chat_template_kwargs": _template_kwargs},
    "completion": {**COMMON, "prompt": None},
}


def _text_only(name, v) -> None:
    """JSON's \\ud800-style escapes can spell lone surrogates, which are no text: the tokenizer cannot
    take them, so they are refused here, naming the field."""
    try:
        json.dumps(v, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, f"{name} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is "
                            "not text", name, "invalid_text") from None


def check_fields(body, kind: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    allowed = FIELDS[kind]
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unsupported field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; this server "
                            f"accepts: {', '.join(sorted(allowed))}", unknown[0], "unknown_parameter")
    out = {}
    for name, v in body.items():
        if v is None:  # null means "the default", as OpenAI takes it
            continue
        _text_only(name, v)
        check = allowed[name]
        out[name] = check(v) if check else v
    return out


def chat_messages(messages) -> list[dict]:
    """OpenAI's messages as the template wants them: content parts joined, "developer" as "system"."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, 'messages must be a non-empty list of {"role", "content"} objects', "messages",
                       "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can reach this model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages",
                               "invalid_type")
            content = "".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": content})
    return out


# -- the app ---------------------------------------------------------------------------------------

class Server:
    def __init__(self, model: Model, model_name: str | None = None, api_key: str | None = None,
                 max_queue: int = 16, max_batch: int = 8, prefix_cache_mb: float = 64):
        self.model, self.max_batch, self.prefix_cache_mb = model, max_batch, prefix_cache_mb
        self.name = model_name or model.folder.name
        self.api_key = api_key or None
        self.max_queue = max_queue
        self.engine: Engine | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.created = int(time.time())

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
            self.engine = Engine(self.model, self.max_queue, self.max_batch, self.prefix_cache_mb)
            try:
                yield
            finally:
                await run_in_threadpool(self.engine.stop)

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.one_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completion, methods=["POST"]),
        ]

        async def http_error(request, exc: HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = f"{request.method} {request.url.path}: {exc.detail}"
            return ApiError(exc.status_code, message, None, code).response()

        async def crash(request, exc: Exception):
            return ApiError(500, f"internal error: {exc!r}", None, "internal_error", type="server_error").response()

        return Starlette(routes=routes, lifespan=lifespan,
                         exception_handlers={HTTPException: http_error, Exception: crash})

    def drain(self, grace: float) -> None:
        """Start the shutdown; safe from a signal handler or another thread: the work is done on the
        event loop, never inside the handler (which may have interrupted a holder of the queue's lock)."""
        if self.engine and self.loop:
            self.loop.call_soon_threadsafe(self.engine.drain, grace)

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request):
        e = self.engine
        if e is None or e.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.name, "queued": e.jobs.qsize(),
                             "running": e.running is not None, "batch": len(e.running or ()),
                             "prefix_cache": e.cache.stats() if e.cache else None})

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "signround",
                "context_length": self.model.context_length}

    async def models(self, request: Request):
        return self._guard(request) or JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request):
        if denied := self._guard(request):
            return denied
        try:
            self._check_model(request.path_params["name"])
        except ApiError as e:
            return e.response()
        return JSONResponse(self._model_card())

    async def chat(self, request: Request):
        return await self._complete(request, "chat")

    async def completion(self, request: Request):
        return await self._complete(request, "completion")

    # -- the work --------------------------------------------------------------------------------

    def _guard(self, request: Request):
        """None when the request may pass, else the 401 response."""
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        return ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`", None,
                        "invalid_api_key").response()

    def _check_model(self, name) -> None:
        if name is not None and name != self.name:
            raise ApiError(404, f"the model {str(name)[:100]!r} does not exist; this server serves {self.name!r} "
                                "(GET /v1/models)", "model", "model_not_found")

    async def _complete(self, request: Request, kind: str):
        if denied := self._guard(request):
            return denied
        try:
            body = await self._json(request)
            p = check_fields(body, kind)
            self._check_model(p.get("model"))
            if self.engine is None:
                raise ShuttingDown()
            job, prompt_tokens = await self._job(p, kind)
            self.engine.submit(job)
        except ApiError as e:
            return e.response()
        except QueueFull as e:
            return ApiError(503, str(e), None, "server_busy", type="server_error",
                            headers={"Retry-After": str(e.retry_after)}).response()
        except ShuttingDown as e:
            return ApiError(503, str(e), None, "shutting_down", type="server_error",
                            headers={"Retry-After": "5"}).response()
        except ClientDisconnect:
            return ApiError(400, "the client went away while sending the body").response()
        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.name}
        if p.get("stream"):
            return StreamingResponse(self._sse(job, kind, meta, prompt_tokens, bool(p.get("stream_options"))),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, kind, meta, prompt_tokens)

    async def _json(self, request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY}", None,
                           "request_too_large")
        data = bytearray()
        async for chunk in request.stream():  # counted as it comes: a chunked body has no length up front
            data += chunk
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the request body exceeds the limit of {MAX_BODY} bytes", None,
                               "request_too_large")
        try:
            body = json.loads(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
            raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        except RecursionError:  # the parser recurses once per level of [ or {
            too_deep = True
        else:
            too_deep = nesting(body) > MAX_NESTING
        if too_deep:
            raise ApiError(400, f"the request body nests arrays or objects more than {MAX_NESTING} deep", None,
                           "invalid_json")
        return body

    async def _job(self, p: dict, kind: str) -> tuple[Job, int]:
        model = self.model
        if kind == "chat":
            if "messages" not in p:
                raise ApiError(400, "messages is required", "messages", "missing_parameter")
            messages = chat_messages(p["messages"])
            try:  # the template may refuse the messages (Gemma: no system role): the request is at fault
                prompt = await run_in_threadpool(model.chat_ids, messages, **p.get("chat_template_kwargs", {}))
            except ValueError as e:
                raise ApiError(400, str(e), "messages", "invalid_messages") from None
            limit_name = "max_completion_tokens" if p.get("max_completion_tokens") is not None else "max_tokens"
            max_tokens = p.get(limit_name)
        else:
            if "prompt" not in p:
                raise ApiError(400, "prompt is required", "prompt", "missing_parameter")
            prompt = await self._prompt_ids(p["prompt"])
            limit_name, max_tokens = "max_tokens", p.get("max_tokens", 16)  # OpenAI's default for completions
        field = "messages" if kind == "chat" else "prompt"
        if not prompt:
            raise ApiError(400, f"the {field} is empty after tokenizing; send some text", field, "empty_prompt")
        context = model.context_length
        if max_tokens is None:  # chat without a limit: whatever the context has room for
            max_tokens = context - len(prompt)
            if max_tokens < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens, which fills the model's context length "
                                    f"of {context}; shorten the {field}", field, "context_length_exceeded")
        if len(prompt) + max_tokens > context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens and {limit_name} is {max_tokens}: together "
                                f"{len(prompt) + max_tokens}, more than the model's context length of {context}; "
                                f"shorten the {field} or lower {limit_name}", limit_name, "context_length_exceeded")
        # OpenAI's default temperature is 1 (sampling); send temperature 0 for greedy, repeatable answers
        sampling = Sampling(temperature=p.get("temperature", 1.0), top_k=p.get("top_k", 0),
                            top_p=p.get("top_p", 1.0),
                            repetition_penalty=p.get("repetition_penalty", 1.0), seed=p.get("seed"))
        job = Job(prompt, max_tokens, sampling, p.get("stop") or [], asyncio.get_running_loop())
        return job, len(prompt)

    async def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return await run_in_threadpool(self.model.encode, prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.vocab_size
            if vocab and any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must lie in 0..{vocab - 1}", "prompt", "invalid_value")
            return prompt
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt",
                       "invalid_type")

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _whole(self, request: Request, job: Job, kind: str, meta: dict, prompt_tokens: int):
        async def watch():  # the body is read, so the next message can only be the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()  # nobody will read the answer: free the worker
            job.events.put_nowait(("gone",))

        watcher = asyncio.create_task(watch())
        pieces = []
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    return self._job_error(event[1]).response()
                elif event[0] == "gone":
                    return JSONResponse({}, status_code=499)  # nobody reads it; uvicorn just ends the task
                else:
                    _, reason, completion_tokens = event
                    break
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once done; if this task is cancelled it stops the generation
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if kind == "chat" else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return JSONResponse({**meta, "choices": [choice], "usage": self._usage(prompt_tokens, completion_tokens)})

    @staticmethod
    def _job_error(e: Exception) -> ApiError:
        if isinstance(e, ShuttingDown):
            return ApiError(503, str(e), None, "shutting_down", type="server_error", headers={"Retry-After": "5"})
        if isinstance(e, (RuntimeModelError, ValueError)):
            return ApiError(400, str(e), None, "invalid_request")
        return ApiError(500, f"generation failed: {e!r}", None, "internal_error", type="server_error")

    async def _sse(self, job: Job, kind: str, meta: dict, prompt_tokens: int, include_usage: bool):
        meta = {**meta, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def chunk(piece: str | None, reason: str | None = None, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else {} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            extra = {"usage": None} if include_usage else {}
            return f"data: {json.dumps({**meta, 'choices': [choice], **extra})}\n\n"

        try:
            if kind == "chat":
                yield chunk(None, first=True)
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield chunk(event[1])
                elif event[0] == "error":
                    yield f"data: {json.dumps(self._job_error(event[1]).body())}\n\n"
                    break
                else:
                    _, reason, completion_tokens = event
                    yield chunk(None, reason)
                    if include_usage:
                        usage = self._usage(prompt_tokens, completion_tokens)
                        yield f"data: {json.dumps({**meta, 'choices': [], 'usage': usage})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (this generator was cancelled) or all is sent: free the worker


def serve(folder, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_queue: int = 16,
          threads: int | None = None, model_name: str | None = None, grace: float = 10.0, max_batch: int = 8,
          verify: bool = True, prefix_cache_mb: float = 64) -> None:
    """Load the model (its files checked against sha256sums.txt unless verify is False) and serve until
    SIGINT/SIGTERM. On the signal: no new requests, queued ones are refused (503), the running batch gets
    `grace` seconds to finish before it is cut (finish_reason "length"), every open stream ends with
    [DONE], then the worker thread stops."""
    import uvicorn

    model = Model(folder, threads=threads, verify=verify)
    server = Server(model, model_name, api_key, max_queue, max_batch, prefix_cache_mb)
    config = uvicorn.Config(server.app(), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=grace + 5)
    make_uvicorn(server, config, grace).run()


def make_uvicorn(server: Server, config, grace: float = 10.0):
    """A uvicorn.Server that starts our drain as soon as a shutdown signal comes."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server.drain(grace)
            super().handle_exit(sig, frame)

    return _Uvicorn(config)
