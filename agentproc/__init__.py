"""The agent SDK: what an agent program imports to make syscalls.

    from agentproc import llm, proc, ping, storage
    print(llm.generate("The capital of France is", max_tokens=8).text)
    storage.put("notes/today.md", "Paris")

ABI errors are raised as exceptions named after their codes (``agentproc.errors``).
"""
from agentproc import access, errors, llm, memory, proc, storage, tools  # noqa: F401
from agentproc.client import Client, connect, default, ping  # noqa: F401
