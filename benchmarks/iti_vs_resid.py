"""ITI beside residual steering on the default model: sentiment, held-out prompts, with damage.

``python -m benchmarks.iti_vs_resid`` (about 2 minutes on 2 CPU cores). Both vectors come from
the builtin sentiment dataset's train split (seed 0, 75 %); effect and damage are measured on
24 of the shipped neutral sentiment prompts, which neither vector saw:

* shift: mean over prompts of log P(positive words) - log P(negative words) at the next token;
* KL: mean KL(unsteered || steered) of that next-token distribution.

Residual: ``mean_diff`` at layer 15 (the middle of 30). ITI: ``iti_vector`` with the 16 heads
(of 30 x 9) whose held-out probe accuracy is highest. Printed as one table; docs/sites.md
quotes a run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import steerlab as sl
from steerlab import data


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    model = sl.load_model()
    train, _ = data.load_builtin("sentiment").split(test_fraction=0.25, seed=0)
    held_out = data.neutral_prompts("sentiment")[:24]
    pos_words, neg_words = data.concept_words("sentiment")
    tok = model.tokenizer
    pos = [tok(w, add_special_tokens=False)["input_ids"][0] for w in pos_words]
    neg = [tok(w, add_special_tokens=False)["input_ids"][0] for w in neg_words]
    base = model.next_token_logits(held_out).log_softmax(-1)

    def measure(steering: Any) -> tuple[float, float]:
        logp = model.next_token_logits(held_out, steering=steering).log_softmax(-1)
        shift = float((logp[:, pos].logsumexp(-1) - logp[:, neg].logsumexp(-1)).mean())
        kl = float((base.exp() * (base - logp)).sum(-1).mean())
        return shift, kl

    resid = sl.mean_diff(model, list(train.positive), list(train.negative), layers=[15])
    iti = sl.iti_vector(model, list(train.positive), list(train.negative), k=16)
    print(f"unsteered shift {measure(None)[0]:.3f}; ITI heads {iti.metadata['heads']}")
    print("| vector | strength | shift (+s) | KL (+s) | shift (-s) | KL (-s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, vec, strengths in (
        ("resid L15 mean_diff", resid, (0.5, 1.0, 2.0, 4.0)),
        ("ITI k=16", iti, (1.0, 2.0, 4.0, 8.0)),
    ):
        for s in strengths:
            up = measure(sl.Steering(vec, strength=s))
            down = measure(sl.Steering(vec, strength=-s))
            print(f"| {name} | {s:g} | {up[0]:.2f} | {up[1]:.3f} | {down[0]:.2f} | {down[1]:.3f} |")
    print(f"wall {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
