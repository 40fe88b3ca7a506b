"""Few-shot English -> French translation."""
from agentproc import llm

sentence = "Where is the train station?"
prompt = ("English: Good morning.\nFrench: Bonjour.\n"
          "English: Thank you very much.\nFrench: Merci beaucoup.\n"
          f"English: {sentence}\nFrench:")
answer = llm.generate(prompt, max_tokens=24, stop=["\n"])
print("prompt: translate to French:", sentence)
print("answer:", answer.text.strip())
print("tokens:", answer.usage["completion_tokens"])
