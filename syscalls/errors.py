"""ABI error codes (docs/abi.md section 3) and the exceptions named after them.

The kernel raises ``SyscallError`` subclasses in handlers; the router turns them into error replies.  The SDK
raises the same classes from error replies, so an agent writes ``except EPERM:``.
"""
from __future__ import annotations

CODES = (
    "EBADMSG", "EPROTO", "E2BIG", "ENOSYS", "EINVAL", "EPERM", "EACCES", "ENOENT",
    "EAGAIN", "ETIMEDOUT", "EDQUOT", "ESTALE", "ETOOL", "ECANCELED", "EIO", "ENOTSUP",
)

# One line each, for the exceptions' docstrings; docs/abi.md section 3 is the full table.
MEANINGS = {
    "EBADMSG": "the frame is not valid msgpack",
    "EPROTO": "the frame is not a valid envelope, or speaks an ABI version this kernel does not",
    "E2BIG": "the frame is over max_frame, or a prompt is longer than the model's per-sequence context",
    "ENOSYS": "no syscall of that name",
    "EINVAL": "an argument is missing, unknown, of the wrong type or out of range (the message names it)",
    "EPERM": "the caller's group may not make this syscall or act on that process",
    "EACCES": "another agent's namespace without a grant, or a confirmation denied or timed out",
    "ENOENT": "no such process, model, key, entry, grant or tool",
    "EAGAIN": "the kernel cannot take the request now (a table, queue or rate limit is full): retry later",
    "ETIMEDOUT": "a deadline passed (the kernel did not answer within the client's timeout, or a tool ran long)",
    "EDQUOT": "a quota is exhausted (llm_tokens, storage_mb, storage_keys): retrying does not help",
    "ESTALE": "a compare-and-swap write (if_version) found another version; nothing was written",
    "ETOOL": "a tool failed (raised, crashed or was killed over a limit); only that call",
    "ECANCELED": "the request was cancelled (its process was killed, or the kernel is shutting down)",
    "EIO": "an internal kernel error, or a remote core's server failed; the kernel logged it and keeps serving",
    "ENOTSUP": "the model serving the request cannot do what it asks (a remote core's server lacks the feature)",
}


class SyscallError(Exception):
    """A syscall failed with an ABI error ``code``; ``message`` is the kernel's explanation."""

    code = "EIO"

    def __init__(self, message: str = "", code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


_BY_CODE: dict[str, type[SyscallError]] = {}
for _code in CODES:
    _BY_CODE[_code] = type(_code, (SyscallError,), {
        "code": _code, "__module__": __name__,
        "__doc__": f"ABI error {_code}: {MEANINGS.get(_code, 'see docs/abi.md section 3')}."})
    globals()[_code] = _BY_CODE[_code]


def error_for(code: str, message: str) -> SyscallError:
    """The exception instance for an error reply; an unknown code still becomes a ``SyscallError``."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls else SyscallError(message, code)


EBADMSG: type[SyscallError]
EPROTO: type[SyscallError]
E2BIG: type[SyscallError]
ENOSYS: type[SyscallError]
EINVAL: type[SyscallError]
EPERM: type[SyscallError]
EACCES: type[SyscallError]
ENOENT: type[SyscallError]
EAGAIN: type[SyscallError]
ETIMEDOUT: type[SyscallError]
EDQUOT: type[SyscallError]
ESTALE: type[SyscallError]
ETOOL: type[SyscallError]
ECANCELED: type[SyscallError]
EIO: type[SyscallError]
ENOTSUP: type[SyscallError]
