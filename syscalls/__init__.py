"""The syscall ABI (docs/abi.md): error codes, the wire codec, argument schemas and the syscall table.

Both sides use this package: the kernel to decode, check and dispatch; the SDK in ``agentproc`` to encode
requests and raise errors.  It imports nothing from ``kernel``.
"""
