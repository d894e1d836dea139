"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over continuous batching (`gptlab.batching`).

Every completion (a prompt x n choices) is a row of the one running batch: it joins when a cache slot is free and
its prompt is in, and leaves when it stops or its client goes away. The API is what agent frameworks use: logprobs,
`response_format` (JSON object or schema) and `tools` / `tool_choice` through constrained decoding
(`gptlab.grammar`, `gptlab.toolcall`), `stream_options.include_usage`, and `/v1/embeddings`. A parameter gptlab does
not implement is a 400 naming it, never silently ignored. Errors use OpenAI's body (`{"error": {"message", "type",
"param", "code"}}`) and a 4xx status; bad input never becomes a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Request  # here, where FastAPI resolves the handlers' annotations
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from gptlab.api import LLM
from gptlab.batching import Row, Scheduler
from gptlab.errors import GptlabError
from gptlab.generate import SamplingParams, TextStream
from gptlab.grammar import Grammars, json_schema_grammar
from gptlab.toolcall import call_format, call_grammar, parse_calls, prompt_messages, renders_tools

PLAYGROUND = Path(__file__).with_name("playground.html")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (completions: 5)


def _utf8(text: str) -> str:
    """JSON can carry a lone surrogate (`"\\ud800"`), which is no text a tokenizer can take: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


def _unimplemented(model: Any, **defaults: Any) -> Any:
    """OpenAI parameters gptlab does not implement may be sent only with their no-op value."""
    for name, default in defaults.items():
        value = getattr(model, name)
        if value is not None and value != default:
            raise ValueError(f"`{name}` is not implemented by this server (send it unset or {default!r})")
    return model


class _Strict(BaseModel):
    # a field this server does not know is a 400 naming it (OpenAI's own API refuses unknown arguments too)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # the official client may send it; there is nothing to obfuscate


class _Request(_Strict):
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what a torch generator takes
    user: str | None = None  # an end-user id for the caller's own records: accepted, unused
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def check_sampling(self) -> _Request:
        return _unimplemented(self, frequency_penalty=0, presence_penalty=0, logit_bias={})

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]]  # text, or token ids, one prompt or several
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's top alternatives (0: the chosen token's only)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def check_legacy(self) -> CompletionRequest:
        return _unimplemented(self, echo=False, best_of=1, suffix="")

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
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"a content part of type {kind!r}: this model reads text parts only")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for c in calls or []:
            f = c.get("function")
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                    not isinstance(f.get("arguments"), str | dict):
                raise ValueError("a tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", "
                                 "\"arguments\"}}")
        return calls

    def text(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        out: dict[str, Any] = {"role": self.role, "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class Function(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(_Strict):
    name: str


class NamedTool(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchema(_Strict):
    name: str
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool = True
    metadata: dict[str, str] | None = None  # the caller's own tags: accepted, unused
    store: bool | None = None
    modalities: list[Literal["text"]] | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def check_chat(self) -> ChatRequest:
        return _unimplemented(self, store=False, reasoning_effort="", service_tier="auto")


class EmbeddingRequest(_Strict):
    input: Text | list[Text] | list[int] | list[list[int]]
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(p, int) for p in self.input):
            return [self.input]  # type: ignore[list-item]
        return self.input  # type: ignore[return-value]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's rows and how its answer is shaped."""

    prompts: list[list[int]]
    req: _Request
    max_tokens: int
    stop: list[str]
    stop_ids: Sequence[int]
    chat: bool
    constraint: str | None = None  # a compiled grammar every row follows
    tools: list[dict[str, Any]] = field(default_factory=list)  # the tools a chat answer may call
    logprobs: int | None = None
    hits: list[Any] = field(default_factory=list)  # passages retrieved into the prompt (serve --index)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.req.n


class Server:
    """The model, its tokenizer, the scheduler and the admission of requests; the FastAPI app is built around one."""

    def __init__(self, llm: LLM, model_name: str, max_concurrency: int = 32, max_prompt_chars: int = 100_000,
                 max_rows: int = 64, max_queued: int = 256, prefill_chunk: int = 256, rails: Any = None,
                 index: Any = None, index_k: int = 4) -> None:
        self.llm = llm
        self.rails = rails  # gptlab.guardrails.Guardrails: input rails before generating, output rails after
        self.index, self.index_k = index, index_k  # gptlab.rag.Index: passages retrieved before each chat answer
        self.model_name = model_name
        self.max_rows = max_rows  # prompts x n of one request: the rows of its batch
        self.max_queued = max_queued  # completions (rows) one client may have running or waiting
        self.queued: dict[str, int] = {}
        self.scheduler = Scheduler(llm.model, slots=max_concurrency, prefill_chunk=prefill_chunk,
                                   context=llm.engine.context)
        tok = llm.tokenizer
        self.grammars = Grammars(tok, llm.model.config.vocab_size, dict.fromkeys([*tok.stop_ids, *tok.chat_stop_ids]))
        self.max_prompt_chars = max_prompt_chars
        self.created = int(time.time())

    @property
    def abandoned(self) -> int:
        """Rows stopped early because their client went away."""
        return self.scheduler.abandoned

    # -- admission ---------------------------------------------------------------------------------------------
    def check_request(self, req: _Request | EmbeddingRequest, prompts: int) -> None:
        """The model it names, and the size of its batch: a request is refused before it costs anything."""
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.model_name}`.",
                           "model", "model_not_found")
        n = getattr(req, "n", 1)
        if prompts * n > self.max_rows:
            raise APIError(400, f"{prompts} prompt(s) x n {n} = {prompts * n} completions; this server takes "
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
    def encode_prompts(self, prompts: Sequence[str] | Sequence[list[int]], max_tokens: int,
                       param: str = "prompt") -> list[list[int]]:
        """Token ids of the prompts (a BOS first where the model's tokenizer adds one; ids as given), after checking
        each against the size limit, the vocabulary and the context."""
        out = []
        vocab = self.llm.model.config.vocab_size
        for p in prompts:
            if len(p) > self.max_prompt_chars:
                raise APIError(400, f"the {param} has {len(p)} characters; this server takes at most "
                                    f"{self.max_prompt_chars}", param, "prompt_too_long")
            if not isinstance(p, str) and any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"the {param} has token ids outside the vocabulary [0, {vocab})", param)
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

    def encode_chat(self, req: ChatRequest) -> list[int]:
        """The conversation through the model's chat template (gptlab's own for a model without one), with the
        tools offered as the template shows them."""
        turns = [m.text() for m in req.messages]
        if sum(len(m["content"]) for m in turns) > self.max_prompt_chars:
            raise APIError(400, f"the messages have more than {self.max_prompt_chars} characters", "messages",
                           "prompt_too_long")
        template = self.llm.tokenizer.chat_template
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        if tools or any("tool_calls" in m for m in turns):
            turns = prompt_messages(turns, tools, template)
        return self.llm.tokenizer.encode_chat(turns, add_generation_prompt=True,
                                              tools=tools if tools and renders_tools(template) else None)

    def chat_constraint(self, req: ChatRequest) -> tuple[str | None, list[dict[str, Any]]]:
        """The grammar a chat answer follows (its response_format, or its tool calls) and the tools it may call."""
        choice = req.tool_choice
        if choice is not None and choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools: this request offers none", "tool_choice")
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        fmt = req.response_format
        structured = fmt is not None and fmt.type != "text"
        if tools and choice != "none":
            if structured:
                raise APIError(400, "response_format cannot be combined with tools (use tool_choice \"none\")",
                               "response_format")
            mode = choice if isinstance(choice, str) and choice else "auto"
            if isinstance(choice, NamedTool):
                tools = [t for t in tools if t["function"]["name"] == choice.function.name]
                if not tools:
                    raise APIError(400, f"tool_choice names `{choice.function.name}`, which is not among the tools",
                                   "tool_choice")
                mode = "required"
            grammar = call_grammar(tools, call_format(self.llm.tokenizer.chat_template), mode, self.llm.tokenizer,
                                   parallel=req.parallel_tool_calls)
            return self.checked(grammar, "tools"), tools
        if not structured:
            return None, []
        if fmt.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        elif fmt.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs its json_schema", "response_format")
        else:
            schema = fmt.json_schema.schema_
        try:
            return self.checked(json_schema_grammar(schema), "response_format"), []
        except GptlabError as e:
            raise APIError(400, f"response_format: {e}", "response_format") from None

    def checked(self, grammar: str, param: str) -> str:
        try:
            self.grammars.check(grammar)
        except GptlabError as e:
            raise APIError(400, f"{param}: {e}", param) from None
        return grammar

    # -- generation ---------------------------------------------------------------------------------------------
    def rows(self, job: Job, on_piece: Callable[[Row, str], None], on_done: Callable[[Row], None]) -> list[Row]:
        """A row per choice (choice i*n+j is prompt i's j-th), each with its own generator: choice j of a seeded
        request draws from seed + j, so that it samples the same whoever shares its batch."""
        req = job.req
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p if req.top_p < 1 else None)
        rows = []
        for i, p in enumerate(job.prompts):
            for j in range(req.n):
                row = Row(p, params, job.max_tokens, TextStream(self.llm.tokenizer, job.stop, job.stop_ids),
                          on_piece, on_done, seed=None if req.seed is None else req.seed + j,
                          logprobs=job.logprobs,
                          constraint=self.grammars.constraint(job.constraint) if job.constraint else None,
                          index=i * req.n + j)
                rows.append(row)
        return rows

    def token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        """A token as OpenAI's logprobs show it: its text (or its bytes where they are not whole characters)."""
        raw = self.token_bytes(token)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\\\x{b:02x}" for b in raw)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def token_bytes(self, token: int) -> bytes:
        if self.llm.tokenizer.added.get(token) is not None:  # a special or added token: its text
            return self.llm.tokenizer.decode([token]).encode()
        try:
            return bytes(self.grammars.ll_tokenizer.decode_bytes([token]))
        except GptlabError:
            return self.llm.tokenizer.decode([token]).encode()

    # -- embeddings ----------------------------------------------------------------------------------------------
    def embed(self, ids: Sequence[list[int]]) -> list[list[float]]:
        """`LLM.embed`: mean-pooled last hidden states, unit length as OpenAI's embeddings are. Runs in the engine
        thread."""
        return self.llm.embed(ids).tolist()


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
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        # of a union's alternatives, the one whose own check failed says most (a lone surrogate in a text)
        first = next((x for x in errors if x.get("type") in ("value_error", "extra_forbidden")),
                     errors[0] if errors else {})
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x)]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        msg = str(first.get("msg", "invalid request")).replace("Value error, ", "")
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            msg = f"`{param}` is not a parameter this server implements"
        elif param is None and (named := re.match(r"`([\w.]+)`", msg)):  # a check of the whole request
            param = named.group(1)
        else:
            msg = f"{param or 'body'}: {msg}"
        return JSONResponse(APIError(400, msg, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(GptlabError)
    async def user_error(_: Request, e: GptlabError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    def check_key(inner):
        """A plain ASGI layer (starlette's BaseHTTPMiddleware would hide a client's disconnect from the handlers)."""
        async def app_with_key(scope, receive, send):
            if api_key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
                sent = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                if sent != f"Bearer {api_key}":
                    err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                    return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
            await inner(scope, receive, send)
        return app_with_key

    app.add_middleware(check_key)

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
        if server.rails is not None:
            texts = [p if isinstance(p, str) else server.llm.tokenizer.decode(p) for p in prompts]
            checked, refusal = await input_rail(texts)
            if refusal is not None:
                return refused(req, False, refusal.text)
            prompts = [c if c != t or isinstance(p, str) else p for c, t, p in zip(checked, texts, prompts)]
        ids = server.encode_prompts(prompts, max_tokens)
        job = Job(ids, req, max_tokens, req.stops(), server.llm.tokenizer.stop_ids, chat=False, logprobs=req.logprobs)
        return await respond(job, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        tok = server.llm.tokenizer
        server.check_request(req, 1)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        grammar, tools = server.chat_constraint(req)
        if server.rails is not None:
            users = [i for i, m in enumerate(req.messages) if m.role == "user"]
            if users:  # the user's last message: what this turn asks
                text = req.messages[users[-1]].text()["content"]
                (checked,), refusal = await input_rail([text])
                if refusal is not None:
                    return refused(req, True, refusal.text)
                if checked != text:
                    req.messages[users[-1]] = Message(role="user", content=checked)
        hits = await retrieve(req)
        ids = server.encode_chat(req)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, server.llm.engine.context - len(ids))
        server.check_length(ids, max_tokens)
        job = Job([ids], req, max_tokens, req.stops() + tok.chat_stop_strings, tok.chat_stop_ids, chat=True,
                  constraint=grammar, tools=tools, logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                  hits=hits)
        return await respond(job, request)

    async def retrieve(req: ChatRequest) -> list[Any]:
        """With an index: passages for the user's last message, numbered into it as `gptlab ask` numbers them."""
        users = [i for i, m in enumerate(req.messages) if m.role == "user"]
        if server.index is None or not users:
            return []
        from gptlab.rag.answer import DEFAULT_TEMPLATE, fit, render

        question = req.messages[users[-1]].text()["content"]
        dense = server.index.vectors is not None
        found = await in_engine(lambda: server.index.search(question, server.index_k), model=dense)
        room = req.max_completion_tokens or req.max_tokens or server.llm.engine.context // 2
        hits = fit(server.llm, DEFAULT_TEMPLATE, question, found, True, room)
        req.messages[users[-1]] = Message(role="user", content=render(DEFAULT_TEMPLATE, question, hits))
        return hits

    def sources(job: Job, text: str) -> dict[str, Any]:
        """The passages a retrieval-augmented answer read and those it cites, beside OpenAI's fields."""
        if not job.hits:
            return {}
        from gptlab.rag.answer import citations

        cited = citations(text, len(job.hits))
        return {"sources": [{"n": n, **job.hits[n - 1].to_json()} for n in cited],
                "retrieved": [{"n": n, **h.to_json()} for n, h in enumerate(job.hits, 1)]}

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        inputs = req.inputs()
        if not inputs or any(not p for p in inputs):
            raise APIError(400, "input must not be empty", "input")
        server.check_request(req, len(inputs))
        if req.dimensions is not None and req.dimensions != server.llm.model.config.n_embd:
            raise APIError(400, f"this model's embeddings have {server.llm.model.config.n_embd} dimensions; "
                                "`dimensions` cannot change that", "dimensions")
        ids = server.encode_prompts(inputs, 0, param="input")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or (future.set_exception(error) if error else
                                                                 future.set_result(result)))

        server.scheduler.call(lambda: server.embed(ids), done)
        vectors = await future
        data = []
        for i, v in enumerate(vectors):
            value: Any = v
            if req.encoding_format == "base64":
                value = base64.b64encode(torch.tensor(v, dtype=torch.float32).numpy().tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(p) for p in ids)
        return {"object": "list", "data": data, "model": server.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def in_engine(fn: Callable[[], Any], model: bool | None = None) -> Any:
        """`fn()` where the model runs: in the engine thread when it runs a model (a rail's judge, a dense search),
        so that no two forwards overlap and the event loop never waits on one; else here."""
        if model is None:
            model = server.rails is not None and server.rails.judge is not None
        if not model:
            return fn()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or (future.set_exception(error) if error else
                                                                 future.set_result(result)))

        server.scheduler.call(fn, done)
        return await future

    async def input_rail(texts: list[str]) -> tuple[list[str], Any]:
        """The texts after the input rails (redacted where a rule rewrote them), and the first refusal, if any."""
        out = []
        for text in texts:
            d = await in_engine(lambda t=text: server.rails.check_input(t))
            if not d.allowed:
                return texts, d
            out.append(d.text)
        return out, None

    def refused(req: _Request, chat: bool, text: str) -> Any:
        """A request the input rails block: OpenAI's shape for a refusal, finish_reason "content_filter"."""
        n = req.n * (len(req.prompts()) if isinstance(req, CompletionRequest) else 1)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": None, "refusal": text},
                        "finish_reason": "content_filter", "logprobs": None} for i in range(n)]
        else:
            choices = [{"index": i, "text": text, "finish_reason": "content_filter", "logprobs": None}
                       for i in range(n)]
        body = {**_base(chat), "choices": choices, "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                            "total_tokens": 0}}
        if not req.stream:
            return body

        async def events() -> AsyncIterator[str]:
            kind = "chat.completion.chunk" if chat else "text_completion"
            for c in choices:
                delta = {"delta": {"role": "assistant", "refusal": text}} if chat else {"text": text}
                yield _sse({**body, "object": kind, "choices": [{"index": c["index"], **delta, "logprobs": None,
                                                                 "finish_reason": "content_filter"}]})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def _client(request: Request) -> str:
        """Who a request counts against: its API key where one is sent, else its address."""
        return request.headers.get("authorization") or (request.client.host if request.client else "?")

    async def respond(job: Job, request: Request):
        release = server.admit(_client(request), job.rows)
        if job.req.stream:  # released when the stream ends, or when its response does
            return StreamingResponse(stream(job, release), media_type="text/event-stream",
                                     background=BackgroundTask(release))
        try:
            return await complete(job, request)
        finally:
            release()

    def _base(chat: bool) -> dict[str, Any]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": server.model_name}

    def start(job: Job) -> tuple[asyncio.Queue, list[Row]]:
        """Submit the job's rows; their pieces and ends arrive on the queue as ("piece", row, text) / ("done", row).
        Setting a row's `cancelled` drops it at the next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = server.rows(job, lambda r, p: loop.call_soon_threadsafe(events.put_nowait, ("piece", r, p)),
                           lambda r: loop.call_soon_threadsafe(events.put_nowait, ("done", r, None)))
        server.scheduler.submit(rows)
        return events, rows

    def stop(rows: Sequence[Row]) -> None:
        for r in rows:
            r.cancelled.set()

    def usage(job: Job, rows: Sequence[Row]) -> dict[str, int]:
        prompt_tokens = sum(max(1, len(p)) for p in job.prompts) * job.req.n
        completion_tokens = sum(r.generated for r in rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def logprobs(job: Job, row: Row) -> dict[str, Any] | None:
        """The row's logprobs in the shape of its API: the model's own log-softmax (before temperature, top-p and
        grammar masks), for every token of the text (not the end-of-text token that ended it)."""
        if job.logprobs is None:
            return None
        entries = row.token_logprobs[: len(row.text.token_ids) - (row.text.token_ids[-1:] != [] and
                                                                  row.text.token_ids[-1] in row.text.stop_ids)]
        if job.chat:
            return {"content": [{**server.token_entry(t, lp), "top_logprobs": [server.token_entry(a, alp)
                                                                               for a, alp in top]}
                                for t, lp, top in entries], "refusal": None}
        tokens = [server.token_entry(t, lp) for t, lp, _ in entries]
        offsets, at = [], 0
        for e in tokens:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in tokens], "token_logprobs": [e["logprob"] for e in tokens],
                "top_logprobs": [{server.token_entry(a, alp)["token"]: alp for a, alp in top} for _, _, top in entries]
                if job.logprobs else None, "text_offset": offsets}

    def message(job: Job, row: Row) -> tuple[dict[str, Any], str]:
        """A chat choice's message and finish reason: text, or tool calls read from it."""
        finish = row.text.finish_reason
        if job.tools:
            content, calls = parse_calls(row.text.text, call_format(server.llm.tokenizer.chat_template), job.tools)
            if calls:  # cut off by the token limit after whole calls: they stand, and it says "length"
                return {"role": "assistant", "content": content, "tool_calls": calls}, \
                    "tool_calls" if finish == "stop" else finish
        return {"role": "assistant", "content": row.text.text}, finish

    async def complete(job: Job, request: Request) -> dict[str, Any]:
        events, rows = start(job)
        left, checked = len(rows), time.monotonic()
        try:
            while left:
                try:
                    kind, row, _ = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    kind = row = None
                if time.monotonic() - checked > 0.25:  # nobody waits for the answer any more: stop generating it
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the connection")
                if kind == "done":
                    left -= 1
                    if row.error:
                        raise APIError(500, f"generation failed: {row.error}", kind="server_error")
        finally:
            stop(rows)
        choices = []
        for row in rows:
            choice: dict[str, Any] = {"index": row.index, "logprobs": logprobs(job, row)}
            if server.rails is not None:  # the output rails: redacted text, or the refusal
                d = await in_engine(lambda r=row: server.rails.check_output(r.text.text))
                if not d.allowed:
                    choice["finish_reason"] = "content_filter"
                    if job.chat:
                        choice["message"] = {"role": "assistant", "content": None, "refusal": d.text}
                    else:
                        choice["text"] = d.text
                    choices.append(choice)
                    continue
                row.text.text = d.text
            if job.chat:
                choice["message"], choice["finish_reason"] = message(job, row)
            else:
                choice.update(text=row.text.text, finish_reason=row.text.finish_reason)
            choices.append(choice)
        return {**_base(job.chat), "choices": choices, "usage": usage(job, rows), **sources(job, rows[0].text.text)}

    async def stream(job: Job, release: Callable[[], None]) -> AsyncIterator[str]:
        chat = job.chat
        base = {**_base(chat), "object": "chat.completion.chunk" if chat else "text_completion"}
        include_usage = job.req.stream_options is not None and job.req.stream_options.include_usage
        held = bool(job.tools)  # a chat answer that may be a tool call is sent whole, once it is read

        def chunk(row: Row | int, delta: dict[str, Any] | str | None, finish: str | None,
                  lp: dict[str, Any] | None = None) -> dict[str, Any]:
            index = row if isinstance(row, int) else row.index
            if chat:
                payload = {"index": index, "delta": delta or {}, "finish_reason": finish}
                if lp is not None:
                    payload["logprobs"] = lp
            else:
                payload = {"index": index, "text": delta or "", "logprobs": lp, "finish_reason": finish}
            return {**base, "choices": [payload], **({"usage": None} if include_usage else {})}

        events, rows = start(job)
        sent = {id(r): 0 for r in rows}  # logprob entries already sent
        rails = {id(r): server.rails.stream() for r in rows} if server.rails is not None else {}
        ended: set[int] = set()  # rows the output rails ended early

        def new_logprobs(row: Row) -> dict[str, Any] | None:
            if job.logprobs is None:
                return None
            whole = logprobs(job, row)
            n, sent[id(row)] = sent[id(row)], len(whole["content" if chat else "tokens"])
            if chat:
                return {"content": whole["content"][n:], "refusal": None}
            return {k: v[n:] if isinstance(v, list) else v for k, v in whole.items()}

        try:
            if chat:
                for i in range(len(rows)):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}, None))
            left = len(rows)
            while left:
                kind, row, piece = await events.get()
                if id(row) in ended:
                    continue
                rail = rails.get(id(row))
                if kind == "piece":
                    if rail is not None:
                        piece = rail.push(piece)
                    if not held and piece:
                        yield _sse(chunk(row, {"content": piece} if chat else piece, None, new_logprobs(row)))
                    if rail is not None and rail.finished:  # blocked, or cut at the length limit: it ends here
                        row.cancelled.set()
                        ended.add(id(row))
                        left -= 1
                        blocked = not rail.decision.allowed
                        if blocked:
                            yield _sse(chunk(row, {"refusal": rail.decision.text} if chat else "", None))
                        yield _sse(chunk(row, {} if chat else "", "content_filter" if blocked else "length"))
                    continue
                left -= 1
                if row.error:
                    yield _sse(APIError(500, f"generation failed: {row.error}", kind="server_error").body())
                    return
                if rail is not None:
                    tail = await in_engine(rail.close)
                    if not rail.decision.allowed:
                        yield _sse(chunk(row, {"refusal": rail.decision.text} if chat else "", None))
                        yield _sse(chunk(row, {} if chat else "", "content_filter"))
                        continue
                    row.text.text = rail.sent
                    if tail and not held:
                        yield _sse(chunk(row, {"content": tail} if chat else tail, None))
                finish = row.text.finish_reason
                if held:
                    msg, finish = message(job, row)
                    delta = {k: v for k, v in msg.items() if k != "role" and v is not None}
                    for i, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = i
                    yield _sse(chunk(row, delta, None, new_logprobs(row)))
                elif job.logprobs is not None and (lp := new_logprobs(row)) and \
                        lp.get("content" if chat else "tokens"):
                    yield _sse(chunk(row, {} if chat else "", None, lp))
                yield _sse({**chunk(row, {} if chat else "", finish), **sources(job, row.text.text)})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage(job, rows)})
            yield _sse("[DONE]")
        finally:
            stop(rows)  # a client that went away frees its rows' slots at the next step
            release()

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 32, device: str | None = None, dtype: str | None = None, max_rows: int = 64,
          max_queued: int = 256, max_prompt_chars: int = 100_000, prefill_chunk: int = 256,
          guardrails: str | None = None, index: str | None = None, index_k: int = 4) -> None:
    """Load a checkpoint and serve it until interrupted (with the rails of a guardrails policy file, if given)."""
    import sys

    import uvicorn

    from gptlab.api import load

    if host not in LOOPBACK and not api_key:
        print(f"gptlab: warning: serving on {host} without --api-key: anyone who can reach this address can use the "
              "model", file=sys.stderr)
    llm = load(checkpoint, device=device, dtype=dtype)
    llm.tokenizer.check_chat_template()  # a template that does not render is a start-up error, not a 400 per request
    rails = None
    if guardrails:
        from gptlab.guardrails import Guardrails

        rails = Guardrails.load(guardrails, llm=llm)  # a policy with a mistake stops the server before it starts
    retrieval = None
    if index:
        from gptlab.rag import Index

        retrieval = Index.load(index, device=device)
        if retrieval.vectors is not None:  # the served model embeds too where it built the index's vectors
            encoder = retrieval.manifest["dense"]["path"]
            same = dtype is None and Path(encoder).resolve() == Path(checkpoint).resolve()
            retrieval.use_encoder(encoder, llm=llm if same else None)
    server = Server(llm, Path(checkpoint).resolve().name, max_concurrency=max_concurrency,
                    max_prompt_chars=max_prompt_chars, max_rows=max_rows, max_queued=max_queued,
                    prefill_chunk=prefill_chunk, rails=rails, index=retrieval, index_k=index_k)
    uvicorn.run(create_app(server, api_key), host=host, port=port, log_level="info")
