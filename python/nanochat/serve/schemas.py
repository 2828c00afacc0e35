"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Notable choices:
- Scalars are strict (``"5"`` is not an integer, ``true`` is not a number), as OpenAI's API is; unknown fields are
  ignored so clients that send ``user`` or penalties of 0 keep working.
- ``logprobs``: chat takes ``logprobs: true`` and ``top_logprobs`` (0-20), completions ``logprobs: N`` (0-5), as
  OpenAI does; the answers carry OpenAI's two logprobs shapes. ``presence_penalty``, ``frequency_penalty`` and
  ``logit_bias`` are applied. ``response_format`` ``json_object`` and ``json_schema`` (chat and completions) are
  constrained decoding: every choice is one complete JSON object (of the schema: the subset
  ``nanochat.engine.constrain.compile_schema`` supports, anything else a 400 naming the keyword). Nothing that would
  change the output is silently ignored: ``tools``, ``functions``, ``best_of`` above 1, ``echo`` and ``suffix`` are
  refused (400).
- Range checks live here (temperature in [0, 2], top_p in (0, 1], max_tokens >= 1, 1 <= n <= 16, at most 4 non-empty
  stop strings); checks that need the model (context length, model name) live in the app.
- Extensions beyond OpenAI's schema, as vLLM names them: ``top_k`` and ``ignore_eos`` (generate through
  end-of-text tokens: for benchmarks).
- Every string is valid Unicode: JSON can carry a lone surrogate (``"\\ud800"``), which no tokenizer (and no UTF-8
  encoder) accepts, so it is a 400 here rather than a 500 deep inside.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

StrictFloat = Annotated[float, Field(strict=True)]  # JSON integers are accepted, strings and booleans are not
_SURROGATE = re.compile("[\ud800-\udfff]")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_N = 16  # choices per request at most


def _valid_unicode(v: str) -> str:
    m = _SURROGATE.search(v)
    if m is not None:
        raise ValueError(
            f"the text holds a lone surrogate (U+{ord(m.group()):04X}) at index {m.start()}, which is not valid "
            "Unicode; send UTF-8 text (a character outside the BMP as one escaped surrogate pair)"
        )
    return v


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]  # a string that is valid Unicode


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: StrictBool = False  # send a last chunk with `usage` (and no choices) before [DONE]


class SamplingRequest(_Request):
    """Fields shared by chat completions and completions."""

    model: Text | None = None  # must name the served model when given
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None  # 0 = greedy
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # extension; 0 = off
    stop: Text | list[Text] | None = None
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1  # choices (the server also caps it at --max-concurrent)
    ignore_eos: StrictBool = False  # extension
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    # token id (as a decimal string, as OpenAI has it) -> bias added to its logit
    logit_bias: (
        Annotated[dict[StrictStr, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] | None
    ) = None
    # {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _formats(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = None if v is None else v.get("type")
        if v is None or kind in ("text", "json_object"):
            return v
        if kind == "json_schema":
            schema_program(v)  # raises ValueError (SchemaError) naming what is not supported
            return v
        raise ValueError(
            f"response_format type {str(kind)[:40]!r} is not supported: use 'text', 'json_object' or 'json_schema'"
        )

    def json_object(self) -> bool:
        """Constrained decoding asked for: the reply must be one JSON object (of a schema, with json_schema)."""
        return self.response_format is not None and self.response_format.get("type") in ("json_object", "json_schema")

    def json_schema(self) -> tuple[bytes | str, ...] | None:
        """The compiled schema of a ``json_schema`` response format (``nanochat.engine.constrain.compile_schema``)."""
        rf = self.response_format
        return schema_program(rf) if rf is not None and rf.get("type") == "json_schema" else None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (decimal integers), got {key[:40]!r}")
        return v

    def logit_bias_items(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items() if b)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def schema_program(response_format: dict[str, Any]) -> tuple[bytes | str, ...]:
    """OpenAI's ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``, compiled;
    ``ValueError`` for a shape or a schema outside the supported subset."""
    from nanochat.engine.constrain import compile_schema  # imported only when a schema is asked for

    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    try:
        return compile_schema(spec["schema"], "json_schema.schema")
    except ValueError as e:
        raise ValueError(
            f"{e}. Supported: type object with properties of type string, number, integer, boolean, null or such "
            "objects, and required; or use {'type': 'json_object'}"
        ) from None


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role  # OpenAI's newer name for system


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool = False  # each content token's log-probability
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None  # and this many most likely alternatives
    # accepted only to refuse clearly: silence would mislead a client into trusting output these never shaped
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool and function calling is not supported: this model has no tool-call format")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none"):
            raise ValueError("tool and function calling is not supported: this model has no tool-call format")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: Any) -> int | None:
        if v is not None and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_k(self) -> int | None:
        """``None``: no logprobs; ``k``: the sampled token's and the ``k`` most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    # a string, a list holding one string, or a non-empty list of token ids
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
    )
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None  # the sampled token's and N most likely tokens'
    suffix: Text | None = None  # refused unless empty: insertion is not served here
    best_of: StrictInt | None = None  # refused unless 1

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported: send the text before the insertion point as the prompt")
        return v

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of = 1 is supported")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is an empty list: send a string, a list holding one string, or token ids")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Request):
    """llama-server's ``POST /tokenize``."""

    content: Text
    add_special: StrictBool = False  # start with <|bos|>
    parse_special: StrictBool = True  # special-token text (``<|end|>``) becomes the special token
    with_pieces: StrictBool = False  # each id with its text


class InfillChunk(_Request):
    """A piece of context for ``/infill`` (llama.vim sends the lines around the cursor, other buffers, yanks)."""

    filename: Text = "tmp"
    text: Text


class InfillRequest(_Request):
    """llama-server's ``POST /infill``: fill the middle between ``input_prefix`` and ``input_suffix``.

    The prompt is PSM, as the model was trained (:mod:`nanochat.data.fim`): ``<|bos|>`` then each ``input_extra``
    chunk (as llama-server writes them for a model without repository tokens), ``<|fim_prefix|>`` prefix
    ``<|fim_suffix|>`` suffix ``<|fim_middle|>`` ``prompt`` (text already typed after the cursor's prefix).
    llama-server's defaults: ``temperature`` 0.8, ``top_k`` 40, ``top_p`` 0.95, ``n_predict`` -1 (until the context
    is full, here at most ``--max-tokens-limit``). Fields of other llama-server samplers (``samplers``,
    ``n_indent``, ``t_max_*``, ``response_fields``) are accepted and ignored; ``cache_prompt`` is always on.
    """

    model: Text | None = None
    input_prefix: Text = ""
    input_suffix: Text = ""
    input_extra: Annotated[list[InfillChunk], Field(max_length=256)] = []
    prompt: Text = ""
    n_predict: Annotated[StrictInt, Field(ge=-1)] = -1
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] = 0.8
    top_k: Annotated[StrictInt, Field(ge=0)] = 40
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 0.95
    seed: Annotated[StrictInt, Field(ge=-1, le=INT64_MAX)] = -1  # -1: a random seed
    stop: Annotated[list[Text], Field(max_length=16)] = []
    stream: StrictBool = False
    cache_prompt: StrictBool = True

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class InfillTimings(BaseModel):
    prompt_n: int  # prompt tokens
    predicted_n: int  # generated tokens
    prompt_ms: float  # request start -> first token
    predicted_ms: float  # first token -> last


class InfillResponse(BaseModel):
    """llama-server's answer (and, with ``stop: false`` and only ``content``, each streamed event)."""

    content: str
    stop: bool = True
    model: str
    tokens_predicted: int
    tokens_evaluated: int  # prompt tokens
    tokens_cached: int = 0  # prompt tokens reused from the prompt cache (llama-server's cache_prompt)
    truncated: bool  # the prefix, suffix or extra context was cut to fit the context
    stop_type: Literal["eos", "limit", "word"]  # a stop token, n_predict (or the context), a stop string
    timings: InfillTimings


class DetokenizeRequest(_Request):
    """llama-server's ``POST /detokenize``."""

    tokens: list[StrictInt]


# --------------------------------------------------------------------------- responses


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]  # the token's text, or its bytes when they are not valid UTF-8 on their own


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResponse(BaseModel):
    content: str


class TopLogprob(BaseModel):
    token: str  # the token's text ("" for a special token; U+FFFD for part of a character: see bytes)
    logprob: float  # natural log of its probability under the model (raw logits); -9999.0 for probability 0
    bytes: list[int] | None  # the token's exact UTF-8 bytes


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at this position, most likely first


class ChoiceLogprobs(BaseModel):
    """Chat: one entry per generated content token (a streamed chunk carries the entries of its own tokens)."""

    content: list[TokenLogprobEntry] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """Completions (the legacy shape): parallel lists, one item per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # token text -> logprob, the N most likely
    text_offset: list[int]  # where each token's text starts in the completion


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache (not prefilled again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A completion, and (with ``finish_reason`` null until the last) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


ModelKind = Literal["base", "chat"]  # what the weights were trained for: continuing text, or answering a chat


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"
    context_length: int  # extension: what max_tokens + prompt must fit in
    max_completion_tokens: int  # extension: the largest max_tokens this server accepts
    kind: ModelKind  # extension: "base" continues text (use completions), "chat" was trained on conversations


class GenerationDefaults(BaseModel):
    n_ctx: int  # the context length, where llama-server's clients read it


class Props(BaseModel):
    """``GET /props``, as llama-server answers it (the fields a client reads to learn what is loaded), plus
    ``model_kind``: whether chat replies mean anything (``nanochat.serve.backend.model_kind``)."""

    model: str  # the model id of /v1/models
    model_kind: ModelKind  # "base": completions only make sense; "chat": trained on conversations
    chat_template: str  # what /v1/chat/completions renders ("" when the model has none: chat is refused)
    has_chat_template: bool
    context_length: int
    max_completion_tokens: int  # the largest max_tokens this server accepts
    default_generation_settings: GenerationDefaults
    total_slots: int  # generations that run at once
    fim: bool  # whether /infill can serve this model (it has fill-in-the-middle tokens)
    build_info: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_json(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code)).model_dump()
