"""The wire protocol: every ZeroMQ frame between nodes is one msgpack message defined here.

Nothing else in the package touches bytes. ``encode`` turns a message into a frame; ``decode``
checks the frame size, decodes the msgpack map into the tagged message type (msgspec validates
field types, lengths and ranges in C while decoding), then checks the protocol version. Any
failure raises ``ProtocolError``; the socket loop counts and drops the frame.

Message flow (thief T, victim/origin V):
  T --Steal--> V.steal (DEALER -> ROUTER)      V --Grant(tasks)--> T
  T --Probe--> V.steal                         V --LoadReport--> T     (queue length and age)
  T --Tokens / Heartbeat / Handback--> V.result (DEALER -> ROUTER)
  V --Ack / HeartbeatAck / Cancel--> T over the same connection
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from .. import PROTOCOL_VERSION
from .errors import ProtocolError

MAX_FRAME_BYTES = 4 * 1024 * 1024  # also set as ZMQ_MAXMSGSIZE on every socket; encode refuses more
MAX_GRANT_BYTES = MAX_FRAME_BYTES  # a victim stops adding tasks to a grant before this
MAX_TASKS_PER_GRANT = 1024
MAX_ITEMS_PER_MESSAGE = 4096

# The one table of request limits. The HTTP schema (openai_schema.py) takes its bounds from
# here, so every request a node accepts is one the wire carries and every peer decodes. A task
# with the longest prompt and output encodes in about 5 bytes per token: 2.6 MB < MAX_FRAME_BYTES.
MAX_CONTEXT_TOKENS = 1 << 19  # prompt + output, on every engine (engines clamp their own limit to it)
MAX_TOKEN_ID = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20  # above the vocabulary it means "no top-k", as any value <= 0 does
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Name = Annotated[str, msgspec.Meta(max_length=256)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKEN_ID)]
MAX_COUNT = 1 << 31
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
UnixTime = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]  # finite: NaN and infinity fail the bounds
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]  # a duration; finite
FinishReason = Literal["stop", "length", "abort", "error"]
GrantReason = Literal["ok", "empty", "model_mismatch", "not_accepting", "unknown_peer", "wrong_node"]
# Why a thief gives a task back unrun: its engine cannot run it, it waited past its deadline
# before starting, the thief is shutting down, or its queue is full.
HandbackReason = Literal["cannot_run", "expired", "draining", "full"]


class _Base(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    v: int  # protocol version, checked after decoding


class Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONTEXT_TOKENS)]
    seed: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TEMPERATURE)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=-1, le=MAX_TOP_K)] = -1
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)] = []
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_STRING_CHARS)]],
                    msgspec.Meta(max_length=MAX_STOP_STRINGS)] = []


class Task(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stolen request: enough to run it anywhere and resume it after tokens already sent."""

    request_id: Id
    origin_id: Id
    origin_name: Name
    epoch: Count
    prompt_token_ids: Annotated[list[TokenId], msgspec.Meta(min_length=1, max_length=MAX_CONTEXT_TOKENS)]
    delivered_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_CONTEXT_TOKENS)]
    sampling: Sampling
    deadline: UnixTime  # unix time by which it must have started running, or the origin gives up on it
    waited_s: Seconds = 0.0  # how long it had waited since it arrived at its origin, when granted


class Steal(_Base, frozen=True, tag="steal"):
    steal_id: Id
    victim_id: Id  # the node the thief means: a process that took over its ports answers "wrong_node"
    thief_id: Id
    thief_name: Name
    model_id: Id
    max_requests: Annotated[int, msgspec.Meta(ge=1, le=MAX_TASKS_PER_GRANT)]
    max_tokens: Count  # prompt + output tokens the thief can hold in its KV cache
    max_model_len: Count  # longest prompt + output the thief's engine runs
    min_waited_s: Seconds = 0.0  # only requests that have waited at least this long (0: any)


class Grant(_Base, frozen=True, tag="grant"):
    steal_id: Id
    victim_id: Id
    tasks: Annotated[list[Task], msgspec.Meta(max_length=MAX_TASKS_PER_GRANT)]
    victim_pending: Count  # victim's queue after the grant, so thieves need not wait for Redis
    reason: GrantReason = "ok"
    victim_oldest_waited_s: Seconds = 0.0  # the wait of its oldest grantable request left (0: none)
    victim_grantable: Count = 0  # requests left that a thief could be given


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
    is_running: bool = False  # in the thief's engine (started), not waiting in its queue


class HandbackItem(msgspec.Struct, frozen=True, array_like=True):
    request_id: Id
    epoch: Count
    reason: HandbackReason


class Handback(_Base, frozen=True, tag="handback"):
    """Thief -> origin: these granted tasks will not run here; they are yours again."""

    thief_id: Id
    items: Annotated[list[HandbackItem], msgspec.Meta(min_length=1, max_length=MAX_TASKS_PER_GRANT)]


class Probe(_Base, frozen=True, tag="probe"):
    """Thief -> victim (steal socket): how long is your queue, and how old is its oldest request?"""

    probe_id: Id
    thief_id: Id


class LoadReport(_Base, frozen=True, tag="load"):
    """Victim -> thief: the answer to a Probe."""

    probe_id: Id
    node_id: Id
    pending: Count
    pending_tokens: Count
    running: Count
    oldest_waited_s: Seconds = 0.0  # the wait of its oldest grantable request (0: none)
    grantable: Count = 0  # requests in its queue a thief could be given


class Heartbeat(_Base, frozen=True, tag="heartbeat"):
    """Thief -> origin: I still hold these and my engine makes progress; renews their leases."""

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


Message = Union[Steal, Grant, Tokens, Heartbeat, HeartbeatAck, Ack, Cancel, Handback, Probe, LoadReport]

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """One frame; ``ProtocolError`` if it would exceed ``MAX_FRAME_BYTES`` or cannot be encoded."""
    try:
        frame = _encoder.encode(message)
    except (OverflowError, TypeError, ValueError) as exc:  # e.g. an int beyond 64 bits
        raise ProtocolError(f"cannot encode {type(message).__name__}: {exc}") from None
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{type(message).__name__} of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    return frame


_task_decoder: msgspec.msgpack.Decoder[Task] = msgspec.msgpack.Decoder(Task)


def checked_task_frame(task: Task) -> bytes:
    """The task's msgpack bytes, after checking that a peer's decoder accepts them.

    Types are checked when a peer decodes, not when we build a struct; a victim runs this on
    each task before leasing it, so a grant it sends is a grant every thief takes whole."""
    try:
        frame = _encoder.encode(task)
        _task_decoder.decode(frame)
    except (OverflowError, TypeError, ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"task {task.request_id}: {exc}") from None
    return frame


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


