"""The wire format (docs/abi.md sections 1-2): request envelopes, replies and chunks as msgpack maps.

``decode_request`` is the kernel's first step on every frame: it either returns an ``Envelope`` whose ``args``
are still raw bytes (decoded later against the syscall's own schema) or raises ``SyscallError`` carrying the
request id when it could be read.  Encoding helpers build the three answer shapes.
"""
from __future__ import annotations

from typing import Annotated, Any

import msgspec

from syscalls.address import ABI_VERSION, SOCKET_NAME, default_runtime_dir, endpoint  # noqa: F401
from syscalls.errors import SyscallError

SUPPORTED_VERSIONS = (ABI_VERSION,)
DEFAULT_MAX_FRAME = 1 << 20

_EMPTY_MAP = msgspec.Raw(b"\x80")


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """A request (docs/abi.md 2.1).  ``args`` stays raw until the syscall's schema decodes it."""

    v: int
    id: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    call: str
    args: msgspec.Raw = _EMPTY_MAP


class RequestError(SyscallError):
    """A frame the kernel cannot serve; ``rid`` is the request id when it could be read, else ``None``."""

    def __init__(self, code: str, message: str, rid: int | None):
        super().__init__(message, code)
        self.rid = rid


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_any_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()
encode = _encoder.encode


# What a decoder may raise on hostile bytes: DecodeError (invalid msgpack, invalid UTF-8, truncation, a
# ValidationError is one), RecursionError (nesting deeper than msgspec's limit), MemoryError (a length prefix
# it cannot honour), OverflowError/ValueError (numbers out of range).  Never anything the kernel must die of.
DECODE_ERRORS = (msgspec.DecodeError, RecursionError, MemoryError, OverflowError, ValueError)


def _salvage_id(frame: bytes) -> tuple[int | None, Any]:
    """Best effort on an invalid envelope: the request id if it is readable, and the decoded object."""
    try:
        obj = _any_decoder.decode(frame)
    except DECODE_ERRORS:
        return None, None
    rid = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 1 << 63:
        rid = None
    return rid, obj


def decode_request(frame: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> Envelope:
    """Decode one request frame.  Raises ``RequestError`` with E2BIG, EBADMSG or EPROTO (docs/abi.md 3)."""
    if len(frame) > max_frame:
        rid, _ = _salvage_id(frame)
        raise RequestError("E2BIG", f"frame is {len(frame)} bytes; the limit is {max_frame}", rid)
    try:
        env = _envelope_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        rid, obj = _salvage_id(frame)
        if isinstance(obj, dict) and "v" in obj and obj["v"] not in SUPPORTED_VERSIONS:
            raise RequestError("EPROTO", _version_message(obj["v"]), rid) from None
        raise RequestError("EPROTO", f"invalid request envelope: {_where(exc, '$', 'request')}", rid) from None
    except DECODE_ERRORS as exc:
        raise RequestError("EBADMSG", f"frame is not valid msgpack: {exc}", _peek(frame)) from None
    if env.v not in SUPPORTED_VERSIONS:
        raise RequestError("EPROTO", _version_message(env.v), env.id)
    return env


class _IdOnly(msgspec.Struct):
    """Only the request id of an envelope; every other key is skipped without being decoded."""

    id: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]


_id_decoder = msgspec.msgpack.Decoder(_IdOnly)


def _peek(frame: bytes) -> int | None:
    """The request id of a frame if it can be read cheaply (a map with an integer ``id``), else None."""
    try:
        return _id_decoder.decode(frame).id
    except DECODE_ERRORS:
        return None


def peek_id(frame: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> int | None:
    """The request id to answer a refused frame with (None when it cannot be read or the frame is too big)."""
    return _peek(frame) if len(frame) <= 2 * max_frame else None


def _version_message(v: Any) -> str:
    return f"ABI version {v!r} is not spoken here; this kernel speaks {list(SUPPORTED_VERSIONS)}"


def _where(exc: Exception, root: str, name: str) -> str:
    """msgspec says ``- at `$.x```; say ``- at `args.x``` so the user knows where to look."""
    return str(exc).replace(f"`{root}", f"`{name}")


def decode_args(schema_decoder: msgspec.msgpack.Decoder, raw: msgspec.Raw) -> Any:
    """Decode a syscall's raw ``args`` with its schema; raises ``SyscallError`` EINVAL naming the field."""
    try:
        return schema_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if "- at `" not in msg:
            msg += " - at `args`"
        raise SyscallError(_where(Exception(msg), "$", "args"), "EINVAL") from None
    except RecursionError:
        raise SyscallError("args are nested too deeply", "EINVAL") from None
    except DECODE_ERRORS as exc:  # e.g. invalid UTF-8 in a string
        raise SyscallError(f"args cannot be decoded: {exc}", "EINVAL") from None


def reply_ok(rid: int, result: Any) -> bytes:
    return encode({"v": ABI_VERSION, "id": rid, "ok": True, "result": result})


def reply_error(rid: int | None, code: str, message: str) -> bytes:
    return encode({"v": ABI_VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}})


def chunk(rid: int, seq: int, data: Any) -> bytes:
    return encode({"v": ABI_VERSION, "id": rid, "seq": seq, "chunk": data})


decode_any = _any_decoder.decode
