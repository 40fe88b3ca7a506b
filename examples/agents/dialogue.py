"""A dialogue as a plain-text transcript.  The default model is a base model: it continues text well but was
never trained on chat turn markers, so llm.chat (which uses them) needs an instruction-tuned model
(aiosd --model PATH); a transcript gets sensible answers from the base model."""
from agentproc import llm, proc

question = "Name three colours of the rainbow."
prompt = ("The following is a conversation with a helpful teacher.\n\n"
          "Student: How many legs does a spider have?\nTeacher: A spider has eight legs.\n"
          f"Student: {question}\nTeacher:")
answer = llm.generate(prompt, max_tokens=32, stop=["\nStudent:", "\n\n"])
me = proc.self()
print("prompt:", question)
print("answer:", answer.text.strip())
print("tokens:", answer.usage["completion_tokens"], f"(agent {me['id']}, group {me['group']})")
