"""Picking the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Sources: top-k (Fan et al., 2018), nucleus sampling (Holtzman et al., ICLR 2020, §3.1). Each
request carries its own `torch.Generator`, so a seeded request samples the same tokens whatever
else is in the batch. Seeds outside torch's range are rejected by `SamplingParams.validate`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    token = sample_rows(logits[None], [sampling], [gen])[0]
    if token < 0:
        raise SamplingError("the model's logits contain NaN")
    return token


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    gens: Sequence[torch.Generator | None],
) -> list[int]:
    """The next token of every row of a step's logits, with one host transfer for them all.

    logits: `[rows, vocab_size]` (any float dtype, any device); params, gens: one per row
    (`make_generator`). Returns one token id per row, -1 for a row whose logits hold NaN. Each
    row gets what `sample` documents: greedy rows their argmax (lowest id on ties); the others
    float64 softmax(logits / temperature) after top_k, top_p, then one `torch.multinomial`
    draw from the row's own generator, so a seeded row's token does not depend on the other
    rows. The arithmetic is batched; only top_k, top_p (where set) and the draw run per row.
    """
    rows = logits.shape[0]
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    drawn = [i for i, p in enumerate(params) if p.temperature != 0.0]
    out = [0] * rows
    if greedy:
        sub = logits[greedy] if len(greedy) < rows else logits
        picked = torch.where(torch.isnan(sub).any(dim=1), -1, sub.argmax(dim=1))
        for i, t in zip(greedy, picked.tolist()):
            out[i] = t
    if not drawn:
        return out
    x = (logits[drawn] if len(drawn) < rows else logits).detach().to("cpu", torch.float64)
    bad = torch.isnan(x).any(dim=1).tolist()  # on the host copy: no second transfer
    temps = torch.tensor([params[i].temperature for i in drawn], dtype=torch.float64)
    # [drawn, vocab]; each row's max entry is 0 (NaN rows are dropped below).
    scaled = (x - x.max(dim=1, keepdim=True).values) / temps[:, None]
    vocab = scaled.shape[1]
    for r, i in enumerate(drawn):
        k = params[i].top_k
        if 0 < k < vocab:
            kth = torch.topk(scaled[r], k).values[-1]
            scaled[r].masked_fill_(scaled[r] < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [drawn, vocab]
    for r, i in enumerate(drawn):
        if bad[r]:
            out[i] = -1
            continue
        row = probs[r]
        top_p = params[i].top_p
        if top_p < 1.0:
            sorted_p, order = torch.sort(row, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            # Keep a token if the mass before it is below top_p; the first is kept explicitly,
            # since for a tiny top_p the comparison alone would drop it too.
            drop = (cum - sorted_p) >= top_p
            drop[0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            row = torch.zeros_like(row).scatter_(0, order, sorted_p)
        out[i] = int(torch.multinomial(row, 1, generator=gens[i]))
    return out
