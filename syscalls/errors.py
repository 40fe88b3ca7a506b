"""ABI error codes (docs/abi.md section 3) and the exceptions named after them.

The kernel raises ``SyscallError`` subclasses in handlers; the router turns them into error replies.  The SDK
raises the same classes from error replies, so an agent writes ``except EPERM:``.
"""
from __future__ import annotations

CODES = (
    "EBADMSG", "EPROTO", "E2BIG", "ENOSYS", "EINVAL", "EPERM", "EACCES", "ENOENT",
    "EAGAIN", "ETIMEDOUT", "EDQUOT", "ESTALE", "ETOOL", "ECANCELED", "EIO", "ENOTSUP",
)


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
    _BY_CODE[_code] = type(_code, (SyscallError,), {"code": _code, "__module__": __name__})
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
