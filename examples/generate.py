"""Load a GGUF model, look at next-token logits, generate text and measure perplexity.

    python examples/generate.py                   # the bundled tiny MoE, NumPy reference backend
    python examples/generate.py MODEL.gguf llvm   # any supported GGUF, another backend
"""
import sys

import numpy as np

import moegraph
from moegraph.data import DEFAULT_MODEL

# Held-out text: Hebrews 11:1-6 (KJV). The bundled model was trained on Genesis .. Philippians,
# so this text is new to it.
HELDOUT = """\
Now faith is the substance of things hoped for, the evidence of things not seen.
For by it the elders obtained a good report.
Through faith we understand that the worlds were framed by the word of God, so that things which are seen were not made of things which do appear.
By faith Abel offered unto God a more excellent sacrifice than Cain, by which he obtained witness that he was righteous, God testifying of his gifts: and by it he being dead yet speaketh.
By faith Enoch was translated that he should not see death; and was not found, because God had translated him: for before his translation he had this testimony, that he pleased God.
But without faith it is impossible to please him: for he that cometh to God must believe that he is, and that he is a rewarder of them that diligently seek him.
"""

path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
backend = sys.argv[2] if len(sys.argv) > 2 else "numpy"   # None = the default (llvm where it works)

# 1. Load: metadata and memory-mapped tensors; nothing is copied or dequantized yet.
model = moegraph.load(path)
c = model.config
print(f"model: {model.path.name}: {c.arch}, {c.n_layer} layers, n_embd {c.n_embd}, "
      f"{c.n_expert} experts (top-{c.n_expert_used}), vocab {c.n_vocab}")

# 2. Compile: build the graph, (run passes,) hand it to a backend. The session owns the KV cache.
#    The NumPy reference backend compiles at once; llvm compiles native code (cached on disk).
session = model.compile(backend=backend, n_ctx=128)
print(f"backend: {session.backend}, compiled in {session.compile_s:.2f} s")

# 3. One forward step over a prompt: logits for every position, [n_tokens, n_vocab].
tok = model.tokenizer
ids = tok.encode("In the beginning God created the heaven")
logits = session.forward(ids)
top = np.argsort(-logits[-1])[:5]
print(f"prompt: {len(ids)} tokens -> logits {logits.shape}; most likely next tokens: "
      + ", ".join(repr(tok.decode([int(t)])) for t in top))
logits = session.forward([int(top[0])])          # continues from the KV cache
print(f"after one more token the session holds {session.n_past} tokens")

# 4. Streaming generation. generate() resets the cache and starts from the prompt.
for label, kw in (("greedy", {"temperature": 0}), ("sampled", {"temperature": 0.8, "seed": 1})):
    text = "".join(session.generate("And God said", max_tokens=24, **kw))
    st = session.stats
    print(f"{label}: And God said{text}".replace("\n", " / "))  # one verse a line
    print(f"    {st.n_prompt} prompt tokens at {st.prompt_tps:.0f} tok/s, "
          f"{st.n_generated} generated at {st.generate_tps:.1f} tok/s")

# 5. Perplexity, llama-perplexity's protocol: chunks of `ctx` tokens, each from an empty cache,
#    the second half of each chunk scored.
res = session.perplexity(HELDOUT, ctx=64)
print(f"perplexity on Hebrews 11:1-6: {res.ppl:.2f} ({res.n_predictions} predictions in "
      f"{len(res.chunk_nll)} chunks of 64 tokens, {res.seconds:.1f} s)")
