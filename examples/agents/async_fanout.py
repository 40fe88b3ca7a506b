"""Three questions in flight at once from one agent (asyncio): the kernel decodes them in the same batch, so
the three answers take about as long as one."""
import asyncio

from agentproc import llm

QUESTIONS = ["What is the capital of France?", "What is the capital of Spain?", "What is the capital of Peru?"]


async def ask(question: str):
    prompt = f"Q: What is the capital of Italy?\nA: Rome\nQ: {question}\nA:"
    return await llm.agenerate(prompt, max_tokens=8, stop=["\n"])


async def main():
    return await asyncio.gather(*(ask(q) for q in QUESTIONS))

answers = asyncio.run(main())
print("prompt:", " / ".join(QUESTIONS))
print("answer:", " / ".join(a.text.strip() for a in answers))
print("tokens:", sum(a.usage["completion_tokens"] for a in answers))
