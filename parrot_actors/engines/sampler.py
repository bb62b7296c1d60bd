"""Picking the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Sources: top-k (Fan et al., 2018), nucleus sampling (Holtzman et al., ICLR 2020, §3.1). Each
request carries its own `torch.Generator`, so a seeded request samples the same tokens whatever
else is in the batch. Seeds outside torch's range are rejected by `SamplingParams.validate`.
"""

from __future__ import annotations

import torch

from parrot_actors.errors import SamplingError
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


def token_logprobs(
    logits: torch.Tensor, sampling: SamplingParams, token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` and the `top` most likely (token id, log-probability)
    pairs: log-softmax in float64 of `logits` `[vocab_size]` divided by the temperature (the raw
    logits when greedy), before top-k and top-p, as OpenAI's `logprobs` report them."""
    scaled = logits.detach().to("cpu", torch.float64)
    if sampling.temperature > 0.0:
        scaled = scaled / sampling.temperature
    lp = torch.log_softmax(scaled, dim=-1)
    best = torch.topk(lp, top) if top else None
    pairs = (
        [(int(i), float(v)) for v, i in zip(best.values, best.indices)] if best is not None else []
    )
    return float(lp[token]), pairs


def sample(logits: torch.Tensor, sampling: SamplingParams, gen: torch.Generator | None) -> int:
    """The next token id from one row of logits.

    logits: `[vocab_size]` (any float dtype, any device). Greedy (argmax, lowest id on ties)
    when temperature is 0; otherwise softmax(logits / temperature) restricted to the top_k most
    likely tokens and to the smallest set whose probability mass reaches top_p, then one
    multinomial draw on the CPU.

    Numerically safe for every value `SamplingParams.validate` accepts: the arithmetic is in
    float64 after subtracting the maximum (so a temperature of 1e-300 gives 0 for the best
    token and -inf for the rest, never NaN), and the most likely token always survives top-p
    (so top_p=1e-300 is greedy rather than an empty distribution). Raises `SamplingError` for
    logits that hold NaN (a numerical fault of the model, reported for this request only).
    """
    if bool(torch.isnan(logits).any()):
        raise SamplingError("the model's logits contain NaN")
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits.detach().to("cpu", torch.float64)
    scaled = (logits - logits.max()) / sampling.temperature  # [vocab], max entry is 0
    if 0 < sampling.top_k < scaled.numel():
        kth = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [vocab]
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # Keep a token if the mass before it is below top_p; the first is kept explicitly,
        # since for a tiny top_p the comparison alone would drop it too.
        drop = (cum - sorted_p) >= sampling.top_p
        drop[0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
