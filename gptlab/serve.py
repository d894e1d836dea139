"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation engine.

Each request takes one of `max_concurrency` engines for its whole run, and so has a KV cache of its own; the others
wait their turn. A streaming client that disconnects sets a flag that its run checks after every token,
so its slot frees at once. Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) and a 4xx
status; bad input never becomes a 500.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Request  # here, where FastAPI resolves the handlers' annotations
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from gptlab.api import LLM
from gptlab.errors import GptlabError
from gptlab.generate import Engine, SamplingParams, TextStream

PLAYGROUND = Path(__file__).with_name("playground.html")


def _utf8(text: str) -> str:
    """JSON can carry a lone surrogate (`"\\ud800"`), which is no text a tokenizer can take: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # unknown fields are ignored, as OpenAI does

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what a torch generator takes

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]]  # text, or token ids, one prompt or several

    def prompts(self) -> list[str] | list[list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None  # OpenAI's content parts: text ones (a model of text reads no more)

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"a content part of type {kind!r}: this model reads text parts only")
        return content

    def text(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Server:
    """The model, its tokenizer and the admission of requests; the FastAPI app is built around one."""

    def __init__(self, llm: LLM, model_name: str, max_concurrency: int = 1, max_prompt_chars: int = 100_000,
                 max_rows: int = 64, max_queued: int = 256) -> None:
        self.llm = llm
        self.model_name = model_name
        self.max_rows = max_rows  # prompts x n of one request: the rows of its batch
        self.max_queued = max_queued  # completions (rows) one client may have running or waiting
        self.queued: dict[str, int] = {}
        # One engine per slot: a request takes one for its whole run, so no two runs share an engine's cached
        # state (on a GPU an engine keeps its CUDA-graph KV cache between calls).
        self.engines: queue.Queue[Engine] = queue.Queue()
        for _ in range(max_concurrency):
            self.engines.put(Engine(llm.model, llm.tokenizer))
        self.max_prompt_chars = max_prompt_chars
        self.created = int(time.time())
        self.abandoned = 0  # runs stopped early because their client went away

    # -- admission ---------------------------------------------------------------------------------------------
    def check_request(self, req: _Request, prompts: int) -> None:
        """The model it names, and the size of its batch: a request is refused before it costs anything."""
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")
        if prompts * req.n > self.max_rows:
            raise APIError(400, f"{prompts} prompt(s) x n {req.n} = {prompts * req.n} completions; this server takes "
                                f"at most {self.max_rows} per request (serve --max-rows)", "n", "too_many_rows")

    def admit(self, client: str, rows: int) -> Callable[[], None]:
        """Count a request's rows against its client; returns what ends it (which may be called more than once)."""
        if self.queued.get(client, 0) + rows > self.max_queued:
            raise APIError(429, f"this client has {self.queued.get(client, 0)} completions running or waiting; "
                                f"{rows} more would pass its {self.max_queued} (serve --max-queued): retry when some "
                                "have finished", code="rate_limit_exceeded", kind="requests")
        self.queued[client] = self.queued.get(client, 0) + rows
        ended = threading.Event()

        def release() -> None:
            if not ended.is_set():
                ended.set()
                self.queued[client] -= rows
                if not self.queued[client]:
                    del self.queued[client]

        return release

    # -- requests -> prompts -----------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str] | Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        """Token ids of the prompts (a BOS first where the model's tokenizer adds one; ids as given), after checking
        each against the size limit, the vocabulary and the context."""
        out = []
        vocab = self.llm.model.config.vocab_size
        for p in prompts:
            if len(p) > self.max_prompt_chars:
                raise APIError(400, f"the prompt has {len(p)} characters; this server takes at most "
                                    f"{self.max_prompt_chars}", "prompt", "prompt_too_long")
            if not isinstance(p, str) and any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"the prompt has token ids outside the vocabulary [0, {vocab})", "prompt")
            out.append(self.check_length(self.llm.engine.encode(p) if isinstance(p, str) else list(p), max_tokens))
        return out

    def check_length(self, ids: list[int], max_tokens: int) -> list[int]:
        ctx = self.llm.engine.context
        n = max(1, len(ids))
        if n + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion).",
                           "max_tokens", "context_length_exceeded")
        return ids

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The conversation through the model's chat template (gptlab's own for a model without one)."""
        turns = [m.text() for m in messages]
        if sum(len(m["content"]) for m in turns) > self.max_prompt_chars:
            raise APIError(400, f"the messages have more than {self.max_prompt_chars} characters", "messages",
                           "prompt_too_long")
        return self.llm.tokenizer.encode_chat(turns, add_generation_prompt=True)

    # -- generation (runs in a worker thread) ------------------------------------------------------------------
    def generate(self, prompts: Sequence[list[int]], req: _Request, max_tokens: int, stop: list[str],
                 stop_ids: Sequence[int], emit: Callable[[int, str], None], cancelled: threading.Event
                 ) -> list[TextStream]:
        """Generate `req.n` choices for each prompt (choice i*n+j is prompt i's j-th); `emit(choice, piece)` as text
        becomes final. Holds a slot for the whole run; returns each choice's stream (text, tokens, finish reason)."""
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p if req.top_p < 1 else None,
                                seed=req.seed)
        batch = [p for p in prompts for _ in range(req.n)]
        rows = [TextStream(self.llm.tokenizer, stop, stop_ids) for _ in batch]
        engine = self.engines.get()  # waits for a free slot
        try:
            for choice, piece in engine.stream_rows(batch, rows, max_tokens, params):
                if cancelled.is_set():
                    self.abandoned += 1
                    break
                emit(choice, piece)
        finally:
            self.engines.put(engine)
        return rows


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(server: Server, api_key: str | None = None):  # -> fastapi.FastAPI
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None)  # no schema pages: a 404

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        # of a union's alternatives, the one whose own check failed says most (a lone surrogate in a text)
        first = next((x for x in errors if x.get("type") == "value_error"), errors[0] if errors else {})
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x)]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, message, ".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(GptlabError)
    async def user_error(_: Request, e: GptlabError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND, media_type="text/html")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "gptlab"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = req.prompts()
        if not prompts or any(not p and not isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        server.check_request(req, len(prompts))
        max_tokens = req.max_tokens or 16
        ids = server.encode_prompts(prompts, max_tokens)
        return await respond(req, ids, max_tokens, req.stops(), server.llm.tokenizer.stop_ids, chat=False,
                             client=_client(request))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tok = server.llm.tokenizer
        server.check_request(req, 1)
        ids = server.encode_chat(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, server.llm.engine.context - len(ids))
        server.check_length(ids, max_tokens)
        return await respond(req, [ids], max_tokens, req.stops() + tok.chat_stop_strings, tok.chat_stop_ids,
                             chat=True, client=_client(request))

    def _client(request: Request) -> str:
        """Who a request counts against: its API key where one is sent, else its address."""
        return request.headers.get("authorization") or (request.client.host if request.client else "?")

    async def respond(req: _Request, prompts: list[list[int]], max_tokens: int, stop: list[str],
                      stop_ids: Sequence[int], chat: bool, client: str):
        release = server.admit(client, len(prompts) * req.n)
        if req.stream:  # released when the stream ends, or when its response does
            return StreamingResponse(stream(req, prompts, max_tokens, stop, stop_ids, chat, _base(req, chat), release),
                                     media_type="text/event-stream", background=BackgroundTask(release))
        try:
            return await complete(req, prompts, max_tokens, stop, stop_ids, chat)
        finally:
            release()

    def _base(req: _Request, chat: bool) -> dict[str, Any]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.model_name}

    async def complete(req: _Request, prompts: list[list[int]], max_tokens: int, stop: list[str],
                       stop_ids: Sequence[int], chat: bool) -> dict[str, Any]:
        prompt_lengths = [max(1, len(p)) for p in prompts]
        base = _base(req, chat)
        cancelled = threading.Event()
        rows = await asyncio.to_thread(server.generate, prompts, req, max_tokens, stop, stop_ids, lambda *_: None,
                                       cancelled)
        choices = []
        for i, row in enumerate(rows):
            choice: dict[str, Any] = {"index": i, "finish_reason": row.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": row.text}
            else:
                choice.update(text=row.text, logprobs=None)
            choices.append(choice)
        completion_tokens = sum(len(r.token_ids) for r in rows)
        prompt_tokens = sum(prompt_lengths) * req.n
        return {**base, "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens}}

    async def stream(req: _Request, prompts: list[list[int]], max_tokens: int, stop: list[str],
                     stop_ids: Sequence[int], chat: bool, base: dict[str, Any], release: Callable[[], None]
                     ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text:
                    delta["content"] = text
                return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return {**base, "choices": [{"index": index, "text": text or "", "logprobs": None,
                                         "finish_reason": finish}]}

        def work() -> None:
            try:
                rows = server.generate(prompts, req, max_tokens, stop, stop_ids,
                                       lambda i, p: loop.call_soon_threadsafe(queue.put_nowait, ("piece", i, p)),
                                       cancelled)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", rows, None))
            except Exception as e:  # reported in the stream; the connection is already 200
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e, None))

        loop.run_in_executor(None, work)
        try:
            if chat:
                for i in range(len(prompts) * req.n):
                    yield _sse(chunk(i, None, None, role=True))
            while True:
                kind, a, b = await queue.get()
                if kind == "piece":
                    yield _sse(chunk(a, b, None))
                elif kind == "done":
                    for i, row in enumerate(a):
                        yield _sse(chunk(i, None, row.finish_reason))
                    yield _sse("[DONE]")
                    return
                else:
                    yield _sse(APIError(500, f"generation failed: {a}", kind="server_error").body())
                    return
        finally:
            cancelled.set()  # a client that went away frees its slot at the next token
            release()

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 1, device: str | None = None, dtype: str | None = None, max_rows: int = 64,
          max_queued: int = 256, max_prompt_chars: int = 100_000) -> None:
    """Load a checkpoint and serve it until interrupted."""
    import sys

    import uvicorn

    from gptlab.api import load

    if host not in LOOPBACK and not api_key:
        print(f"gptlab: warning: serving on {host} without --api-key: anyone who can reach this address can use the "
              "model", file=sys.stderr)
    llm = load(checkpoint, device=device, dtype=dtype)
    llm.tokenizer.check_chat_template()  # a template that does not render is a start-up error, not a 400 per request
    server = Server(llm, Path(checkpoint).resolve().name, max_concurrency=max_concurrency,
                    max_prompt_chars=max_prompt_chars, max_rows=max_rows, max_queued=max_queued)
    uvicorn.run(create_app(server, api_key), host=host, port=port, log_level="info")
