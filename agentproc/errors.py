"""ABI errors as Python exceptions (docs/abi.md section 3): ``except EPERM:``, ``except SyscallError:``."""
from syscalls.errors import (  # noqa: F401
    CODES, E2BIG, EACCES, EAGAIN, EBADMSG, ECANCELED, EDQUOT, EINVAL, EIO, ENOENT, ENOSYS, EPERM, EPROTO,
    ENOTSUP, ESTALE, ETIMEDOUT, ETOOL, SyscallError, error_for,
)

__all__ = ["SyscallError", *CODES, "error_for"]
