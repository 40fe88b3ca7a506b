"""Few-shot question answering on the base model; stops at the end of the answer line."""
from agentproc import llm

question = "What is the capital of France?"
prompt = ("Q: What is the capital of Italy?\nA: Rome\n"
          "Q: What is the capital of Japan?\nA: Tokyo\n"
          f"Q: {question}\nA:")
answer = llm.generate(prompt, max_tokens=16, stop=["\n"])
print("prompt:", question)
print("answer:", answer.text.strip())
print("tokens:", answer.usage["completion_tokens"])
