"""Does ``kv_unified`` make every sequence's attention walk the whole used KV range?  A bare llama.cpp loop
(bench.llm.BareLoop) decodes ``N_SEQ`` sequences of ``CONTEXT`` distinct tokens each, once with one unified KV
pool and once with one KV stream per sequence, alternating rounds; medians of decode tokens/s
(``python -m bench kvlayout``; docs/engine.md, "KV layout")."""
from __future__ import annotations

import time

from bench.common import median, save
from bench.llm import BareLoop
from kernel import testing

N_SEQ, ROUNDS, DECODE = 32, 2, 24
TEXT = ("The history of the city goes back two thousand years, to a fishing village on the river, and every "
        "street has a story of its own. ")


def main(contexts=(128, 640)) -> dict:
    model_path = testing.model_path()
    res = {"n_seq": N_SEQ, "decode_tokens": DECODE}
    for context in contexts:
        speeds = {"unified": [], "streams": []}
        for _ in range(ROUNDS):
            for name, unified in (("unified", True), ("streams", False)):
                loop = BareLoop(model_path, N_SEQ, n_ctx_seq=1024, n_batch=512, unified=unified)
                try:
                    texts = [f"Text {i}. " + (TEXT * 40)[: context * 4 + 13 * i] for i in range(N_SEQ)]
                    r = loop.run(texts, DECODE)
                finally:
                    loop.close()
                speeds[name].append(r["decode_tokens"] / r["decode_s"])
                print(f"  {context} tokens/seq, {name}: decode {speeds[name][-1]:.0f} tok/s "
                      f"(prefill {r['prefill_tokens'] / r['prefill_s']:.0f} tok/s, {r['prefill_tokens']} tokens)",
                      flush=True)
        res[f"ctx{context}"] = {k: median(v) for k, v in speeds.items()}
        res[f"ctx{context}"]["ratio_streams_over_unified"] = median(speeds["streams"]) / median(speeds["unified"])
    save("kvlayout", res)
    return res


if __name__ == "__main__":
    t = time.time()
    print(main(), time.time() - t)
