"""The simulated engine's model runner: no weights, deterministic tokens, steps timed by the
step-time model.

`EngineConfig(device="sim", sim=SimConfig(gpu=..., model=...))` builds the real `EngineCore`
(block pool, contexts, fork, automatic prefix caching, chunked prefill, preemption, eviction,
retention) and the real `Engine` loop and supervisor around this runner instead of
`LlamaRunner`. Each step's forward pass is replaced by:

- KV: the cache holds each position's token id (`[num_blocks, 1, block_size]` int32), written
  at the slots the step's block tables give, exactly where a model would write K and V. Forks
  share those blocks and copy a partial one through the core's own code, and prefix-cache hits
  reuse them, so a bug in the KV manager shows up as different tokens.
- The next token: a hash of the last `CONTEXT_WINDOW` token ids read back from the cache
  through the block table and of the context length, mapped onto plain lowercase word pieces
  of the tokenizer (no EOS, no newline: outputs run to `max_tokens` unless the request's own
  stop rules end them, as the paper's workloads do). A fork, a cache hit and a recomputation
  after preemption therefore give the same tokens, and two modes compare token for token.
- Time: the engine loop sleeps `step_seconds(plan)`, the step-time model's prediction for the
  step's shape (`engines/step_time.py`), on the process clock: simulated under
  `parrot_actors.simtime`, real otherwise (`parrot-actors serve --sim`).

KV capacity is `kv_cache_gb` (default: what the device's memory leaves after the weights, see
`StepTimeModel.default_kv_cache_bytes`) over the model's real KV bytes per token, so memory
limits appear where they would on the GPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from parrot_actors.cuda.layout import BatchLayout
from parrot_actors.engines.api import Tokenizer
from parrot_actors.engines.core import step_shape
from parrot_actors.engines.step_fit import load_fit
from parrot_actors.engines.step_time import StepTimeModel
from parrot_actors.errors import InvalidRequestError

CONTEXT_WINDOW = 4
"""Tokens before the next one that its hash reads (with the context length)."""
LOGIT = 30.0
"""The chosen token's logit (all others 0): softmax puts all but ~1e-8 of the mass on it at
temperature 1, so sampled requests draw it too."""
SIM_MAX_LEN = 32768
"""Positions a simulated context may hold by default (tokens). The paper ran prompts longer than
Vicuna's 2048 positions (Fig. 14: 5,224-7,492 tokens), and positions cost no step time here."""


class SimConfig(msgspec.Struct, kw_only=True):
    """What a simulated engine simulates.

    gpu: a device of the step-time model ("a100-80gb", "a6000", "h100", or "cpu-fitted" with
    `fit`). model: a named shape ("llama-2-7b", "vicuna-13b", "llama-3-8b", ...) or the path
    of a Hugging Face config.json (or its folder). dtype: weights and KV ("float16",
    "bfloat16", "float32", "int8" weights). kv_cache_gb: KV cache per GPU (GB, 1e9 bytes;
    None: the device's memory at 90% minus the weights' share). kv_tokens: cap the KV cache at
    this many tokens instead (the paper's latency-tuned vLLM: 4096). tensor_parallel: GPUs per
    engine. fit: JSON file of a fitted step-time model (`step_time.save_fit`), needed by
    "cpu-fitted". tokenizer: the tokenizer's model ("default": the embedded SmolLM2's; token
    counts of prompts follow it). max_len: positions per context (tokens; None:
    `SIM_MAX_LEN`).
    """

    gpu: str = "a100-80gb"
    model: str = "llama-2-7b"
    dtype: str = "float16"
    kv_cache_gb: float | None = None
    kv_tokens: int | None = None
    tensor_parallel: int = 1
    fit: str | None = None
    tokenizer: str = "default"
    max_len: int | None = None

    def step_model(self) -> StepTimeModel:
        """The step-time model this config names. Raises `InvalidRequestError` for an unknown
        device or model, a missing fit, or profiles that cannot be found."""
        if self.tensor_parallel < 1:
            raise InvalidRequestError(f"tensor_parallel={self.tensor_parallel}: must be >= 1")
        if self.gpu == "cpu-fitted":
            if self.fit is None:
                raise InvalidRequestError(
                    "gpu='cpu-fitted' needs fit=PATH, a step-time fit saved by "
                    "benchmarks/step_time_calibration.py"
                )
            return load_fit(Path(self.fit))
        return StepTimeModel.for_device(
            self.gpu, self.model, dtype=self.dtype, tensor_parallel=self.tensor_parallel
        )

    def kv_cache_bytes(self, model: StepTimeModel) -> int:
        """KV cache bytes per GPU: `kv_tokens` tokens' worth, else `kv_cache_gb`, else what
        the device leaves. Raises `InvalidRequestError` for values <= 0."""
        if self.kv_tokens is not None:
            if self.kv_tokens <= 0:
                raise InvalidRequestError(f"kv_tokens={self.kv_tokens}: must be > 0")
            return self.kv_tokens * int(model.model.kv_bytes_per_token(self.tensor_parallel))
        if self.kv_cache_gb is not None:
            if self.kv_cache_gb <= 0:
                raise InvalidRequestError(f"kv_cache_gb={self.kv_cache_gb}: must be > 0")
            return int(self.kv_cache_gb * 1e9)
        if model.device is None:
            raise InvalidRequestError(f"gpu={self.gpu!r}: give kv_cache_gb (no device memory)")
        return int(model.default_kv_cache_bytes())


def word_palette(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """Ids `[n]` (int64) of the tokens that are a space and 3+ lowercase letters (byte-level
    BPE's "Ġword" or SentencePiece's "▁word"): what simulated outputs are made of, so their
    text has no newline, stop sequence or special token. Raises `InvalidRequestError` when the
    tokenizer has fewer than 16 such tokens."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    pieces: Sequence[Any] = convert(list(range(vocab_size))) if convert else []
    word = re.compile(r"^[\u0120\u2581][a-z]{3,}$")
    ids = [i for i, p in enumerate(pieces) if isinstance(p, str) and word.match(p)]
    if len(ids) < 16:
        raise InvalidRequestError(
            f"the tokenizer has {len(ids)} plain word tokens; the simulated engine needs 16+"
        )
    return np.asarray(ids, dtype=np.int64)


class SimRunner:
    """The model runner of a simulated engine (see the module docstring); the `ModelRunner`
    contract of `EngineCore`.

    Attributes: `step_model` (the `StepTimeModel`), `vocab_size` (the tokenizer's: the token
    space of prompts), `max_len` (tokens), `eos_token_ids` (none), `row_tokens` (the last
    step's next token per logits row), `simulated_s` (the predicted steps' total, seconds).
    """

    def __init__(self, config: SimConfig, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.config = config
        self.step_model = config.step_model()
        self.vocab_size = vocab_size
        self.max_len = config.max_len or SIM_MAX_LEN
        if self.max_len < 2:
            raise InvalidRequestError(f"max_len={self.max_len}: must be >= 2")
        self.eos_token_ids: tuple[int, ...] = ()
        self.row_tokens: list[int] | None = []
        self.palette = word_palette(tokenizer, vocab_size)
        self.simulated_s = 0.0

    def kv_bytes_per_block(self, block_size: int) -> int:
        """KV bytes of one block of `block_size` tokens on one GPU of the simulated model."""
        tp = self.config.tensor_parallel
        return int(self.step_model.model.kv_bytes_per_token(tp)) * block_size

    def allocate_kv(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """One "cache" `[num_blocks, 1, block_size]` int32 holding each slot's token id."""
        return [torch.zeros((num_blocks, 1, block_size), dtype=torch.int32)]

    def forward(
        self,
        token_ids: list[int],
        positions: list[int],
        layout: BatchLayout,
        kv_caches: list[torch.Tensor],
        logit_rows: list[int],
    ) -> torch.Tensor:
        """Store the step's tokens `[num_tokens]` at their slots and return float32 logits
        `[len(logit_rows), vocab_size]`: `LOGIT` at each row's next token, 0 elsewhere; the
        tokens themselves in `row_tokens` (so the core skips the argmax over the vocabulary)."""
        cache = kv_caches[0].numpy()  # shares memory: [num_blocks, 1, block_size]
        bs = layout.block_size
        ends: dict[int, tuple[int, tuple[int, ...]]] = {}
        offset = 0
        for seq in layout.sequences():
            start = seq.kv_len - seq.query_len
            for b in range(start // bs, (seq.kv_len - 1) // bs + 1):
                lo, hi = max(start, b * bs), min(seq.kv_len, (b + 1) * bs)
                chunk = token_ids[offset + lo - start : offset + hi - start]
                cache[seq.block_table[b], 0, lo - b * bs : hi - b * bs] = chunk
            offset += seq.query_len
            ends[offset - 1] = (seq.kv_len, seq.block_table)
        tokens = [self._next_token(cache, bs, *ends[row]) for row in logit_rows]
        logits = torch.zeros((len(logit_rows), self.vocab_size), dtype=torch.float32)
        logits[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = LOGIT
        self.row_tokens = tokens
        return logits

    def _next_token(
        self, cache: np.ndarray, bs: int, kv_len: int, table: tuple[int, ...]
    ) -> int:
        # FNV-1a over the last tokens and the length: a fixed function (Python's hash() of
        # ints would do too, but this one is stated and the same in every interpreter).
        h = 0xCBF29CE484222325
        for pos in range(max(0, kv_len - CONTEXT_WINDOW), kv_len):
            h = ((h ^ int(cache[table[pos // bs], 0, pos % bs])) * 0x100000001B3) & (2**64 - 1)
        h = ((h ^ kv_len) * 0x100000001B3) & (2**64 - 1)
        return int(self.palette[h % len(self.palette)])

    def step_seconds(self, layout: BatchLayout, logit_rows: int) -> float:
        """Predicted duration of the step (seconds); added up in `simulated_s`."""
        dt = self.step_model.predict(step_shape(layout, logit_rows))
        self.simulated_s += dt
        return dt


__all__ = ["SimConfig", "SimRunner", "word_palette"]
