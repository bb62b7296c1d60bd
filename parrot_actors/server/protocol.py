"""Every message of the service's wire protocol, as msgspec structs (JSON on the wire).

Requests forbid unknown fields, so a typo is a 400 that names the field instead of a silently
ignored setting. Responses accept unknown fields when decoded (newer servers may add some).
Two APIs share the port: the Parrot API (sessions, calls, variables; see `parrot_api`) and the
OpenAI-compatible API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MAX_TOKENS_LIMIT = 1 << 16
"""Largest `max_tokens` a request may ask for (tokens); engines cut earlier at their length."""

VarId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]
"""A variable id: 1-128 characters of letters, digits and `_ . : -`; chosen by the client
(the Python client sends its local `Variable.id`) or by the server."""
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Stop = str | Annotated[list[str], Meta(max_length=16)]


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are an error."""


class Response(msgspec.Struct, kw_only=True):
    """Base of response bodies."""


# ---- errors -----------------------------------------------------------------------------------


class ErrorBody(Response, kw_only=True):
    """An error: the exception class name, its message, and the error that caused it."""

    type: str
    message: str
    cause: ErrorBody | None = None


class ErrorResponse(Response, kw_only=True):
    """The body of every 4xx/5xx answer."""

    error: ErrorBody


# ---- the Parrot API ---------------------------------------------------------------------------


class CreateSession(Request, kw_only=True):
    """POST /v1/sessions. ttl_s: seconds of inactivity after which the session ends and its
    variables and contexts are freed (the server caps it; default from its config)."""

    ttl_s: Annotated[float, Meta(gt=0.0)] | None = None


class SessionCreated(Response, kw_only=True):
    """A new session: send `token` as `Authorization: Bearer <token>` on every other call."""

    session_id: str
    token: str
    ttl_s: float
    max_pending_calls: int


class SessionClosed(Response, kw_only=True):
    """DELETE /v1/session: calls cancelled and variables freed with the session."""

    session_id: str
    cancelled_calls: int
    freed_variables: int


class Sampling(Request, kw_only=True):
    """Sampling of one output (all optional; unset fields take the engine defaults). Values
    are checked as the engines check them (`SamplingParams.validate`), so the errors read the
    same as embedded.

    max_tokens: tokens at most. temperature: 0 = greedy. top_p in (0, 1]. top_k: 0 = all.
    stop: strings that end the output. seed: per-call seed. ignore_eos: keep going past EOS.
    At most one constraint (constrained decoding, `messages.Grammar`): json_schema (a JSON
    Schema as JSON text), regex, choices (1 to 1024 strings); one that does not compile is a
    400 naming it.
    """

    max_tokens: MaxTokens | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    ignore_eos: bool | None = None
    json_schema: str | None = None
    regex: str | None = None
    choices: list[str] | None = None


class Arg(Request, kw_only=True):
    """The binding of one template parameter.

    var: a variable id of this session (an input to read, or the output to produce; an output
    id the session does not hold yet is created). value: literal text (an input that is not a
    variable, or a plain parameter rendered verbatim). sampling: for outputs only.
    """

    var: VarId | None = None
    value: str | None = None
    sampling: Sampling | None = None


class NewVariable(Request, kw_only=True):
    """A variable to create before the call runs (a client-side `pa.Variable` that this call is
    the first to use): its id, optional name, and its value if it already has one."""

    id: VarId
    name: Name | None = None
    value: str | None = None


class SubmitCall(Request, kw_only=True):
    """POST /v1/calls: one semantic call.

    template: prompt text with `{{input:x}}`, `{{output:y}}` and plain `{{z}}` placeholders
    (a plain one is an input if its arg has `var`, an output if it has `sampling`, else a
    parameter rendered verbatim); text after the last output is dropped. args: one `Arg` per
    placeholder name. name: the function name (used in error messages). model: the model the
    call needs (None = any engine). chat: wrap the prompt before the first output as one user
    message of the model's chat template. sampling: defaults for every output. variables:
    variables to create first (so the submission that first uses them carries them inline).
    """

    template: str
    args: dict[str, Arg] = {}
    name: Name = "call"
    model: str | None = None
    chat: bool = False
    sampling: Sampling | None = None
    variables: Annotated[list[NewVariable], Meta(max_length=4096)] = []


class CallAccepted(Response, kw_only=True):
    """The call is in the graph; `outputs` maps each output parameter to its variable id."""

    call_id: int
    outputs: dict[str, str]


MAX_BATCH_CALLS = 256
"""Most calls one POST /v1/calls/batch may carry."""


class SubmitCalls(Request, kw_only=True):
    """POST /v1/calls/batch: 1-256 calls in one request, taken in order, each exactly as POST
    /v1/calls would take it (a later call may use variables an earlier one creates or
    produces). One round trip for a whole graph instead of one per call."""

    calls: Annotated[list[SubmitCall], Meta(min_length=1, max_length=MAX_BATCH_CALLS)]


class CallsAccepted(Response, kw_only=True):
    """The answer to a batch: `accepted` holds the calls taken, in order. `error` is None when
    all were (201); else (207) it says why call number `len(accepted)` was refused, and the
    calls after it were not tried (resend them)."""

    accepted: list[CallAccepted]
    error: ErrorBody | None = None


class CallEvents(Response, kw_only=True):
    """GET /v1/events: the scheduler's latest events for the session's own calls, in order:
    (event, call id, detail) with event "ready", "dispatch" (detail: the engine), "retry"
    (detail: the engine that died under it), "resolved" (detail: the output), "done" or
    "failed". The scheduler keeps a bounded ring of events, so old ones drop out."""

    events: list[tuple[str, int, str]]


class CreateVariable(Request, kw_only=True):
    """POST /v1/variables: a variable with an optional id (else the server picks one), name and
    value (else it is pending until set)."""

    id: VarId | None = None
    name: Name | None = None
    value: str | None = None


class SetVariable(Request, kw_only=True):
    """PUT /v1/variables/{id}: give a pending variable with no producer its value."""

    value: str


class VariableState(Response, kw_only=True):
    """A variable: state "pending", "done" (with `value`) or "failed" (with `error`).

    resolved: values of variables upstream of this one that resolved and that this session has
    not been sent yet (so the client's intermediate variables get their values without extra
    requests).
    """

    id: str
    name: str
    state: str
    value: str | None = None
    error: ErrorBody | None = None
    resolved: dict[str, str] = {}


class CancelResult(Response, kw_only=True):
    """POST /v1/variables/{id}/cancel: False if the variable had already resolved."""

    id: str
    cancelled: bool


class TokenEvent(Response, kw_only=True):
    """One SSE `token` event of GET /v1/variables/{id}/stream: text the output grew by."""

    text: str


class Health(Response, kw_only=True):
    """GET /health: status "ok" (200) when every engine is up, else "degraded" (some down) or
    "down" (all down), answered with 503; engine count, live sessions, served models, and
    `unhealthy`: engine name -> its last error, for each engine that is down."""

    status: str
    engines: int
    sessions: int
    models: list[str]
    unhealthy: dict[str, str] = {}


class Version(Response, kw_only=True):
    """GET /version: the server's name and version, shaped like vLLM's `{"version": ...}`
    answer (SGLang serves the same route), so a benchmark can name the server it measured."""

    version: str
    server: str = "parrot_actors"


class SessionStats(Response, kw_only=True):
    """GET /v1/stats: the session's own counters, nothing about other sessions or engines.

    calls_submitted / calls_completed / calls_failed / calls_pending: its calls by state.
    prompt_tokens / generated_tokens: tokens its finished calls consumed and generated. How
    many of its prompt tokens came from a shared or cached prefix is not reported: that number
    would tell whether another tenant sent the same text (engine-wide counters are on
    /metrics, for operators)."""

    session_id: str
    calls_submitted: int
    calls_completed: int
    calls_failed: int
    calls_pending: int
    prompt_tokens: int
    generated_tokens: int


# ---- the OpenAI-compatible API ----------------------------------------------------------------


class StreamOptions(Request, kw_only=True):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: bool = False


MAX_CHOICES = 16
"""`n` at most (choices sampled from one prompt fill)."""
MAX_RETAIN_S = 3600.0
"""`parrot.retain_s` at most (seconds a session's context is kept between turns)."""


class ParrotHints(Request, kw_only=True):
    """`"parrot": {...}` in an OpenAI request body (the openai client sends it with
    `extra_body={"parrot": {...}}`): what the app knows and the server cannot guess.

    session: the program this request belongs to (an agent's run, a chat): its requests are
    scheduled by the session's attained service, and each turn's context is kept for the next
    (use an unguessable id). objective: "latency" (default) or "throughput". retain_s: how long
    the turn's context is kept for the session's next request (seconds; default 30 with a
    session, 0 disables). All optional; an unknown field is a 400 naming it.
    """

    session: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    objective: Literal["latency", "throughput"] | None = None
    retain_s: Annotated[float, Meta(ge=0.0, le=MAX_RETAIN_S)] | None = None


class _OpenAIRequest(Request, kw_only=True):
    """Fields shared by completions and chat completions. Fields that the service accepts for
    compatibility but does not implement must keep their neutral value (a 400 says so)."""

    model: str
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    parrot: ParrotHints | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_OpenAIRequest, kw_only=True):
    """POST /v1/completions. prompt: text, a list of one text, or a list of token ids."""

    prompt: str | list[str | int]
    max_tokens: MaxTokens | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(Request, kw_only=True):
    """A text part of a message's content (other part types are not supported)."""

    type: Literal["text"]
    text: str


ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
"""A function tool's name: 1-64 letters, digits, `_` and `-` (OpenAI's rule)."""
MAX_TOOLS = 128
"""`tools` at most (OpenAI's limit)."""


class FunctionCall(Request, kw_only=True):
    """A call of a function tool: its name and its arguments as JSON text (OpenAI's shape)."""

    name: ToolName
    arguments: str


class ToolCall(Request, kw_only=True):
    """One tool call of an assistant message (in the history, or in an answer)."""

    id: Annotated[str, Meta(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request, kw_only=True):
    """One chat message. An assistant message may carry the `tool_calls` it made; a "tool"
    message is the result of the call named by `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Meta(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDefinition(Request, kw_only=True):
    """A function tool: `parameters` is the JSON Schema of its arguments (an object; absent:
    no arguments). `strict` is accepted: calls always follow the schema (constrained)."""

    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Request, kw_only=True):
    """One entry of `tools` (function tools only)."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request, kw_only=True):
    """The function of a named `tool_choice`."""

    name: ToolName


class NamedToolChoice(Request, kw_only=True):
    """`tool_choice` naming the one function the answer must call."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Request, kw_only=True):
    """`response_format.json_schema`: a named JSON Schema the answer must validate against
    (`strict` is accepted; the answer always follows the schema, by constrained decoding)."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Request, kw_only=True):
    """`response_format`: "text" (no constraint), "json_object" (any JSON object) or
    "json_schema" (with `json_schema`)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_OpenAIRequest, kw_only=True):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class RenderChatRequest(Request, kw_only=True):
    """POST /v1/parrot/render_chat: conversations (at most 256) to render with `model`'s chat
    template, ready for the assistant's reply (what a chat completion would prompt)."""

    model: str
    conversations: Annotated[
        list[Annotated[list[ChatMessage], Meta(min_length=1)]], Meta(min_length=1, max_length=256)
    ]


class RenderChatResponse(Response, kw_only=True):
    """The served model that rendered them (its name, aliases resolved) and the rendered
    prompt of each conversation, in order."""

    model: str
    prompts: list[str]


class PromptTokensDetails(Response, kw_only=True):
    """cached_tokens: prompt tokens not computed because the session's retained context
    (of its previous turn) already held them."""

    cached_tokens: int


class Usage(Response, kw_only=True):
    """Token counts of one request: prompt tokens (the tokenizer's length of the prompt),
    generated tokens (all choices), and the prompt tokens reused from the session."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(Response, kw_only=True):
    """`logprobs` of a completion choice: per generated token its text, log-probability, the
    most likely alternatives (text -> log-probability) and its offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Response, kw_only=True):
    """One completion choice (`finish_reason` "stop" or "length"; None while streaming)."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(Response, kw_only=True):
    """A text completion, or one chunk of a streamed one (then `usage` is None until the
    last chunk)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(Response, kw_only=True):
    """The generated chat message: its text (None when it only calls tools) and the tool
    calls parsed from it (None without)."""

    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(Response, kw_only=True):
    """One alternative token: its text, UTF-8 bytes and log-probability."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Response, kw_only=True):
    """One generated token of a chat choice, with its most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response, kw_only=True):
    """`logprobs` of a chat choice (or of one streamed chunk)."""

    content: list[TokenLogprob]


class ChatChoice(Response, kw_only=True):
    """One chat completion choice."""

    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Response, kw_only=True):
    """A chat completion."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(Response, kw_only=True, omit_defaults=True):
    """What a streamed chunk adds to a tool call's function: its name (first chunk of the
    call) and a piece of its arguments' JSON text."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Response, kw_only=True, omit_defaults=True):
    """A streamed piece of tool call `index`: the first carries its id, type and name."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(Response, kw_only=True, omit_defaults=True):
    """What a streamed chat chunk adds: the role (first chunk), content, or tool calls."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Response, kw_only=True):
    """One choice of a streamed chat chunk."""

    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Response, kw_only=True):
    """One chunk of a streamed chat completion."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(Response, kw_only=True):
    """One served model: `created` is when this server started (Unix seconds);
    max_model_len, the longest context its engines hold (tokens)."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "parrot_actors"
    max_model_len: int = 0


class ModelList(Response, kw_only=True):
    """GET /v1/models."""

    object: str = "list"
    data: list[ModelCard]


class TokenizeRequest(Request, kw_only=True):
    """POST /tokenize: the token ids of `prompt` as the model's engines tokenize a prompt
    (special tokens such as BOS included unless `add_special_tokens` is false)."""

    model: str
    prompt: str
    add_special_tokens: bool = True


class TokenizeResponse(Response, kw_only=True):
    """The tokens, their count and the model's longest context (tokens)."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Request, kw_only=True):
    """POST /detokenize: the text of token ids (special tokens skipped)."""

    model: str
    tokens: list[Annotated[int, Meta(ge=0)]]


class DetokenizeResponse(Response, kw_only=True):
    """The text."""

    prompt: str


class HintSessionStats(Response, kw_only=True):
    """GET /v1/parrot/sessions/{session}: what a session named in OpenAI requests' hints has
    been served (its finished requests), in tokens: `calls`, prompt and completion tokens,
    prompt tokens computed and reused (forked or cached), of those the ones forked from its
    own previous turn (`cached_tokens`), prompt + completion (`attained_tokens`) and its
    attained service in predicted engine seconds (`attained_s`, what the scheduler orders
    programs by). `retained_tokens`: its context kept on an engine now
    (0: none) and `retained_for_s` how much longer (seconds)."""

    session: str
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_tokens: int = 0
    reused_tokens: int = 0
    cached_tokens: int = 0
    attained_tokens: int = 0
    attained_s: float = 0.0
    retained_tokens: int = 0
    retained_for_s: float = 0.0


class OpenAIErrorBody(Response, kw_only=True):
    """An error in OpenAI's shape, so OpenAI clients raise the right exception: `message`,
    `type` (e.g. "invalid_request_error", "authentication_error", "server_error"), `param`
    (the request field at fault, when known) and `code` (this service's error class)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(Response, kw_only=True):
    """`{"error": {...}}` of the OpenAI routes."""

    error: OpenAIErrorBody
