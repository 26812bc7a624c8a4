"""The wire protocol: every ZeroMQ frame between nodes is one msgpack message defined here.

Nothing else in the package touches bytes. ``encode`` turns a message into a frame; ``decode``
checks the frame size, decodes the msgpack map into the tagged message type (msgspec validates
field types, lengths and ranges in C while decoding), then checks the protocol version. Any
failure raises ``ProtocolError``; the socket loop counts and drops the frame.

Message flow (thief T, victim/origin V):
  T --Steal--> V.steal (DEALER -> ROUTER)      V --Grant(tasks)--> T
  T --Tokens / Heartbeat--> V.result (DEALER -> ROUTER)
  V --Ack / HeartbeatAck / Cancel--> T over the same connection
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from . import PROTOCOL_VERSION
from .errors import ProtocolError

MAX_FRAME_BYTES = 4 * 1024 * 1024  # also set as ZMQ_MAXMSGSIZE on every socket
MAX_PROMPT_TOKENS = 1 << 18
MAX_TASKS_PER_GRANT = 1024
MAX_ITEMS_PER_MESSAGE = 4096

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
FinishReason = Literal["stop", "length", "abort", "error"]
GrantReason = Literal["ok", "empty", "model_mismatch", "not_accepting"]


class _Base(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    v: int  # protocol version, checked after decoding


class Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
    seed: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=1 << 20)] = -1
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=256)] = []
    stop: Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=16)] = []


class Task(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stolen request: enough to run it anywhere and resume it after tokens already sent."""

    request_id: Id
    origin_id: Id
    origin_name: Name
    epoch: Count
    prompt_token_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    delivered_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=1 << 20)]
    sampling: Sampling
    deadline: float  # unix time after which the origin gives up on it


class Steal(_Base, frozen=True, tag="steal"):
    steal_id: Id
    thief_id: Id
    thief_name: Name
    model_id: Id
    max_requests: Annotated[int, msgspec.Meta(ge=1, le=MAX_TASKS_PER_GRANT)]
    max_tokens: Count  # prompt + output tokens the thief can hold in its KV cache


class Grant(_Base, frozen=True, tag="grant"):
    steal_id: Id
    victim_id: Id
    tasks: Annotated[list[Task], msgspec.Meta(max_length=MAX_TASKS_PER_GRANT)]
    victim_pending: Count  # victim's queue after the grant, so thieves need not wait for Redis
    reason: GrantReason = "ok"


class TokenItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: Id
    epoch: Count
    seq: Seq  # 0, 1, 2, ... per (request, epoch)
    token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=1 << 16)]
    finish_reason: FinishReason | None = None
    completion_tokens: Count = 0  # on the last item: total output tokens of this attempt


class Tokens(_Base, frozen=True, tag="tokens"):
    """All new tokens for one origin from one engine step of the thief."""

    thief_id: Id
    thief_name: Name
    items: Annotated[list[TokenItem], msgspec.Meta(min_length=1, max_length=MAX_ITEMS_PER_MESSAGE)]


class LeaseRef(msgspec.Struct, frozen=True, array_like=True):
    request_id: Id
    epoch: Count


class Heartbeat(_Base, frozen=True, tag="heartbeat"):
    """Thief -> origin: I still run these; renews their leases."""

    thief_id: Id
    leases: Annotated[list[LeaseRef], msgspec.Meta(max_length=MAX_ITEMS_PER_MESSAGE)]


class HeartbeatAck(_Base, frozen=True, tag="heartbeat_ack"):
    """Origin -> thief: which of the heartbeated leases are no longer yours (fenced or gone)."""

    origin_id: Id
    revoked: Annotated[list[Id], msgspec.Meta(max_length=MAX_ITEMS_PER_MESSAGE)]


class Ack(_Base, frozen=True, tag="ack"):
    """Origin -> thief: the final token message of these requests was accepted."""

    origin_id: Id
    request_ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_ITEMS_PER_MESSAGE)]


class Cancel(_Base, frozen=True, tag="cancel"):
    """Origin -> thief: stop running this request (client gone, deadline, or lease fenced)."""

    origin_id: Id
    request_id: Id
    epoch: Count
    reason: Name


Message = Union[Steal, Grant, Tokens, Heartbeat, HeartbeatAck, Ack, Cancel]

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> Message:
    """Decode and validate one frame; raise ``ProtocolError`` with a short reason otherwise."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        message = _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {message.v} is not {PROTOCOL_VERSION}")
    return message


