"""The second half of the pipeline: waits until the researcher has shared its notes (EACCES or ENOENT until
then), reads them from the researcher's namespace, and writes a one-line summary into its own storage."""
import time

from agentproc import llm, storage
from agentproc.errors import EACCES, ENOENT

deadline = time.monotonic() + 120
while True:
    try:
        notes = storage.get("notes/moon.md", namespace="researcher").text
        break
    except (EACCES, ENOENT):  # not shared yet, or not written yet
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
lead = "In short, the Moon"
summary = llm.generate(notes.strip() + "\n\n" + lead, max_tokens=32, stop=["\n"], temperature=0.0)
text = lead + summary.text.rstrip()
storage.put("summary.md", text)
print("prompt: summarise the researcher's notes (read through its grant)")
print("answer:", text)
print("tokens:", summary.usage["completion_tokens"])
