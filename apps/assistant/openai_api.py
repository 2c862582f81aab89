"""OpenAI chat completions: request validation, conversation lookup, responses.

A request carries the whole history, as with OpenAI's API. It continues the
conversation named by the body field "conversation" or the header
X-Conversation-Id (created if new; messages that begin with its saved history
extend it, others are appended to it), else the most recent conversation
whose saved messages begin the request's, else a new one. Every response
names its conversation (field "conversation", header X-Conversation-Id).
"""

import math
import time
import uuid
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .errors import RequestError
from .store import Store, new_id, validate_id

ROLES = {"system": "system", "developer": "system", "user": "user",
         "assistant": "assistant"}
MAX_STOPS = 4


def bad(message: str, param: Optional[str] = None) -> RequestError:
    return RequestError(400, message, code="invalid_request", param=param)


@dataclass
class ChatRequest:
    messages: List[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stop: List[str]
    stream: bool
    include_usage: bool
    seed: Optional[int]
    conversation: Optional[str]


def number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{name} must be a number", name)
    if not lo <= v <= hi:
        raise bad(f"{name} must be between {lo} and {hi}", name)
    return float(v)


def integer(body: dict, name: str, default: Optional[int], lo: int) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer", name)
    if v < lo:
        raise bad(f"{name} must be at least {lo}", name)
    return v


def text_content(content, where: str) -> str:
    """A message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"{where}.content must be a string or a list of text parts "
              "(images and audio are not supported)", where)


def parse_messages(messages) -> List[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        if m.get("role") not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)} "
                      "(tool calls are not supported)", where)
        content = text_content(m.get("content"), where)
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def parse_stop(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad(f"stop must be a string or a list of up to {MAX_STOPS} non-empty "
                  "strings", "stop")
    return stops


def parse_chat(body: dict, header_conversation: Optional[str], settings) -> ChatRequest:
    if integer(body, "n", 1, 1) != 1:
        raise bad("only n=1 is supported", "n")
    if not isinstance(body.get("stream", False), bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not (isinstance(options, dict)
            and isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options must be an object like {\"include_usage\": true}",
                  "stream_options")
    conversation = body.get("conversation", header_conversation)
    if conversation is not None:
        try:
            validate_id(conversation)
        except ValueError as e:
            raise bad(str(e), "conversation") from None
    max_tokens = integer(body, "max_completion_tokens", None, 1)
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        max_tokens=max_tokens or integer(body, "max_tokens", settings.max_tokens, 1),
        temperature=number(body, "temperature", settings.temp, 0.0, 2.0),
        top_p=number(body, "top_p", settings.top_p, 0.0, 1.0),
        stop=parse_stop(body.get("stop")),
        stream=body.get("stream", False),
        include_usage=options.get("include_usage", False),
        seed=integer(body, "seed", None, 0),
        conversation=conversation,
    )


def _same(a: List[dict], b: List[dict]) -> bool:
    return [(m["role"], m["content"]) for m in a] == [(m["role"], m["content"]) for m in b]


def resolve_conversation(store: Store, req: ChatRequest) -> Tuple[str, List[dict], bool]:
    """(conversation id, messages to append to it, whether it is new) for a
    request; a new conversation is created only once its first turn is saved."""
    msgs = req.messages
    if req.conversation is not None:
        if not store.exists(req.conversation):
            return req.conversation, msgs, True
        saved = store.get(req.conversation).messages
        if _same(msgs[:len(saved)], saved):
            return req.conversation, msgs[len(saved):], False
        return req.conversation, msgs, False
    for conv in store.list():  # most recent first
        if conv.messages and _same(msgs[:len(conv.messages)], conv.messages):
            return conv.id, msgs[len(conv.messages):], False
    return new_id(), msgs, True


class Reply:
    """Response bodies of one chat completion."""

    def __init__(self, model: str, conversation: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.conversation = model, conversation

    def _base(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "conversation": self.conversation}

    def completion(self, text: str, finish: str, usage: dict,
                   notice: Optional[str]) -> dict:
        body = self._base("chat.completion", [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": _finish(finish), "logprobs": None}])
        body["usage"] = usage_body(usage)
        if notice:
            body["notice"] = notice
        return body

    def chunk(self, delta: dict, finish: Optional[str] = None) -> dict:
        return self._base("chat.completion.chunk", [{
            "index": 0, "delta": delta, "finish_reason": _finish(finish),
            "logprobs": None}])

    def usage_chunk(self, usage: dict) -> dict:
        body = self._base("chat.completion.chunk", [])
        body["usage"] = usage_body(usage)
        return body


def _finish(reason: Optional[str]) -> Optional[str]:
    # OpenAI knows "stop" and "length"; a cancelled reply is cut like one at the limit.
    return "length" if reason == "cancelled" else reason


def usage_body(usage: dict) -> dict:
    p, c = usage["prompt_tokens"], usage["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [
        {"id": model_id, "object": "model", "created": created, "owned_by": "mlx_kvq"}]}
