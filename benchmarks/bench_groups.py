"""Feature groups on a RAG-style prompt: group occlusion and ContextCite against token occlusion.

Run: python -m benchmarks.bench_groups [--full] [--max-new-tokens 3] [--n-ablations 32]
SmolLM2-135M-Instruct on CPU; a prompt of 8 retrieved documents (blank-line separated) and a
question whose answer one document holds, as the user's turn of the chat template,
`prepare(chat=True, groups="documents")` (the template's tokens are in no group). Quick mode (default)
uses short documents (~240 prompt tokens); `--full` about 1,000 tokens. Each method runs once
(token occlusion is one forward per token: minutes on a CPU), timed in CPU seconds of this
process (`time.process_time`) and wall seconds. Printed: the forwards each method needs, the
seconds, and which document each ranks first; the answer's document is the fourth.
"""

import argparse

import torch

import fnattr
from benchmarks._common import load, timed
from fnattr.context import context_cite
from fnattr.methods import occlusion

TOPICS = [
    ("The river Alden", "flows north through the valley of Mersh before it reaches the sea at Port Ilva"),
    ("The Kestrel bridge", "was built of grey granite in the year 1843 and has seven arches"),
    ("The town of Brannock", "holds a wool market every spring and is known for its blue doors"),
    ("The capital of Zorbania", "is the city of Quillon, which lies on a high plateau"),
    ("The Varden orchestra", "plays in a hall of pale wood that seats nine hundred people"),
    ("Mount Ostrel", "is a dormant volcano whose last eruption was over four thousand years ago"),
    ("The Lune railway", "links eleven villages along the coast with a narrow-gauge line"),
    ("The Amber library", "keeps a collection of maps drawn by sailors of the northern seas"),
]
FILLER = [
    "Travellers often describe it in letters to their families.",
    "Local guides tell many stories about its early history.",
    "It appears on old postcards sold in the shops nearby.",
    "Schoolchildren visit it on trips every autumn.",
    "Its name comes from an old word of the region.",
    "Several books have been written about it over the years.",
    "The weather there changes quickly in the afternoon.",
    "People from the surrounding farms come to see it on holidays.",
]
QUESTION = "Question: What is the capital of Zorbania?\nAnswer:"


def prompt(sentences_per_doc: int) -> str:
    docs = []
    for i, (subject, fact) in enumerate(TOPICS):
        filler = [FILLER[(i + j) % len(FILLER)] for j in range(sentences_per_doc)]
        docs.append(" ".join([f"{subject} {fact}.", *filler]))
    return "\n\n".join(docs) + "\n\n" + QUESTION


def top(out, row: int = 0) -> int:
    """The document with the largest total score over the steps."""
    g = out.grouped()
    return int(g.source[row].sum(0)[:8].argmax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="~1,000 prompt tokens (default ~240)")
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--n-ablations", type=int, default=32)
    parser.add_argument("--skip-tokens", action="store_true", help="leave out token occlusion")
    args = parser.parse_args()
    model, tok = load()
    text = prompt(14 if args.full else 2)
    batch = fnattr.prepare(model, tok, text, max_new_tokens=args.max_new_tokens, chat=True,
                           groups="documents")
    fnattr.compute_step_scores(model, batch, ["logprob"])  # warm-up: the first forward is slower
    n_src = int(batch.source_mask.sum())
    n_groups = len(batch.source_group_texts[0])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; prompt {n_src} tokens "
          f"(chat template included) in {n_groups} groups ({n_groups - 1} documents + the question); generated "
          f"{batch.targets[0]!r}", flush=True)
    plain = fnattr.groups.ungrouped(batch)
    runs = {
        "group occlusion": (n_groups, lambda: occlusion(model, batch, attribute_target=False)),
        f"context_cite ({args.n_ablations} + 8 held out)": (
            args.n_ablations + 8,
            lambda: context_cite(model, batch, n_ablations=args.n_ablations, n_heldout=8, seed=0,
                                 spans="all")),
    }
    if not args.skip_tokens:
        runs["token occlusion"] = (n_src, lambda: occlusion(model, plain, attribute_target=False))
    seconds = {}
    for name, (copies, fn) in runs.items():
        wall, cpu, out = timed(fn)
        seconds[name] = cpu
        if name == "token occlusion":
            out = out.grouped("documents")  # its tokens summed per document (post hoc)
        extra = f", held-out LDS {out.meta['lds']}" if "lds" in out.meta else ""
        print(f"{name}: {copies} perturbed forwards, {cpu:.1f} CPU s ({wall:.1f} s wall); "
              f"top group {top(out)}{extra}", flush=True)
    if "token occlusion" in seconds:
        base = seconds["token occlusion"]
        print("CPU seconds against token occlusion: " + ", ".join(
            f"{name} {base / s:.0f}x less" for name, s in seconds.items() if name != "token occlusion"))


if __name__ == "__main__":
    main()
