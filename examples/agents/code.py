"""Completes a Python function."""
from agentproc import llm

prompt = 'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n'
answer = llm.generate(prompt, max_tokens=64, stop=["\ndef ", "\nclass "])
print("prompt:", prompt.splitlines()[0])
print("answer:\n" + prompt + answer.text.rstrip())
print("tokens:", answer.usage["completion_tokens"])
