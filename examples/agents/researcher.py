"""The first half of a two-agent pipeline: writes notes to its storage and lets the agent named "writer" read
them (read-only, the notes/ prefix only).  The grant is the only way another agent reaches its data."""
from agentproc import access, llm, storage

prompt = "Three facts about the Moon:\n1."
facts = llm.generate(prompt, max_tokens=40, stop=["\n4."], temperature=0.0)
note = storage.put("notes/moon.md", prompt + facts.text)
granted = [g for g in access.list()["granted"] if g["to"] == "writer" and g["prefix"] == "notes/"]
grant = granted[0] if granted else access.grant("writer", mode="read", prefix="notes/")  # once, across runs
print("prompt: notes on the Moon, shared with the writer")
print("answer:", f"notes/moon.md v{note.version} ({note.size} bytes); grant {grant['id']}: "
      f"{grant['to']} may {grant['mode']} {grant['prefix']}*")
print("tokens:", facts.usage["completion_tokens"])
