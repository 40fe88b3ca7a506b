"""Streams a story opening token by token (llm.generate with stream=True)."""
from agentproc import llm

prompt = "Once upon a time, in a small village by the sea,"
stream = llm.generate(prompt, max_tokens=48, stream=True)
text = "".join(stream)
print("prompt:", prompt)
print("answer:", text.strip())
print("tokens:", stream.completion.usage["completion_tokens"])
