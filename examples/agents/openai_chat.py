"""An agent written for the official OpenAI client, unmodified: no key, no URL, no network -- the kernel answers
it over the agent's own connection (docs/sdk.md).  Few-shot turns help the base model stay short."""
from openai import OpenAI

client = OpenAI()
question = "What is the capital of Japan?"
reply = client.chat.completions.create(
    model="gpt-4o-mini",  # a name this kernel does not serve: its default model answers (reply.model says so)
    messages=[{"role": "user", "content": "What is the capital of Italy?"},
              {"role": "assistant", "content": "Rome."},
              {"role": "user", "content": question}],
    max_tokens=12, temperature=0, stop=["\n"])
print("prompt:", question)
print("answer:", reply.choices[0].message.content.strip(), f"(model {reply.model})")
print("tokens:", reply.usage.completion_tokens)
