"""How long one continuous-batching step of an LLM engine takes (seconds), so a simulated engine
can run the real scheduler in simulated time.

GPU devices follow Vidur (Agrawal et al., "Vidur: A Large-Scale Simulation Framework for LLM
Inference", MLSys 2024, arXiv 2405.05465): the non-attention operators of a decoder layer are
looked up in Vidur's measured per-operator profiles (`shared/data/gpu_profiles/vidur/`, never
copied into this repository) and interpolated at the step's token count; attention, the LM head
and the tensor-parallel all-reduce are modelled analytically with the roofline model (Williams,
Waterman and Patterson, "Roofline", CACM 2009): time = max(FLOPs / compute, bytes / bandwidth).
Decodes that share a prefix (a cascade group) read its KV once per group, as FlashInfer's
cascade attention does (Ye et al., FlashInfer, 2024; flashinfer.ai "cascade inference").

The "cpu-fitted" device is a linear model of `FEATURES` whose coefficients
`step_fit.StepTimeFit` fits to steps measured on the real CPU engine.
Units: tokens, bytes, FLOP, FLOP/s, seconds.
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import math
import operator
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from parrot_actors.errors import InvalidRequestError

# ---- constants (each an assumption stated here, none tuned to a Parrot paper figure) ---------

DECODE_ATTN_EFFICIENCY = 0.6
"""Share of peak memory bandwidth paged decode attention reaches reading KV. An assumption (not
fitted to any paper figure): paged kernels gather 16-token blocks, below the ~0.75-0.85 that a
dense GEMV reaches in the Vidur profiles (see `LM_HEAD_BW_EFFICIENCY`)."""
PREFILL_ATTN_EFFICIENCY = 0.5
"""Share of peak tensor FLOP/s causal prefill attention (FlashAttention-2 class kernels)
reaches. An assumption, not fitted: FlashAttention-2 reports 50-73% of A100 peak forward."""
LM_HEAD_FLOP_EFFICIENCY = 0.7
"""Share of peak FLOP/s of the LM head GEMM: what the Vidur profiles' own up-projection reaches
at 4096 tokens (70% on A100, 73% on A40, 76% on H100)."""
LM_HEAD_BW_EFFICIENCY = 0.75
"""Share of peak bandwidth of the LM head's weight read: the profiles' up-projection at 1 token
(76% on A100, 81% on A40, 84% on H100)."""
ATTN_KERNEL_FIXED_S = 5e-6
"""Fixed cost of one attention kernel (s): launch plus the first wave of thread blocks."""
CASCADE_EXTRA_KERNELS = 2
"""Extra kernels per layer when decodes share prefixes: the shared-prefix attention and the
merge of the two partial softmax states (FlashInfer's multi-level cascade wrapper)."""
ALLREDUCE_LATENCY_S = 10e-6
"""Fixed latency of one NCCL all-reduce of a few MB within a node (s)."""
STEP_OVERHEAD_S = 1.2e-3
"""Host-side cost of one step (s): scheduling, input preparation, sampling, output handling.
From Vidur's own CPU-overhead profile (microsoft/vidur data/profiling/a100/cpu_overheads.csv,
Llama-2-7B, tp 1): schedule + sampler + prepare_inputs + process_model_outputs medians are
1.97 ms at batch 8 and 7.59 ms at batch 64; a line through batches 8..64 gives 1.20 ms +
0.100 ms per sequence. A synchronous Python engine (vLLM 0.2-0.5 era, the Parrot paper's
baseline) pays this between forward passes."""
PER_SEQUENCE_OVERHEAD_S = 0.1e-3
"""Host-side cost per sequence in a step (s); the slope of the same fit."""
PROFILE_OPS = (
    "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
    "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add",
)
"""The per-layer operators of a Vidur MLP profile (the embedding, `emb`, is per step)."""
PROFILE_ENV = "PARROT_GPU_PROFILES"
"""Environment variable naming the folder of the Vidur `*_mlp.csv` profiles."""
COMPONENTS = ("linear", "attention_prefill", "attention_decode", "lm_head", "allreduce", "overhead")
"""Keys of `StepTimeModel.breakdown`, in the order `predict` sums them."""
FEATURES = ("step", "tokens", "logit_rows", "prefill_attn", "decode_kv", "sequences")
"""Features of the cpu-fitted model: 1, new tokens, LM head rows, prefill query-key pairs,
decode KV tokens read, sequences."""


def _count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise InvalidRequestError(f"{what}={value!r}: must be an int >= {minimum}")
    try:
        n = operator.index(value)
    except TypeError:
        raise InvalidRequestError(f"{what}={value!r}: must be an int >= {minimum}") from None
    if n < minimum:
        raise InvalidRequestError(f"{what}={n}: must be >= {minimum}")
    return n


def _pairs(items: Any, what: str, first_min: int, second_min: int) -> tuple[tuple[int, int], ...]:
    out = []
    for i, item in enumerate(items):
        try:
            a, b = item
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{what}[{i}]={item!r}: must be a pair of ints") from None
        where = f"{what}[{i}]"
        out.append((_count(a, f"{where}[0]", first_min), _count(b, f"{where}[1]", second_min)))
    return tuple(out)


@dataclass(frozen=True, init=False)
class StepShape:
    """What a step computes. prefill: per prefill chunk (new tokens >= 1, past tokens already in
    its KV); decode: per decoding sequence, its context length in tokens (the new token
    included, >= 1); shared: cascade groups among the decodes, (shared prefix tokens,
    sequences), whose prefix KV is read once per group; logit_rows: rows the LM head runs on
    (None: one per prefill chunk and per decode). Any iterables are accepted and stored as
    tuples; bad values raise `InvalidRequestError`. The sums `predict` needs are computed once
    here, so that a prediction costs a few arithmetic operations."""

    prefill: tuple[tuple[int, int], ...]
    decode: tuple[int, ...]
    shared: tuple[tuple[int, int], ...]
    logit_rows: int | None
    _sums: tuple[int, float, int, int, int, int] = field(init=False, repr=False, compare=False)

    def __init__(self, prefill: Iterable[Sequence[int]] = (), decode: Iterable[int] = (),
                 shared: Iterable[Sequence[int]] = (), logit_rows: int | None = None) -> None:
        chunks = _pairs(prefill, "prefill", 1, 0)
        lens = tuple(decode)
        # Plain ints (the usual case, once per step) skip the per-item checks.
        if not all(type(d) is int for d in lens) or (lens and min(lens) < 1):
            lens = tuple(_count(d, f"decode[{i}]", 1) for i, d in enumerate(lens))
        groups = _pairs(shared, "shared", 0, 1)
        rows = None if logit_rows is None else _count(logit_rows, "logit_rows", 0)
        members = sum(n for _, n in groups)
        if members > len(lens):
            raise InvalidRequestError(f"shared={groups!r}: {members} grouped sequences, more "
                                      f"than the {len(lens)} decodes")
        decode_kv = sum(lens) - sum((n - 1) * p for p, n in groups)
        if decode_kv < len(lens) or (groups and max(p for p, _ in groups) >= max(lens)):
            raise InvalidRequestError(f"shared={groups!r}: prefixes longer than the decodes' "
                                      f"contexts {lens!r} (each keeps at least its new token)")
        new = sum(n for n, _ in chunks)
        pairs = sum(n * (p + (n + 1) / 2) for n, p in chunks)
        prefill_kv = sum(n + p for n, p in chunks)
        seqs = len(chunks) + len(lens)
        logits = seqs if rows is None else rows
        sums = (new + len(lens), pairs, prefill_kv, decode_kv, seqs, logits)
        for name, value in (("prefill", chunks), ("decode", lens), ("shared", groups),
                            ("logit_rows", rows), ("_sums", sums)):
            object.__setattr__(self, name, value)

    @property
    def num_tokens(self) -> int:
        """New tokens of the step (tokens): prefill chunks' new tokens plus one per decode."""
        return self._sums[0]

    @property
    def prefill_attn_pairs(self) -> float:
        """Causal query-key pairs of the prefill chunks: sum of new * (past + (new + 1) / 2)."""
        return self._sums[1]

    @property
    def decode_kv_tokens(self) -> int:
        """KV tokens the decodes read (tokens): their context lengths, each shared prefix once
        per cascade group."""
        return self._sums[3]

    @property
    def num_sequences(self) -> int:
        """Sequences in the step: prefill chunks plus decodes."""
        return self._sums[4]

    @property
    def num_logit_rows(self) -> int:
        """Rows the LM head runs on (`logit_rows`, or one per sequence)."""
        return self._sums[5]


_DTYPES = {"float16": (2.0, 2.0), "fp16": (2.0, 2.0), "half": (2.0, 2.0),
           "bfloat16": (2.0, 2.0), "bf16": (2.0, 2.0), "float32": (4.0, 4.0),
           "fp32": (4.0, 4.0), "float": (4.0, 4.0), "int8": (1.0, 2.0)}


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's shape (gated SwiGLU MLP, grouped-query attention). num_layers,
    hidden, num_heads, num_kv_heads, head_dim, ffn (intermediate size), vocab, max_len
    (positions, tokens); bytes_per_weight and bytes_per_kv: bytes per element (2: fp16/bf16)."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_len: int
    bytes_per_weight: float = 2.0
    bytes_per_kv: float = 2.0

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "ffn",
                  "vocab", "max_len"):
            _count(getattr(self, f), f"{self.name}: {f}", 1)
        for f in ("bytes_per_weight", "bytes_per_kv"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise InvalidRequestError(f"{self.name}: {f}={v!r}: must be a number > 0")
        if self.num_heads % self.num_kv_heads:
            raise InvalidRequestError(f"{self.name}: num_heads={self.num_heads} must be a "
                                      f"multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def named(cls, name: str) -> ModelShape:
        """A known model's shape (case-insensitive; see `MODELS`). Sources: each model's Hugging
        Face config.json. Unknown names raise `InvalidRequestError` listing the known ones."""
        key = _MODEL_ALIASES.get(name.lower(), name.lower())
        if key not in MODELS:
            raise InvalidRequestError(f"model {name!r} is not known; known: {sorted(MODELS)}")
        return MODELS[key]

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path) -> ModelShape:
        """The shape in a Hugging Face config.json (a dict, or the path of the file or of its
        folder). torch_dtype (or dtype) "float32" gives 4-byte weights and KV, others 2."""
        name = "custom"
        if not isinstance(config, Mapping):
            path = Path(config)
            file = path / "config.json" if path.is_dir() else path
            try:
                config = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise InvalidRequestError(
                    f"model {str(path)!r}: not a known name ({sorted(MODELS)}) and no readable "
                    f"config.json there ({e})"
                ) from None
            name = file.parent.name
        if not isinstance(config, Mapping):
            raise InvalidRequestError(f"config {config!r}: must be a JSON object")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            shape = {"num_layers": int(config["num_hidden_layers"]), "hidden": hidden,
                     "num_heads": heads, "ffn": int(config["intermediate_size"]),
                     "vocab": int(config["vocab_size"]),
                     "max_len": int(config["max_position_embeddings"])}
        except KeyError as e:
            raise InvalidRequestError(f"config.json of {name!r} lacks {e.args[0]!r}") from None
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // max(heads, 1))
        size = 4.0 if str(config.get("torch_dtype", config.get("dtype"))) == "float32" else 2.0
        name = str(config.get("_name_or_path") or name)
        return cls(name=name, num_kv_heads=kv_heads, head_dim=head_dim,
                   bytes_per_weight=size, bytes_per_kv=size, **shape)

    @classmethod
    def resolve(cls, model: str | Path | Mapping[str, Any] | ModelShape) -> ModelShape:
        """`model` as a shape: a `ModelShape` as is, a known name, else a config.json (dict or
        path)."""
        if isinstance(model, ModelShape):
            return model
        if isinstance(model, str) and _MODEL_ALIASES.get(model.lower(), model.lower()) in MODELS:
            return cls.named(model)
        return cls.from_hf_config(model)

    def kv_heads_per_gpu(self, tensor_parallel: int = 1) -> int:
        """KV heads each GPU holds: num_kv_heads / tp, or 1 (replicated, as vLLM does) when tp
        exceeds them. tp must divide num_heads, and num_kv_heads or tp must divide the other."""
        tp = _count(tensor_parallel, "tensor_parallel", 1)
        kv = self.num_kv_heads
        if self.num_heads % tp or (kv % tp and tp % kv):
            raise InvalidRequestError(f"tensor_parallel={tp}: must divide num_heads="
                                      f"{self.num_heads} of {self.name}, and divide or be a "
                                      f"multiple of num_kv_heads={kv}")
        return max(1, kv // tp)

    def kv_bytes_per_token(self, tensor_parallel: int = 1) -> int:
        """KV cache bytes one token takes per GPU: 2 (K and V) * layers * kv heads per GPU *
        head_dim * bytes_per_kv."""
        per_gpu = self.kv_heads_per_gpu(tensor_parallel)
        return int(2 * self.num_layers * per_gpu * self.head_dim * self.bytes_per_kv)

    def weight_bytes(self) -> float:
        """All parameter bytes: embedding, layers (qkv, o, gate/up, down, two norms), final norm
        and an untied LM head."""
        attn = self.hidden * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * self.hidden
        layer = attn + 3 * self.hidden * self.ffn + 2 * self.hidden
        params = 2 * self.vocab * self.hidden + self.num_layers * layer + self.hidden
        return float(params * self.bytes_per_weight)

    def with_dtype(self, dtype: str) -> ModelShape:
        """This shape in `dtype`: "float16"/"bfloat16" 2-byte weights and KV, "float32" 4,
        "int8" 1-byte weights with fp16 KV."""
        if dtype.lower() not in _DTYPES:
            raise InvalidRequestError(f"dtype={dtype!r}: must be one of {sorted(_DTYPES)}")
        w, kv = _DTYPES[dtype.lower()]
        return replace(self, bytes_per_weight=w, bytes_per_kv=kv)


def _llama(name: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int = 32000,
           max_len: int = 4096, head_dim: int = 128, size: float = 2.0) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv, head_dim, ffn, vocab, max_len, size, size)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        _llama("llama-2-7b", 32, 4096, 32, 32, 11008),
        _llama("vicuna-7b", 32, 4096, 32, 32, 11008, max_len=2048),  # lmsys vicuna-7b-v1.3
        _llama("llama-2-13b", 40, 5120, 40, 40, 13824),
        _llama("vicuna-13b", 40, 5120, 40, 40, 13824, max_len=2048),  # vicuna-13b-v1.3
        _llama("llama-2-70b", 80, 8192, 64, 8, 28672),
        _llama("llama-3-8b", 32, 4096, 32, 8, 14336, vocab=128256, max_len=8192),
        # The embedded CPU model, run in float32.
        _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192, head_dim=64, size=4.0),
    )
}
"""Known model shapes (from each model's Hugging Face config.json), by lowercase name."""
_MODEL_ALIASES = {"vicuna-7b-v1.3": "vicuna-7b", "vicuna-13b-v1.3": "vicuna-13b",
                  "smollm2-135m-instruct": "smollm2-135m", "default": "smollm2-135m"}


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU: memory_bytes (bytes), mem_bandwidth (bytes/s), peak_flops (dense fp16 tensor
    FLOP/s), profile (prefix of its Vidur profile files, None: none), interconnect_bandwidth
    (bytes/s per direction, for the tensor-parallel all-reduce)."""

    name: str
    memory_bytes: float
    mem_bandwidth: float
    peak_flops: float
    profile: str | None
    interconnect_bandwidth: float


# Memory is what the driver reports (nvidia-smi's memory.total: 81920 MiB for the A100 80GB,
# 49140 MiB for the RTX A6000, 81559 MiB for the H100 SXM 80GB): the "80 GB" of a datasheet
# is GiB there, and the KV budget of a serving engine is taken from the driver's figure.
DEVICES: dict[str, DeviceSpec] = {
    # NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM): HBM2e 2,039 GB/s, FP16 tensor 312
    # TFLOP/s dense, NVLink 600 GB/s (300 GB/s each direction).
    "a100-80gb": DeviceSpec("a100-80gb", 81920 * 2**20, 2.039e12, 312e12, "a100", 300e9),
    # NVIDIA RTX A6000 datasheet: 48 GB GDDR6 at 768 GB/s, FP16 tensor 154.8 TFLOP/s dense
    # (FP32 accumulate), PCIe 4.0 x16 (~32 GB/s each way). Profiled as the A40: same GA102 chip.
    "a6000": DeviceSpec("a6000", 49140 * 2**20, 768e9, 154.8e12, "a40", 32e9),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM 80 GB): HBM3 3.35 TB/s, FP16 tensor 989
    # TFLOP/s dense, NVLink 900 GB/s (450 GB/s each direction).
    "h100": DeviceSpec("h100", 81559 * 2**20, 3.35e12, 989e12, "h100", 450e9),
}
"""Known GPUs (see the datasheets cited beside each); aliases: "a100", "h100-80gb"."""
_DEVICE_ALIASES = {"a100": "a100-80gb", "h100-80gb": "h100", "cpu": "cpu-fitted"}


# ---- Vidur profiles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Profile:
    """One parsed profile file: its model's shape and, per tp, the sampled token counts and
    each operator's median time (ms) there."""

    n_head: int
    n_kv_head: int
    n_embd: int
    n_expanded_embd: int
    gated: bool
    tokens: dict[int, np.ndarray]
    ops: dict[int, dict[str, np.ndarray]]


def locate_profiles(profiles_dir: str | Path | None = None) -> Path:
    """The folder of the Vidur `*_mlp.csv` profiles: `profiles_dir`, else $PARROT_GPU_PROFILES,
    else the first `shared/data/gpu_profiles/vidur` under this file's folder or any parent (the
    repository's `shared/` beside it), then under the working directory's. Raises
    `InvalidRequestError` naming where it looked."""
    looked: list[str] = []
    given = profiles_dir if profiles_dir is not None else os.environ.get(PROFILE_ENV)
    if given:
        candidates = [Path(given)]
    else:
        rel = Path("shared", "data", "gpu_profiles", "vidur")
        here = Path(__file__).resolve().parent
        candidates = [p / rel for p in (here, *here.parents, Path.cwd(), *Path.cwd().parents)]
    for path in candidates:
        looked.append(str(path))
        if any(path.glob("*_mlp.csv")):
            return path
    raise InvalidRequestError(f"no Vidur GPU profiles (*_mlp.csv) found; looked in {looked}; "
                              f"pass profiles_dir= or set {PROFILE_ENV}")


@functools.cache  # lru_cache without a bound: one entry per profile file
def _load_profile(path: str) -> _Profile:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InvalidRequestError(f"profile {path!r} has no rows")
    groups: dict[tuple[int, int], list[dict[str, str]]] = {}
    for r in rows:
        key = (int(r["num_tensor_parallel_workers"]), int(r["num_tokens"]))
        groups.setdefault(key, []).append(r)
    tokens: dict[int, list[int]] = {}
    ops: dict[int, dict[str, list[float]]] = {}
    for (tp, n), group in sorted(groups.items()):
        tokens.setdefault(tp, []).append(n)
        per_op = ops.setdefault(tp, {})
        for op in ("emb", *PROFILE_OPS):
            # Repeated measurements of one point: the median of their medians.
            value = statistics.median(float(r[f"time_stats.{op}.median"]) for r in group)
            per_op.setdefault(op, []).append(value)
    r0 = rows[0]
    return _Profile(
        int(r0["n_head"]), int(r0["n_kv_head"]), int(r0["n_embd"]), int(r0["n_expanded_embd"]),
        r0["use_gated_mlp"].strip().lower() == "true",
        {tp: np.asarray(t, dtype=np.float64) for tp, t in tokens.items()},
        {tp: {op: np.asarray(v, dtype=np.float64) for op, v in d.items()} for tp, d in ops.items()},
    )


def _op_scales(p: _Profile, m: ModelShape) -> dict[str, float]:
    """Target over profile cost of each operator. Matmuls scale by K*N of their weight (both
    their FLOPs and weight bytes do), elementwise ops by the width they touch."""
    hd = p.n_embd // p.n_head
    up = 2 if p.gated else 1
    prof = {"attn_pre_proj": p.n_embd * (p.n_head + 2 * p.n_kv_head) * hd,
            "attn_post_proj": p.n_head * hd * p.n_embd,
            "mlp_up_proj": p.n_embd * up * p.n_expanded_embd,
            "mlp_down_proj": p.n_expanded_embd * p.n_embd}
    mine = {"attn_pre_proj": m.hidden * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim,
            "attn_post_proj": m.num_heads * m.head_dim * m.hidden,
            "mlp_up_proj": m.hidden * 2 * m.ffn,
            "mlp_down_proj": m.ffn * m.hidden}
    # The profiles are fp16; scaling matmuls by weight bytes is exact only where they are
    # bandwidth bound (small batches), an approximation for int8 and float32 elsewhere.
    dtype = m.bytes_per_weight / 2.0
    scales = {op: mine[op] / prof[op] * dtype for op in prof}
    width = m.hidden / p.n_embd
    scales.update(emb=width, input_layernorm=width, post_attention_layernorm=width, add=width,
                  attn_rope=(m.num_heads + m.num_kv_heads) * m.head_dim
                  / ((p.n_head + p.n_kv_head) * hd),
                  mlp_act=m.ffn / p.n_expanded_embd)
    return scales


# ---- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTotals:
    """The sums of a step that `StepTimeModel.predict_totals` needs, kept as a running total so
    a scheduler can price "this step plus one more chunk" in a few operations instead of
    building a `StepShape` per trial. new: new tokens; pairs: prefill query-key pairs;
    prefill_kv: KV tokens the prefill chunks touch; decode_kv: KV tokens the decodes read;
    seqs: sequences (one LM head row each); decodes: decoding sequences; shared: whether
    decodes share a cascade prefix. Cascade sharing is not tracked by `add_*` (a bound from
    above: sharing only makes decodes cheaper)."""

    new: int = 0
    pairs: float = 0.0
    prefill_kv: int = 0
    decode_kv: int = 0
    seqs: int = 0
    rows: int = 0
    decodes: int = 0
    shared: bool = False

    def add_prefill(self, new: int, past: int) -> StepTotals:
        """These totals plus a prefill chunk of `new` tokens after `past` computed ones."""
        return replace(self, new=self.new + new, pairs=self.pairs + new * (past + (new + 1) / 2),
                       prefill_kv=self.prefill_kv + new + past, seqs=self.seqs + 1,
                       rows=self.rows + 1)

    def add_decode(self, context_len: int) -> StepTotals:
        """These totals plus one decode whose context (its new token included) is
        `context_len` tokens."""
        return replace(self, new=self.new + 1, decode_kv=self.decode_kv + context_len,
                       seqs=self.seqs + 1, rows=self.rows + 1, decodes=self.decodes + 1)

    @classmethod
    def of(cls, shape: StepShape) -> StepTotals:
        """The totals of `shape` (its cascade groups included)."""
        new, pairs, prefill_kv, decode_kv, seqs, rows = shape._sums
        return cls(new, pairs, prefill_kv, decode_kv, seqs, rows, len(shape.decode),
                   bool(shape.shared))


def features(shape: StepShape, model: ModelShape | None = None) -> tuple[float, ...]:
    """The cpu-fitted model's features of `shape`, in `FEATURES` order: 1, new tokens, LM head
    rows, prefill query-key pairs, decode KV tokens read, sequences. `model` is accepted for
    shape-dependent features; none needs it yet."""
    s = shape._sums
    return (1.0, float(s[0]), float(s[5]), s[1], float(s[3]), float(s[4]))


class StepPredictor(Protocol):
    """Anything that prices a step: `StepTimeModel`, or a test's exact linear stand-in."""

    def predict_totals(self, totals: StepTotals) -> float:
        """Seconds one step with these totals takes."""
        ...


class StepTimeModel:
    """Predicted duration of one engine step (seconds). Build with `for_device`. Attributes:
    device (None for "cpu-fitted"), model, tensor_parallel, coefficients (cpu-fitted only, in
    s per unit of each feature), step_overhead_s and sequence_overhead_s (GPU host costs)."""

    def __init__(self, model: ModelShape, device: DeviceSpec | None, tensor_parallel: int = 1,
                 *, linear_tokens: Iterable[float] = (), linear_seconds: Iterable[float] = (),
                 coefficients: Mapping[str, float] | None = None,
                 step_overhead_s: float = STEP_OVERHEAD_S,
                 sequence_overhead_s: float = PER_SEQUENCE_OVERHEAD_S) -> None:
        self.model = model
        self.device = device
        self.tensor_parallel = tensor_parallel
        self.step_overhead_s = float(step_overhead_s)
        self.sequence_overhead_s = float(sequence_overhead_s)
        self._xs = [float(x) for x in linear_tokens]
        self._ys = [float(y) for y in linear_seconds]
        self.coefficients: dict[str, float] | None = None
        if coefficients is not None:
            self.coefficients = _check_coefficients(coefficients)
            self._coef = tuple(self.coefficients[f] for f in FEATURES)
        elif device is None:
            raise InvalidRequestError("gpu='cpu-fitted' needs coefficients: fit them with "
                                      "StepTimeFit (or load_fit)")
        elif len(self._xs) < 2 or len(self._xs) != len(self._ys):
            raise InvalidRequestError("a GPU step-time model needs 2+ profile points")
        if device is not None:
            # Per-unit costs of a whole step (all layers), so `predict` only multiplies.
            tp, m, layers = tensor_parallel, model, model.num_layers
            bw, peak = device.mem_bandwidth, device.peak_flops
            layer_kv = m.kv_bytes_per_token(tp) / layers  # bytes per token, layer and GPU
            act = 4.0 if m.bytes_per_weight >= 4 else 2.0  # bytes per activation element
            self._decode_s_per_kv = layers * layer_kv / (bw * DECODE_ATTN_EFFICIENCY)
            flop_per_pair = layers * 4 * (m.num_heads / tp) * m.head_dim
            self._prefill_s_per_pair = flop_per_pair / (peak * PREFILL_ATTN_EFFICIENCY)
            # vLLM shards the LM head by vocabulary: each GPU computes vocab / tp logits.
            lm_weights = m.vocab * m.hidden / tp
            self._lm_s_per_row = 2 * lm_weights / (peak * LM_HEAD_FLOP_EFFICIENCY)
            self._lm_floor_s = lm_weights * m.bytes_per_weight / (bw * LM_HEAD_BW_EFFICIENCY)
            ring = 2 * (tp - 1) / tp * m.hidden * act / device.interconnect_bandwidth
            self._ar_s_per_token = 2 * layers * ring
            self._ar_fixed_s = 0.0 if tp == 1 else 2 * layers * ALLREDUCE_LATENCY_S
            self._kernel_s = layers * ATTN_KERNEL_FIXED_S

    @classmethod
    def for_device(cls, gpu: str, model: str | Path | Mapping[str, Any] | ModelShape,
                   dtype: str | None = "float16", tensor_parallel: int = 1,
                   profiles_dir: str | Path | None = None,
                   coefficients: Mapping[str, float] | None = None) -> StepTimeModel:
        """The model of `model` (see `ModelShape.resolve`) on `gpu`, a key of `DEVICES` or an
        alias, or "cpu-fitted" (needs `coefficients`, e.g. from `StepTimeFit`). dtype sets the
        weights' and KV's bytes (`ModelShape.with_dtype`; None keeps the shape's own).
        tensor_parallel: GPUs the model is split over (1, 2, 4 or 8: the profiled widths).
        profiles_dir: see `locate_profiles`. Raises `InvalidRequestError` for bad input."""
        shape = ModelShape.resolve(model)
        if dtype is not None:
            shape = shape.with_dtype(dtype)
        key = _DEVICE_ALIASES.get(gpu.lower(), gpu.lower())
        tp = _count(tensor_parallel, "tensor_parallel", 1)
        if key == "cpu-fitted":
            if tp != 1:
                raise InvalidRequestError(f"tensor_parallel={tp}: cpu-fitted runs on one CPU (1)")
            return cls(shape, None, 1, coefficients=coefficients or None)
        if key not in DEVICES:
            raise InvalidRequestError(f"gpu={gpu!r}: must be one of {sorted(DEVICES)}, an alias "
                                      f"{sorted(_DEVICE_ALIASES)}, or 'cpu-fitted'")
        if coefficients is not None:
            raise InvalidRequestError(f"coefficients apply to gpu='cpu-fitted' only, not {gpu!r}")
        device = DEVICES[key]
        shape.kv_heads_per_gpu(tp)
        if device.profile is None:
            raise InvalidRequestError(f"gpu={gpu!r} has no Vidur profile")
        folder = locate_profiles(profiles_dir)
        files = sorted(folder.glob(f"{device.profile}_*_mlp.csv"))
        if not files:
            raise InvalidRequestError(f"no {device.profile}_*_mlp.csv profile in {str(folder)!r}")
        # The profiled model nearest in width, so 70B-class models scale from the 70B profile.
        profile = min((_load_profile(str(f)) for f in files),
                      key=lambda p: abs(p.n_embd - shape.hidden))
        if tp not in profile.tokens:
            raise InvalidRequestError(f"tensor_parallel={tp}: the {device.profile} profiles "
                                      f"have {sorted(profile.tokens)}")
        scales = _op_scales(profile, shape)
        ops = profile.ops[tp]
        layer = sum(scales[op] * ops[op] for op in PROFILE_OPS)
        seconds = (shape.num_layers * layer + scales["emb"] * ops["emb"]) * 1e-3  # ms -> s
        return cls(shape, device, tp, linear_tokens=profile.tokens[tp].tolist(),
                   linear_seconds=seconds.tolist())

    def _linear(self, n: int) -> float:
        """Linear layers and embedding (s) at n tokens: linear between the two sampled token
        counts around n; below the first and beyond the last (4096), the line through the
        nearest two points, extended."""
        if n <= 0:
            return 0.0
        xs, ys = self._xs, self._ys
        i = min(max(bisect.bisect_left(xs, n), 1), len(xs) - 1)
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (n - x0) / (x1 - x0)

    def _components(self, t: StepTotals) -> tuple[float, float, float, float, float, float]:
        new, pairs, prefill_kv, decode_kv, seqs, rows = (t.new, t.pairs, t.prefill_kv,
                                                         t.decode_kv, t.seqs, t.rows)
        if self.coefficients is not None:
            c = self._coef
            return (c[1] * new, c[3] * pairs, c[4] * decode_kv, c[2] * rows, 0.0,
                    c[0] + c[5] * seqs)
        prefill = decode = lm = ar = 0.0
        if pairs:
            # Roofline: the chunks' FLOPs, or reading their past and new KV where that is slower.
            prefill = max(pairs * self._prefill_s_per_pair, prefill_kv * self._decode_s_per_kv)
            prefill += self._kernel_s
        if t.decodes:
            kernels = 1 + (CASCADE_EXTRA_KERNELS if t.shared else 0)
            decode = decode_kv * self._decode_s_per_kv + kernels * self._kernel_s
        if rows:
            lm = max(rows * self._lm_s_per_row, self._lm_floor_s)
        if new and self._ar_fixed_s:
            ar = new * self._ar_s_per_token + self._ar_fixed_s
        overhead = self.step_overhead_s + self.sequence_overhead_s * seqs
        return (self._linear(new), prefill, decode, lm, ar, overhead)

    def predict(self, shape: StepShape) -> float:
        """Seconds one step of `shape` takes (the sum of `breakdown`)."""
        return sum(self._components(StepTotals.of(shape)))

    def predict_totals(self, totals: StepTotals) -> float:
        """Seconds one step with these totals takes (`predict` without building a shape)."""
        return sum(self._components(totals))

    def breakdown(self, shape: StepShape) -> dict[str, float]:
        """Seconds per component (`COMPONENTS`). GPU: "linear" the interpolated Vidur profile;
        "attention_prefill" 4 * heads/tp * head_dim * pairs FLOPs at `PREFILL_ATTN_EFFICIENCY`
        of peak (or the KV read if slower) per layer; "attention_decode" the KV bytes read at
        `DECODE_ATTN_EFFICIENCY` of bandwidth per layer, shared prefixes once per group;
        each attention kernel `ATTN_KERNEL_FIXED_S`; "lm_head" roofline of a vocab x hidden
        GEMM; "allreduce" 2 per layer, ring cost 2 (tp-1)/tp bytes / link + latency;
        "overhead" host time. cpu-fitted: each feature times its coefficient (step and
        sequences are "overhead")."""
        return dict(zip(COMPONENTS, self._components(StepTotals.of(shape))))

    def kv_capacity_tokens(self, kv_cache_bytes: float) -> int:
        """Tokens of KV that `kv_cache_bytes` bytes per GPU hold."""
        if not 0 <= kv_cache_bytes < math.inf:
            raise InvalidRequestError(f"kv_cache_bytes={kv_cache_bytes!r}: must be >= 0")
        return int(kv_cache_bytes // self.model.kv_bytes_per_token(self.tensor_parallel))

    def activation_reserve_bytes(self) -> float:
        """Bytes per GPU kept for activations, in the spirit of vLLM's profile run (a forward
        pass of max_num_batched_tokens = max(max_len, 2048) tokens and 256 sequences): the MLP
        intermediates (gate/up, activation) and 4 hidden-size buffers per token, 256 rows of
        float32 logits in 3 copies (logits, probabilities, log-probabilities), plus 512 MiB for the
        CUDA context and GEMM workspaces."""
        m, tp = self.model, self.tensor_parallel
        act = 4.0 if m.bytes_per_weight >= 4 else 2.0
        tokens = max(m.max_len, 2048)
        per_token = act * (4 * m.hidden + 3 * m.ffn / tp)
        return tokens * per_token + 256 * m.vocab * 4 * 3 + 512 * 2**20

    def default_kv_cache_bytes(self, gpu_memory_utilization: float = 0.9) -> float:
        """KV cache bytes per GPU: device memory * gpu_memory_utilization - weights / tp -
        `activation_reserve_bytes`. Raises `InvalidRequestError` without a device, for a
        utilization outside (0, 1], or when the weights and reserve do not fit."""
        if self.device is None:
            raise InvalidRequestError("cpu-fitted has no device memory: give the KV bytes")
        if not 0 < gpu_memory_utilization <= 1:
            util = gpu_memory_utilization
            raise InvalidRequestError(f"gpu_memory_utilization={util!r}: must be in (0, 1]")
        budget = self.device.memory_bytes * gpu_memory_utilization
        need = self.model.weight_bytes() / self.tensor_parallel + self.activation_reserve_bytes()
        if need > budget:
            raise InvalidRequestError(
                f"{self.model.name} needs {need / 1e9:.1f} GB per GPU (weights / "
                f"tp={self.tensor_parallel} + activations), more than {budget / 1e9:.1f} GB "
                f"({gpu_memory_utilization:.0%} of {self.device.name}); raise tensor_parallel"
            )
        return budget - need

    def __repr__(self) -> str:
        where = self.device.name if self.device else "cpu-fitted"
        return f"StepTimeModel({where}, {self.model.name}, tp={self.tensor_parallel})"


def _check_coefficients(coefficients: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(coefficients) - set(FEATURES))
    if unknown:
        raise InvalidRequestError(f"coefficients {unknown}: unknown; features are {FEATURES}")
    out = {f: float(coefficients.get(f, 0.0)) for f in FEATURES}
    bad = {f: v for f, v in out.items() if not 0 <= v < math.inf}
    if bad:
        raise InvalidRequestError(f"coefficients {bad}: must be finite and >= 0 (seconds/unit)")
    return out


__all__ = [
    "DEVICES", "FEATURES", "MODELS", "DeviceSpec", "ModelShape", "StepPredictor", "StepShape",
    "StepTimeModel", "StepTotals", "features", "locate_profiles",
]
