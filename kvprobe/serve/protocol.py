"""The OpenAI wire protocol as pydantic models (the requests kvprobe reads, the errors it answers), apart from the
engine that decodes. Unknown top-level fields are allowed (clients send vendor extras) and each one is logged; a
standard parameter kvprobe cannot honour is refused by name (``unsupported``), never ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# (field, the value that asks for nothing): a standard parameter kvprobe does not implement is accepted only there
NEUTRAL = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, 0), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
    "web_search_options": (), "echo": (False,), "suffix": ("",), "best_of": (1,), "parallel_tool_calls": (True, False),
    "store": (False,), "reasoning_effort": (), "service_tier": ("auto", "default"), "verbosity": (),
}


class APIError(Exception):
    """An error the client gets in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class KVProbeOptions(Strict):
    """Steering for one request: ``extra_body={"kvprobe": {...}}`` with the openai client. Unset = the folder's."""

    policy: str | None = None
    threshold: str | float | None = Field(None, description="a calibrated threshold's name, or a difficulty score")
    budget: float | None = Field(None, description="route at the threshold calibrated for this x always-slow budget")
    escalate_above: float | None = None
    escalate_on: str | None = None
    verify_route_threshold: str | float | None = None
    samples: int | None = None
    select: str | None = None
    eta: float | None = None
    wave: int | None = None
    stop_on: str | None = None
    stop_at: float | None = None
    switch_low: float | None = None
    switch_high: float | None = None

    def steering(self) -> dict[str, Any]:
        """The ``SteeringSpec`` overrides it sets (``policy`` and ``budget`` apart)."""
        return {k: v for k, v in self.model_dump(exclude={"policy", "budget"}).items() if v is not None}


class StreamOptions(Strict):
    include_usage: bool = False


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id, ...: carried to the template
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def chat(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="0 or unset: greedy (the probes were calibrated on greedy answers)")
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    kvprobe: KVProbeOptions | None = None
    # standard parameters kvprobe does not implement: accepted only at their neutral value (``NEUTRAL``)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    parallel_tool_calls: Any = None
    store: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    verbosity: Any = None

    def unsupported(self) -> None:
        """Refuse, by name, a standard parameter set to something kvprobe would have to ignore."""
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name, None)
            if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
                if name == "best_of" and value == self.n:
                    continue
                raise APIError(400, f"{name}={value!r:.60} is not supported by kvprobe serve (leave it unset)", param=name,
                               code="unsupported_parameter")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return stops

    def cap(self) -> int | None:
        return self.max_tokens


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None

    def cap(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompt(self) -> list[dict[str, str]]:
        if not self.messages:
            raise APIError(400, "messages is empty: give at least one message", param="messages")
        return [m.chat() for m in self.messages]


class CompletionRequest(Sampling):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        """The question (one string): the mode's instruction and the chat template are applied as ``generate(str)``."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: give one string (a list of several prompts is not supported; send one request "
                                "each, they are batched)", param="prompt")
        if not prompts[0].strip():
            raise APIError(400, "prompt is empty", param="prompt")
        return prompts[0]


def parse(kind: type[Sampling], data: object) -> Sampling:
    """The request ``data`` (parsed JSON) as ``kind``, or a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "str", "list[", "int", "float"))]
        param = ".".join(loc) or None
        if first["type"] == "missing":
            message = f"{param} is required"
        elif first["type"] == "extra_forbidden":
            message = f"{param} is not a known field here"
        else:
            message = f"{param}: {first['msg']} (got {first.get('input')!r:.60})"
        raise APIError(400, message, param=param, code="invalid_type" if first["type"] != "missing" else "missing_field") from None
