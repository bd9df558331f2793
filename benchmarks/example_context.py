"""The small RAG example of docs/context.md on the demo model (SmolLM2-135M-Instruct, CPU).

Run: python -m benchmarks.example_context
"""

import time

import fnattr
from fnattr.context import context_cite, pecore, describe
model, tok = fnattr.load_model()
docs = ["The Eiffel Tower is in Paris. It was finished in 1889.",
        "Mount Fuji is the highest mountain in Japan. It last erupted in 1707.",
        "The Great Wall of China is thousands of kilometres long."]
question = "When did Mount Fuji last erupt?"
prompt = "\n\n".join(docs) + "\n\n" + question
t = time.process_time()
batch = fnattr.prepare(model, tok, prompt, chat=True, groups="documents", max_new_tokens=12)
print("answer:", repr(batch.targets[0]), "groups:", batch.source_group_texts[0], f"{time.process_time()-t:.1f} CPU s", flush=True)
t = time.process_time()
out = context_cite(model, batch, n_ablations=32, n_heldout=8, seed=0)
print(f"context_cite: {time.process_time()-t:.1f} CPU s; lds {out.meta['lds']}", flush=True)
for c in out.citations(k=2):
    print(c)
t = time.process_time()
occ = fnattr.methods.occlusion(model, batch, attribute_target=False)
print(f"group occlusion: {time.process_time()-t:.1f} CPU s", flush=True)
for c in occ.citations(k=2):
    print(c)
fnattr.render.console(out)
t = time.process_time()
pc = pecore(model, tok, context=" ".join(docs), input=question, max_new_tokens=12, groups="sentences", chat=True)
print(f"pecore: {time.process_time()-t:.1f} CPU s", flush=True)
print(describe(pc))
