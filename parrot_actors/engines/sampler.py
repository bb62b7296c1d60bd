"""Picking the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Sources: top-k (Fan et al., 2018), nucleus sampling (Holtzman et al., ICLR 2020, §3.1). Each
request carries its own `torch.Generator`, so a seeded request samples the same tokens whatever
else is in the batch.
"""

from __future__ import annotations

import torch

from parrot_actors.messages import SamplingParams


def make_generator(sampling: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded with `sampling.seed` (a fresh random seed when None); None for
    greedy requests, which need no randomness."""
    if sampling.temperature == 0.0:
        return None
    gen = torch.Generator()
    if sampling.seed is None:
        gen.seed()
    else:
        gen.manual_seed(sampling.seed)
    return gen


def sample(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator | None) -> int:
    """The next token id from one row of logits.

    logits: float32 `[vocab_size]`. Greedy (argmax, lowest id on ties) when temperature is 0;
    otherwise softmax(logits / temperature) restricted to the top_k most likely tokens and to
    the smallest set whose probability mass reaches top_p, then one multinomial draw on the CPU.
    """
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    # Subtract the max first: with a tiny temperature the division would overflow to inf and
    # softmax would return NaN; this way the best token is 0 and the rest go to -inf at worst.
    logits = logits.float().cpu()
    scaled = (logits - logits.max()) / sampling.temperature  # [vocab]
    if sampling.top_k > 0 and sampling.top_k < scaled.numel():
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [vocab]
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # Keep a token if the mass before it is below top_p (so the first always stays).
        drop = (cum - sorted_p) >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
