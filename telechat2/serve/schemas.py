"""Request bodies of the TGI/MindIE and OpenAI dialects, validated strictly.

Strict mode on purpose: `"max_new_tokens": "5"` or `"do_sample": 1` is a client bug worth a 4xx naming the field,
not a silent coercion. Unknown keys are ignored, as TGI and OpenAI servers do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Seeds go to numpy/MindSpore generators, which take 32-bit unsigned seeds.
MAX_SEED = 2**32 - 1
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """A client error with the field it is about; rendered in the route's dialect (TGI or OpenAI)."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        error_type: str = "validation",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.error_type = error_type
        self.headers = headers or {}


class _Strict(BaseModel):
    # allow_inf_nan=False: Python's json accepts NaN and Infinity literals; a temperature of NaN is a client bug
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _stop_list(value: str | list[str] | None) -> list[str]:
    """`stop` may be one string or a list; empty strings would stop at once, so they are refused."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


# -- TGI / MindIE ---------------------------------------------------------------------------------------------------


class TGIParameters(_Strict):
    """`parameters` of POST /generate; None means the model's generation default.

    Unknown keys are refused (422 naming the key): a misspelt `max_new_token` silently ignored would generate 4096
    tokens. TGI parameters this server does not implement are accepted only at their neutral value.
    """

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    do_sample: bool | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list)
    return_full_text: bool = False
    details: bool = False
    truncate: int | None = Field(None, ge=1)
    # Accepted for MindIE/TGI compatibility and ignored: the generator has no typical sampling (documented).
    typical_p: float | None = Field(None, gt=0, le=1)
    # TGI parameters without an implementation here: only their "off" value is accepted.
    best_of: Literal[1] | None = None
    watermark: Literal[False] = False
    decoder_input_details: Literal[False] = False
    top_n_tokens: Literal[0] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    grammar: None = None
    adapter_id: None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _stop_list(value) if isinstance(value, str | list) or value is None else value


class GenerateRequest(_Strict):
    """POST /generate and /generate_stream (TGI shape; `stream: true` on /generate streams too, as MindIE does)."""

    inputs: str = Field(min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


# -- OpenAI ---------------------------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message; list-of-parts content is accepted when every part is text."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The plain dict `telechat2.chat.format_chat` takes."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAISampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # extension (vLLM, MindIE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1)
    stop: Annotated[list[str], Field(default_factory=list)]
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)  # extension; wins over presence/frequency

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _stop_list(value) if isinstance(value, str | list) or value is None else value


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for the legacy completions API
    echo: bool = False
