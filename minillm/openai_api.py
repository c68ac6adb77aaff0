"""OpenAI's API shapes for the generation routes, /v1/completions and /v1/chat/completions: check a
request body field by field, turn it into token ids and one SamplingConfig per choice, render chat
messages as a prompt, and build the JSON bodies and stream chunks OpenAI clients read. No HTTP and no
threads here (minillm.server does those): every rule is a plain function a test can call.

Request fields (both routes unless said):
    model        the served model's id (else 404 model_not_found); may be left out
    prompt       completions: a string, a list of strings, a list of token ids, or a list of such lists
    messages     chat: [{"role": "system" | "developer" | "user" | "assistant", "content": text}], the
                 content a string or a list of {"type": "text", "text": ...} parts
    max_tokens   >= 1, and prompt + max_tokens must fit the context window (else 400
                 context_length_exceeded). Left out: 16 for completions (OpenAI's default), the rest of
                 the window for chat. Chat also takes OpenAI's newer name, max_completion_tokens
    temperature  [0, 2], default 1; 0 is greedy
    top_p        (0, 1], default 1
    n            choices per prompt, >= 1; choices in all (prompts x n) at most the server's max_choices
    stop         a string or a list of up to 4; the text ends just before the first one
    seed         integer in [0, 2**62): choice i uses seed + i, so a request is reproducible, and a
                 choice is the same alone or batched with others. Left out: a random seed
    stream       server-sent events ending with `data: [DONE]`; stream_options.include_usage adds a
                 last chunk with usage and no choices
    top_k, repetition_penalty, ignore_eos   extensions, named as vLLM names them: sample among the k
                 most likely (-1 or 0: no limit); CTRL's penalty; keep going past <|endoftext|> (fixed lengths for benchmarks)
    user         accepted and ignored
What OpenAI defines and this server cannot do (logprobs, echo, suffix, best_of, logit_bias, tools,
non-zero presence/frequency penalties, a response_format other than text) is a 400 naming the field,
never silently ignored. Fields OpenAI does not define are ignored, so newer clients keep working.
Choice k of a completions request answers prompt k // n; `usage.prompt_tokens` counts each prompt once.

Chat prompts. A checkpoint finetuned on instructions stores its PromptTemplate (minillm.prompts); the
messages are rendered with it: each user message with the assistant reply after it is an earlier
turn, the last message (which must be the user's) is the instruction the model answers, and a system
message replaces the template's preamble. A checkpoint without a template (a base model, e.g. the
`make demo` one) gets a plain transcript the model can continue:

    System: You are terse.
    User: Hello
    Assistant: Hi.
    User: How are you?
    Assistant:

Either way the layout's own markers are added as stop strings (the template's headers; "\nUser:",
"\nSystem:", "\nAssistant:"), so the reply ends where the model starts writing the next turn, and the
reply's leading whitespace is dropped. Consecutive messages of one role are joined by a blank line.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from minillm.generate import SamplingConfig, encode_prompt
from minillm.prompts import PromptTemplate

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
SEED_LIMIT = 2**62  # seeds are in [0, SEED_LIMIT); seed + choice index stays far inside torch's range
TRANSCRIPT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# field -> the values that mean "not asked for"; anything else is refused as unsupported
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "best_of": (None, 1), "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
}


class APIError(Exception):
    """A request the server answers with an error: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServedModel:
    """What the request checks need to know about the model being served."""

    name: str  # the id clients pass as `model`
    tokenizer: Any  # minillm.tokenizer.Tokenizer
    block_size: int  # the context window: prompt + max_tokens must fit
    template: PromptTemplate | None = None  # chat layout; None = the plain transcript
    max_choices: int = 16  # prompts x n per request
    created: int = 0  # unix time the server started, for /v1/models


@dataclass
class GenerationRequest:
    """A checked request: what to generate and how to answer."""

    chat: bool
    prompts: list[list[int]]  # token ids of each prompt (chat: exactly one)
    configs: list[SamplingConfig]  # one per choice; choice k answers prompts[k // n], with seed + k
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage
    seed: int

    @property
    def choice_prompts(self) -> list[list[int]]:
        return [self.prompts[k // self.n] for k in range(len(self.configs))]


# ---- field checks ----


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages ("string", "integer", "array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"`{param}` {message}", param=param, code=code)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {json_type(value)} {value!r}", "invalid_type")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(name, f"must be {bounds}, got {value}")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"must be a number, got {json_type(value)} {value!r}", "invalid_type")
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {json_type(value)} {value!r}", "invalid_type")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"must be a string or a list of strings, got {json_type(value)}", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise _bad("stop", f"takes at most {MAX_STOP_STRINGS} non-empty strings, got {stops!r}")
    return tuple(stops)


def check_model(body: dict, served: ServedModel) -> None:
    """`model`, if given, must name the served model: 404 model_not_found otherwise."""
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise _bad("model", f"must be a string, got {json_type(name)}", "invalid_type")
    if name != served.name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{served.name}` (GET /v1/models)",
                       param="model", code="model_not_found")


def _check_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise _bad(name, "is not supported by this server", "unsupported_parameter")


def _sampling(body: dict, served: ServedModel, prompts: list[list[int]], n: int, chat: bool,
              extra_stops: tuple[str, ...] = ()) -> tuple[list[SamplingConfig], int]:
    """One SamplingConfig per choice (prompt-major), checking that each prompt + max_tokens fits."""
    name = "max_tokens"
    max_tokens = _integer(body, "max_tokens", None, 1)
    if chat and max_tokens is None:
        max_tokens, name = _integer(body, "max_completion_tokens", None, 1), "max_completion_tokens"
    seed = _integer(body, "seed", None, 0, SEED_LIMIT - 1)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    top_k = _integer(body, "top_k", None, -1)
    base = SamplingConfig(
        max_new_tokens=1,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=top_k if top_k is not None and top_k > 0 else None,  # vLLM's "no limit" is -1 (or 0)
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop=_stop(body) + extra_stops,
        stop_at_eot=not _boolean(body, "ignore_eos", False),
    )
    window = served.block_size
    configs = []
    for p, prompt in enumerate(prompts):
        room = window - len(prompt)
        if max_tokens is not None and len(prompt) + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                           f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                           f"completion). Please reduce the prompt or `{name}`.", param=name, code="context_length_exceeded")
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {window} tokens, and the prompt is "
                           f"{len(prompt)} tokens: no room is left to generate. Please shorten the prompt.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        default = room if chat else min(room, COMPLETIONS_DEFAULT_MAX_TOKENS)
        for i in range(n):
            k = p * n + i
            configs.append(replace(base, max_new_tokens=max_tokens or default, seed=seed + k))
    return configs, seed


def _common(body: Any, served: ServedModel) -> tuple[int, bool, bool]:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}")
    check_model(body, served)
    _check_unsupported(body)
    n = _integer(body, "n", 1, 1)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", f"must be an object, got {json_type(options)}", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage", False)
    if include_usage and not stream:
        raise _bad("stream_options", "is only allowed when `stream` is true")
    return n, stream, include_usage


def _choices_limit(served: ServedModel, prompts: int, n: int) -> None:
    if prompts * n > served.max_choices:
        raise _bad("n", f"asks for {prompts * n} choices ({prompts} prompt(s) x n={n}); this server allows at most "
                   f"{served.max_choices} per request")


# ---- the two routes ----


def parse_completion_request(body: Any, served: ServedModel) -> GenerationRequest:
    """Check a /v1/completions body; raises APIError naming the field at fault."""
    n, stream, include_usage = _common(body, served)
    if "prompt" not in body:
        raise _bad("prompt", "is required", "missing_required_parameter")
    items = _prompt_items(body["prompt"])
    prompts = [_prompt_ids(p, f"prompt[{i}]" if len(items) > 1 else "prompt", served) for i, p in enumerate(items)]
    _choices_limit(served, len(prompts), n)
    configs, seed = _sampling(body, served, prompts, n, chat=False)
    return GenerationRequest(False, prompts, configs, n, stream, include_usage, seed)


def _prompt_items(prompt: Any) -> list:
    """The prompts of `prompt`: a string, a list of strings, one id list, or a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]  # one prompt given as token ids
        if all(isinstance(p, (str, list)) for p in prompt):
            return prompt
    if isinstance(prompt, list) and not prompt:
        raise _bad("prompt", "is an empty list: give a string, token ids, or a list of those")
    raise _bad("prompt", f"must be a string, a list of strings, a list of token ids or a list of token id lists; "
               f"got {json_type(prompt)}", "invalid_type")


def _encode(text: str, served: ServedModel, param: str, where: str) -> list[int]:
    """Token ids of a text (lone surrogates, which JSON can carry, are read as U+FFFD by the tokenizer)."""
    try:
        return encode_prompt(text, served.tokenizer)
    except ValueError as err:  # an empty prompt and a tokenizer without <|endoftext|>
        raise _bad(param, f"{where}: {err}") from None


def _prompt_ids(item: Any, where: str, served: ServedModel) -> list[int]:
    vocab = served.tokenizer.vocab_size
    if isinstance(item, str):
        return _encode(item, served, "prompt", where)
    if not item:
        raise _bad("prompt", f"{where} is an empty list of token ids")
    for j, t in enumerate(item):
        if isinstance(t, bool) or not isinstance(t, int):
            raise _bad("prompt", f"{where}[{j}] must be a token id (an integer), got {json_type(t)}", "invalid_type")
        if not 0 <= t < vocab:
            raise _bad("prompt", f"{where}[{j}]: token id {t} is outside the vocabulary [0, {vocab})")
    return list(item)


def parse_chat_request(body: Any, served: ServedModel) -> GenerationRequest:
    """Check a /v1/chat/completions body and render its messages; raises APIError naming the field."""
    n, stream, include_usage = _common(body, served)
    text, stops = render_chat(_messages(body), served.template)
    prompt = _encode(text, served, "messages", "the conversation")
    _choices_limit(served, 1, n)
    configs, seed = _sampling(body, served, [prompt], n, chat=True, extra_stops=stops)
    return GenerationRequest(True, [prompt], configs, n, stream, include_usage, seed)


def _messages(body: dict) -> list[tuple[str, str]]:
    """[(role, content)] from `messages`, roles normalised ("developer" is OpenAI's newer "system")."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", f"must be a non-empty list of messages, got {json_type(messages)}", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad("messages", f"[{i}] must be an object with role and content, got {json_type(m)}", "invalid_type")
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role
        if role not in TRANSCRIPT_ROLES:
            raise _bad("messages", f"[{i}].role must be system, developer, user or assistant, got {role!r}")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise _bad("messages", f"[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}}: this model reads text only")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad("messages", f"[{i}].content must be a string or a list of text parts, got {json_type(content)}", "invalid_type")
        out.append((role, content))
    if out[-1][0] != "user":
        raise _bad("messages", f"must end with a user message for the model to answer; the last is {out[-1][0]!r}")
    return out


def render_chat(messages: list[tuple[str, str]], template: PromptTemplate | None) -> tuple[str, tuple[str, ...]]:
    """(prompt text, stop strings) for a conversation ending with a user message (module docstring)."""
    merged: list[tuple[str, str]] = []
    for role, content in messages:  # consecutive messages of one role read as one
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + "\n\n" + content)
        else:
            merged.append((role, content))
    if template is None:
        lines = [f"{TRANSCRIPT_ROLES[role]}: {content}" for role, content in merged]
        return "\n".join(lines + ["Assistant:"]), tuple(f"\n{name}:" for name in ("User", "System", "Assistant"))
    system = "\n\n".join(content for role, content in merged if role == "system")
    if system:
        template = replace(template, preamble=system)
    history, pending = [], None  # (instruction, response) pairs, oldest first; the user turn not yet answered
    for role, content in merged:
        if role == "user":
            if pending is not None:
                history.append((pending, ""))
            pending = content
        elif role == "assistant":
            history.append((pending or "", content))
            pending = None
    return template.render_conversation(history, pending), template.stop_strings()


# ---- responses ----


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, created: int, model: str, choices: list[tuple[str, str]], used: dict) -> dict:
    """The /v1/completions body; `choices` are (text, finish_reason) in index order."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)],
            "usage": used}


def chat_response(rid: str, created: int, model: str, choices: list[tuple[str, str]], used: dict) -> dict:
    """The /v1/chat/completions body; `choices` are (content, finish_reason) in index order."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
            "usage": used}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(chat: bool, rid: str, created: int, model: str, used: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": used}


def model_object(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "minillm"}


def models_response(served: ServedModel) -> dict:
    return {"object": "list", "data": [model_object(served)]}
