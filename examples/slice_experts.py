"""Run fewer experts per token than the model was trained with, and see what it costs in
perplexity.

- soft: top-k over all router probabilities with the smaller k, weights renormalized as the model
  does: what llama.cpp computes with --override-kv qwen3moe.expert_used_count=int:k.
- hard: the model's own top-4 is computed and weighted as trained; only its best k experts run,
  with their original weights (no renormalization).

    python examples/slice_experts.py
"""
import moegraph
from moegraph.data import DEFAULT_MODEL
from moegraph.dump import fmt_shape
from moegraph.passes import run_passes

# Held-out text: Revelation 21:1-7 (KJV); the model never saw Colossians .. Revelation.
TEXT = """\
And I saw a new heaven and a new earth: for the first heaven and the first earth were passed away; and there was no more sea.
And I John saw the holy city, new Jerusalem, coming down from God out of heaven, prepared as a bride adorned for her husband.
And I heard a great voice out of heaven saying, Behold, the tabernacle of God is with men, and he will dwell with them, and they shall be his people, and God himself shall be with them, and be their God.
And God shall wipe away all tears from their eyes; and there shall be no more death, neither sorrow, nor crying, neither shall there be any more pain: for the former things are passed away.
And he that sat upon the throne said, Behold, I make all things new. And he said unto me, Write: for these words are true and faithful.
And he said unto me, It is done. I am Alpha and Omega, the beginning and the end. I will give unto him that is athirst of the fountain of the water of life freely.
He that overcometh shall inherit all things; and I will be his God, and he shall be my son.
"""
CTX = 64
BACKEND = "numpy"   # the reference interpreter compiles at once; "llvm" is native, but compiles
                    # each new graph (each k here) for a while before its first run

model = moegraph.load(DEFAULT_MODEL)
k_model = model.config.n_expert_used
ids = model.tokenizer.encode(TEXT)
print(f"{model.path.name}: {model.config.n_expert} experts, top-{k_model}; "
      f"text: {len(ids)} tokens, {len(ids) // CTX} chunks of {CTX}")

# What the pass changes in the graph: soft rewrites TOP_K's k; hard keeps TOP_K and slices the
# ids and the weights that feed the experts.
for mode in ("soft", "hard"):
    g = run_passes(model.graph(n_ctx=CTX), [("slice_experts", {"n_expert_used": 2, "mode": mode})])
    top_k = next(n for n in g.toposort() if n.op == "TOP_K")              # layer 0's router
    experts = [n for n in g.toposort() if n.op == "MUL_MAT_ID"][:3]        # its gate, up, down
    ids_node = experts[0].inputs[2]
    print(f"  {mode} k=2, layer 0: TOP_K k={top_k.attrs['k']}; expert matmuls read ids "
          f"{ids_node.op}{fmt_shape(ids_node.shape)} -> {fmt_shape(experts[-1].shape)}")

print(f"\n{'experts':<22}{'perplexity':>11}{'vs full':>9}")
base = None
for k, mode in [(k_model, "soft"), (2, "soft"), (2, "hard"), (1, "soft"), (1, "hard")]:
    # n_expert_used=... appends ("slice_experts", {"n_expert_used": k, "mode": mode}) to the passes
    session = model.compile(backend=BACKEND, n_ctx=CTX, n_expert_used=k, slice_mode=mode)
    ppl = session.perplexity(ids, ctx=CTX).ppl
    base = base or ppl
    label = f"k={k}" + (" (the model's)" if k == k_model else f", {mode}")
    print(f"{label:<22}{ppl:>11.2f}{ppl / base - 1:>+9.1%}")

# One k per layer (a list, or a dict layer -> k): keep 4 experts early, fewer later.
session = model.compile(backend=BACKEND, n_ctx=CTX,
                        passes=[("slice_experts", {"n_expert_used": [4, 4, 2, 2]})])
ppl = session.perplexity(ids, ctx=CTX).ppl
print(f"{'k=[4, 4, 2, 2], soft':<22}{ppl:>11.2f}{ppl / base - 1:>+9.1%}")
