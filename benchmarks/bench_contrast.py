"""Step scores and contrastive attribution: one pass vs per-step loops of the same computation.

Run: OMP_NUM_THREADS=1 python -m benchmarks.bench_contrast [--n-mcd-steps 8]. Every ratio compares
runs made in this one process, on SmolLM2-135M, 20 prompt + 20 forced target tokens.
"""

import argparse

import torch

import fnattr
from benchmarks._common import PROMPT, TARGET, best_time, load, n_tokens
from fnattr import targets
from fnattr.api import compute_step_scores
from fnattr.contrast import Contrast, prepare_contrast
from fnattr.methods import saliency

CONTRAST = (" The Thames flows through London, which grew from a small Roman town into the "
            "great capital of England")
PLAIN = sorted(targets.TARGETS)


def _prefix(model, tok, ids, t):
    batch = fnattr.prepare(model, tok, PROMPT, tok.decode(ids[: t + 1]))
    assert batch.target_ids[0].tolist() == ids[: t + 1], "prefix does not re-tokenize the same"
    return batch


def contrast_loop(model, tok, contrast: Contrast):
    """Per step t: one no-grad forward of the contrast prefix, then saliency of step t alone."""
    full = fnattr.prepare(model, tok, PROMPT, TARGET)
    ids = full.target_ids[0].tolist()
    c_ids = tok(CONTRAST, add_special_tokens=False)["input_ids"]
    prompt = full.source_ids[0].tolist()
    outs = []
    for t, c in contrast.alignments[0]:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c_ids[:c]])).logits[:, -1]
        batch = _prefix(model, tok, ids, t)
        step = Contrast(logits=logits[:, None].expand(1, t + 1, -1).contiguous(),
                        ids=torch.full((1, t + 1), c_ids[c]), target_ids=batch.target_ids,
                        alignments=((),))
        outs.append(saliency(model, batch, targets.contrast_prob_diff(step), attr_pos_start=t,
                             attr_pos_end=t + 1))
    return outs


def contrastive(model, tok, batch) -> None:
    def one_pass():
        contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRAST,
                                    contrast_targets_alignments="auto", contrast_context="own")
        return saliency(model, batch, targets.contrast_prob_diff(contrast))

    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRAST,
                                contrast_targets_alignments="auto", contrast_context="own")
    t_one = best_time(one_pass)
    t_loop = best_time(lambda: contrast_loop(model, tok, contrast), repeat=1)
    one, loop = one_pass(), contrast_loop(model, tok, contrast)
    diff = max(float((one.source[0, t] - o.source[0, 0]).abs().max() / o.source[0, 0].abs().max())
               for t, o in enumerate(loop))
    score = max(abs(float(one.step_scores["contrast_prob_diff"][0, t]
                          - o.step_scores["contrast_prob_diff"][0, 0])) for t, o in enumerate(loop))
    print(f"contrastive saliency (prepare_contrast + one pass) {t_one:6.2f}s  per-step loop "
          f"{t_loop:6.2f}s  speed-up {t_loop / t_one:5.1f}x  max rel diff {diff:.1e}  "
          f"max score diff {score:.1e}")


def step_scores(model, tok, batch) -> None:
    contrast = prepare_contrast(model, tok, batch, contrast_targets=CONTRAST,
                                contrast_targets_alignments="auto", contrast_context="own")
    extra = [*PLAIN, *(f(contrast) for f in targets.CONTRAST_TARGETS.values())]
    t_plain = best_time(lambda: saliency(model, batch), repeat=3)
    t_with = best_time(lambda: saliency(model, batch, step_scores=extra), repeat=3)
    t_alone = best_time(lambda: compute_step_scores(model, batch, extra), repeat=3)
    ids = batch.target_ids[0].tolist()
    prefixes = [_prefix(model, tok, ids, t) for t in range(len(ids))]
    t_loop = best_time(lambda: [compute_step_scores(model, b, PLAIN, attr_pos_start=t)
                                for t, b in enumerate(prefixes)], repeat=1)
    t_one = best_time(lambda: compute_step_scores(model, batch, PLAIN), repeat=3)
    print(f"saliency + {len(extra)} step scores / saliency alone: {t_with / t_plain:5.2f}x  "
          f"(step scores alone: {t_alone / t_plain:4.2f}x of a saliency run)")
    print(f"{len(PLAIN)} step scores, one forward {t_one:6.3f}s  per-step loop of forwards "
          f"{t_loop:6.3f}s  speed-up {t_loop / t_one:5.1f}x")


def mc_dropout(model, tok, batch, n: int) -> None:
    # SmolLM2 (a Llama) has no nn.Dropout module: add one after the final norm, for this timing only
    model.model.norm = torch.nn.Sequential(model.model.norm, torch.nn.Dropout(0.1))
    t_one = best_time(lambda: targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=n), repeat=2)
    t_loop = best_time(lambda: [targets.mc_dropout_prob_avg(model, batch, n_mcd_steps=1, seed=s)
                                for s in range(n)], repeat=1)
    print(f"mc_dropout_prob_avg, {n} samples as copies in one forward {t_one:6.2f}s  "
          f"{n} separate forwards {t_loop:6.2f}s  speed-up {t_loop / t_one:4.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-mcd-steps", type=int, default=8)
    args = parser.parse_args()
    model, tok = load()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"prompt tokens {n_tokens(tok, PROMPT, True)}, target tokens {n_tokens(tok, TARGET, False)}")
    batch = fnattr.prepare(model, tok, PROMPT, TARGET)
    step_scores(model, tok, batch)
    contrastive(model, tok, batch)
    mc_dropout(model, tok, batch, args.n_mcd_steps)


if __name__ == "__main__":
    main()
