"""The step-time model (engines/step_time.py): shapes, the Vidur-profile GPU model checked against
the CSV read independently, the analytic components' formulas, and the cpu-fitted least squares."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parrot_actors.engines import step_time as st
from parrot_actors.engines.step_fit import StepTimeFit, load_fit, save_fit
from parrot_actors.engines.step_time import (
    DEVICES,
    FEATURES,
    ModelShape,
    StepShape,
    StepTimeModel,
    features,
)
from parrot_actors.errors import InvalidRequestError, ParrotError

OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
       "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")  # fmt: skip


def profiles_or_skip() -> Path:
    try:
        return st.locate_profiles()
    except InvalidRequestError:
        pytest.skip("the shared Vidur profiles (shared/data/gpu_profiles/vidur) are absent")


def csv_points(name: str, tp: int = 1) -> dict[int, dict[str, float]]:
    """num_tokens -> op -> median (ms), read with the csv module alone (median of repeats)."""
    groups: dict[int, list[dict[str, str]]] = {}
    with open(profiles_or_skip() / name, newline="") as f:
        for r in csv.DictReader(f):
            if int(r["num_tensor_parallel_workers"]) == tp:
                groups.setdefault(int(r["num_tokens"]), []).append(r)
    return {
        n: {op: statistics.median(float(r[f"time_stats.{op}.median"]) for r in rows)
            for op in ("emb", *OPS)}
        for n, rows in groups.items()
    }  # fmt: skip


def linear_s(point: dict[str, float], layers: int, scale: dict[str, float] | None = None) -> float:
    scale = scale or {}
    layer = sum(point[op] * scale.get(op, 1.0) for op in OPS)
    return (layers * layer + point["emb"] * scale.get("emb", 1.0)) * 1e-3


# ---- shapes ----------------------------------------------------------------------------------


def test_step_shape_normalizes_and_counts() -> None:
    s = StepShape(prefill=[[100, 20], (3, 0)], decode=[5, np.int64(7)], shared=[[2, 2]])
    assert s.prefill == ((100, 20), (3, 0)) and s.decode == (5, 7) and s.shared == ((2, 2),)
    assert s.num_tokens == 105 and s.num_sequences == 4 and s.num_logit_rows == 4
    assert s.decode_kv_tokens == 12 - 2
    assert s.prefill_attn_pairs == 100 * (20 + 101 / 2) + 3 * (0 + 4 / 2)
    assert StepShape(decode=[1], logit_rows=0).num_logit_rows == 0
    assert StepShape(decode=[3]) == StepShape(decode=(3,))
    assert StepShape().num_tokens == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"prefill": [(0, 5)]}, "prefill[0][0]=0"),
        ({"prefill": [(4, -1)]}, "prefill[0][1]=-1"),
        ({"prefill": [(4,)]}, "pair"),
        ({"decode": [3, 0]}, "decode[1]=0"),
        ({"decode": [2.5]}, "decode[0]=2.5"),
        ({"decode": [True]}, "decode[0]=True"),
        ({"logit_rows": -1}, "logit_rows=-1"),
        ({"decode": [10], "shared": [(4, 2)]}, "more than the 1 decodes"),
        ({"decode": [10, 10], "shared": [(10, 2)]}, "longer than"),
        ({"decode": [10, 10], "shared": [(4, 0)]}, "shared[0][1]=0"),
    ],
)
def test_step_shape_rejects_bad_values(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
        StepShape(**kwargs)
    assert issubclass(InvalidRequestError, ParrotError)


def test_named_models_and_kv_bytes() -> None:
    m = ModelShape.named("Vicuna-13B")
    assert (m.num_layers, m.hidden, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn) == (
        40, 5120, 40, 40, 128, 13824)  # fmt: skip
    assert (m.vocab, m.max_len, m.bytes_per_weight) == (32000, 2048, 2.0)
    assert ModelShape.named("llama-2-7b").kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2 == 524288
    assert m.kv_bytes_per_token() == 819200
    assert ModelShape.named("llama-2-7b").kv_bytes_per_token(2) == 262144
    assert ModelShape.named("llama-3-8b").kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    # 70B at tp 16 would split 8 KV heads: each GPU keeps one (replicated), as vLLM does.
    assert ModelShape.named("llama-2-70b").kv_bytes_per_token(16) == 2 * 80 * 1 * 128 * 2
    small = ModelShape.named("smollm2-135m")
    assert (small.num_heads, small.num_kv_heads, small.head_dim) == (9, 3, 64)
    assert (small.bytes_per_weight, small.bytes_per_kv) == (4, 4)
    assert ModelShape.named("vicuna-7b").hidden == ModelShape.named("llama-2-7b").hidden
    # Llama-2-7B's published parameter count, 6,738,415,616, in fp16.
    assert ModelShape.named("llama-2-7b").weight_bytes() == 6_738_415_616 * 2
    with pytest.raises(InvalidRequestError, match="llama-2-7b"):
        ModelShape.named("gpt-5")
    with pytest.raises(InvalidRequestError, match="tensor_parallel=3"):
        m.kv_bytes_per_token(3)


def test_dtypes() -> None:
    m = ModelShape.named("llama-2-7b")
    f32 = m.with_dtype("float32")
    assert (f32.bytes_per_weight, f32.bytes_per_kv) == (4, 4)
    assert (m.with_dtype("int8").bytes_per_weight, m.with_dtype("int8").bytes_per_kv) == (1, 2)
    assert m.with_dtype("bfloat16") == m
    with pytest.raises(InvalidRequestError, match="float16"):
        m.with_dtype("fp4")


def test_from_hf_config(tmp_path: Path) -> None:
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
           "max_position_embeddings": 512, "torch_dtype": "float32"}  # fmt: skip
    m = ModelShape.from_hf_config(cfg)
    assert (m.num_layers, m.hidden, m.num_heads, m.num_kv_heads, m.head_dim) == (2, 64, 4, 2, 16)
    assert (m.ffn, m.vocab, m.max_len, m.bytes_per_weight, m.bytes_per_kv) == (128, 100, 512, 4, 4)
    folder = tmp_path / "tiny"
    folder.mkdir()
    cfg.pop("num_key_value_heads")
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    for where in (folder, folder / "config.json", str(folder)):
        m = ModelShape.resolve(where)
        assert (m.name, m.num_kv_heads, m.bytes_per_weight) == ("tiny", 4, 2)
    assert ModelShape.resolve(m) is m and ModelShape.resolve("LLAMA-3-8B").vocab == 128256
    with pytest.raises(InvalidRequestError, match="intermediate_size"):
        ModelShape.from_hf_config({k: v for k, v in cfg.items() if k != "intermediate_size"})
    with pytest.raises(InvalidRequestError, match="not a known name"):
        ModelShape.resolve(tmp_path / "missing")


# ---- GPU model -------------------------------------------------------------------------------


def test_linear_equals_the_profile_rows_at_sampled_points() -> None:
    points = csv_points("a100_llama-2-7b_mlp.csv")
    m = StepTimeModel.for_device("a100", "llama-2-7b")
    for n in (1, 2, 64, 1024, 2048, 4096):  # 2048 and 4096 have repeated rows
        assert m.breakdown(StepShape(prefill=[(n, 0)]))["linear"] == pytest.approx(
            linear_s(points[n], 32), rel=1e-12)  # fmt: skip
    # Decodes count one token each: 64 decodes are the 64-token row.
    got = m.breakdown(StepShape(decode=[10] * 64))["linear"]
    assert got == pytest.approx(linear_s(points[64], 32), rel=1e-12)


def test_linear_interpolates_and_extrapolates() -> None:
    points = csv_points("a100_llama-2-7b_mlp.csv")
    m = StepTimeModel.for_device("a100-80gb", "llama-2-7b")
    lo, hi = linear_s(points[16], 32), linear_s(points[24], 32)
    assert m.breakdown(StepShape(prefill=[(20, 0)]))["linear"] == pytest.approx((lo + hi) / 2)
    a, b = linear_s(points[4064], 32), linear_s(points[4096], 32)
    got = m.breakdown(StepShape(prefill=[(4096 + 64, 0)]))["linear"]
    assert got == pytest.approx(b + 2 * (b - a), rel=1e-12)


def test_scaling_to_13b_by_weight_shape() -> None:
    point = csv_points("a100_llama-2-7b_mlp.csv")[512]
    h, f = 5120 / 4096, 13824 / 11008
    scale = {"attn_pre_proj": h * h, "attn_post_proj": h * h, "mlp_up_proj": h * f,
             "mlp_down_proj": h * f, "attn_rope": h, "mlp_act": f, "emb": h,
             "input_layernorm": h, "post_attention_layernorm": h, "add": h}  # fmt: skip
    m = StepTimeModel.for_device("a100", "vicuna-13b")
    got = m.breakdown(StepShape(prefill=[(512, 0)]))["linear"]
    assert got == pytest.approx(linear_s(point, 40, scale), rel=1e-12)
    # int8 weights halve the matmuls (the bandwidth-bound approximation), nothing else.
    int8 = StepTimeModel.for_device("a100", "vicuna-13b", dtype="int8")
    half = {k: v / 2 if "proj" in k else v for k, v in scale.items()}
    got = int8.breakdown(StepShape(prefill=[(512, 0)]))["linear"]
    assert got == pytest.approx(linear_s(point, 40, half), rel=1e-12)


def test_profile_choice_and_tensor_parallel() -> None:
    profiles_or_skip()
    points70 = csv_points("a100_llama-2-70b_mlp.csv", tp=4)
    m = StepTimeModel.for_device("a100", "llama-2-70b", tensor_parallel=4)
    b = m.breakdown(StepShape(prefill=[(256, 0)]))
    assert b["linear"] == pytest.approx(linear_s(points70[256], 80), rel=1e-12)
    points = csv_points("a100_llama-2-7b_mlp.csv", tp=2)
    m2 = StepTimeModel.for_device("a100", "llama-2-7b", tensor_parallel=2)
    b = m2.breakdown(StepShape(prefill=[(256, 0)]))
    assert b["linear"] == pytest.approx(linear_s(points[256], 32), rel=1e-12)
    ring = 2 * (2 - 1) / 2 * 256 * 4096 * 2 / DEVICES["a100-80gb"].interconnect_bandwidth
    assert b["allreduce"] == pytest.approx(2 * 32 * (ring + st.ALLREDUCE_LATENCY_S), rel=1e-12)
    assert StepTimeModel.for_device("a100", "llama-2-7b").breakdown(
        StepShape(prefill=[(256, 0)]))["allreduce"] == 0  # fmt: skip
    with pytest.raises(InvalidRequestError, match=r"tensor_parallel=16: .*\[1, 2, 4, 8\]"):
        StepTimeModel.for_device("a100", "llama-2-7b", tensor_parallel=16)
    with pytest.raises(InvalidRequestError, match="tensor_parallel=3"):
        StepTimeModel.for_device("a100", "llama-2-7b", tensor_parallel=3)


def test_missing_profiles_and_bad_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="looked in"):
        StepTimeModel.for_device("h100", "llama-2-7b", profiles_dir=tmp_path)
    monkeypatch.setenv(st.PROFILE_ENV, str(tmp_path))
    with pytest.raises(InvalidRequestError, match=str(tmp_path)):
        st.locate_profiles()
    with pytest.raises(InvalidRequestError, match="a100-80gb"):
        StepTimeModel.for_device("tpu-v5", "llama-2-7b")
    with pytest.raises(InvalidRequestError, match="'cpu-fitted' only"):
        StepTimeModel.for_device("a100", "llama-2-7b", coefficients={"step": 1.0})


@pytest.fixture(scope="module")
def a100_13b() -> StepTimeModel:
    profiles_or_skip()
    return StepTimeModel.for_device("a100", "vicuna-13b")


def test_attention_formulas_and_breakdown_sum(a100_13b: StepTimeModel) -> None:
    m, dev = a100_13b, DEVICES["a100-80gb"]
    layer_kv = 2 * 40 * 128 * 2  # bytes per token per layer
    one, more = StepShape(decode=[1000] * 8), StepShape(decode=[1000] * 7 + [2000])
    assert m.predict(more) > m.predict(one)
    b = m.breakdown(one)
    read = 8000 * layer_kv / (dev.mem_bandwidth * st.DECODE_ATTN_EFFICIENCY)
    assert b["attention_decode"] == pytest.approx(40 * (read + st.ATTN_KERNEL_FIXED_S), rel=1e-12)
    # A cascade group of 8 sharing 900 tokens reads them once, not 8 times.
    g = m.breakdown(StepShape(decode=[1000] * 8, shared=[(900, 8)]))
    saved = 40 * 7 * 900 * layer_kv / (dev.mem_bandwidth * st.DECODE_ATTN_EFFICIENCY)
    extra = 40 * st.CASCADE_EXTRA_KERNELS * st.ATTN_KERNEL_FIXED_S
    assert g["attention_decode"] == pytest.approx(b["attention_decode"] - saved + extra, rel=1e-12)
    assert {k: v for k, v in g.items() if k != "attention_decode"} == {
        k: v for k, v in b.items() if k != "attention_decode"}  # fmt: skip
    p = m.breakdown(StepShape(prefill=[(1024, 512)]))
    flops = 4 * 40 * 128 * 1024 * (512 + 1025 / 2)
    want = flops / (dev.peak_flops * st.PREFILL_ATTN_EFFICIENCY) + st.ATTN_KERNEL_FIXED_S
    assert p["attention_prefill"] == pytest.approx(40 * want, rel=1e-12)
    lm = max(2 * 1 * 32000 * 5120 / (dev.peak_flops * st.LM_HEAD_FLOP_EFFICIENCY),
             32000 * 5120 * 2 / (dev.mem_bandwidth * st.LM_HEAD_BW_EFFICIENCY))  # fmt: skip
    assert p["lm_head"] == pytest.approx(lm, rel=1e-12)
    assert p["overhead"] == pytest.approx(st.STEP_OVERHEAD_S + st.PER_SEQUENCE_OVERHEAD_S)
    for shape in (one, more, StepShape(prefill=[(300, 0), (5, 900)], decode=[40] * 3)):
        assert m.predict(shape) == sum(m.breakdown(shape).values())
        assert set(m.breakdown(shape)) == set(st.COMPONENTS)


def test_kv_capacity_and_default_cache(a100_13b: StepTimeModel) -> None:
    m = a100_13b
    assert m.kv_capacity_tokens(819200 * 10 + 5) == 10
    want = 81920 * 2**20 * 0.9 - m.model.weight_bytes() - m.activation_reserve_bytes()
    assert m.default_kv_cache_bytes() == pytest.approx(want)
    assert 20e9 < m.default_kv_cache_bytes() < 60e9
    with pytest.raises(InvalidRequestError, match="raise tensor_parallel"):
        StepTimeModel.for_device("a6000", "llama-2-70b").default_kv_cache_bytes()
    with pytest.raises(InvalidRequestError, match="gpu_memory_utilization=1.5"):
        m.default_kv_cache_bytes(1.5)


def test_sanity_magnitudes_and_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Physical lower bounds only; the numbers are printed for the record (pytest -s)."""
    profiles_or_skip()
    lines = []
    for gpu, name in (("a100", "vicuna-13b"), ("a6000", "llama-2-7b"), ("h100", "llama-3-8b")):
        m = StepTimeModel.for_device(gpu, name)
        assert m.device is not None
        weights_s = m.model.weight_bytes() / m.device.mem_bandwidth
        for label, shape in (("b1 ctx1000", StepShape(decode=[1000])),
                             ("b32 ctx1000", StepShape(decode=[1000] * 32)),
                             ("prefill 1024", StepShape(prefill=[(1024, 0)]))):  # fmt: skip
            t = m.predict(shape)
            assert weights_s < t < 1.0
            lines.append(f"{gpu} {name} {label}: {t * 1e3:.2f} ms")
    import time

    m, shape = StepTimeModel.for_device("a100", "vicuna-13b"), StepShape(decode=[1000] * 64)
    start = time.perf_counter()
    for _ in range(2000):
        m.predict(shape)
    lines.append(f"predict: {(time.perf_counter() - start) / 2000 * 1e6:.2f} us")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ---- cpu-fitted ------------------------------------------------------------------------------

TRUE = {"step": 2e-3, "tokens": 5e-5, "logit_rows": 3e-4, "prefill_attn": 1e-8,
        "decode_kv": 2e-7, "sequences": 4e-5}  # fmt: skip


def random_shapes(n: int, seed: int = 0) -> list[StepShape]:
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(n):
        prefill = [(int(rng.integers(1, 300)), int(rng.integers(0, 800)))
                   for _ in range(rng.integers(0, 3))]  # fmt: skip
        decode = [int(x) for x in rng.integers(1, 1500, size=rng.integers(0, 12))]
        if not prefill and not decode:
            decode = [7]
        rows = int(rng.integers(0, 20)) if rng.random() < 0.5 else None
        shapes.append(StepShape(prefill=prefill, decode=decode, logit_rows=rows))
    return shapes


def synthetic(coef: dict[str, float], n: int = 200) -> list[tuple[StepShape, float]]:
    c = np.array([coef[f] for f in FEATURES])
    return [(s, float(np.dot(c, features(s)))) for s in random_shapes(n)]


def test_fit_recovers_known_coefficients() -> None:
    fit = StepTimeFit("smollm2-135m", min_samples=32)
    data = synthetic(TRUE)
    for shape, seconds in data[:31]:
        fit.record(shape, seconds)
    assert fit.fit() is None and fit.summary() == {"samples": 31.0}
    for shape, seconds in data[31:]:
        fit.record(shape, seconds)
    model = fit.fit()
    assert model is not None and model.device is None and fit.coefficients is not None
    for f in FEATURES:
        assert fit.coefficients[f] == pytest.approx(TRUE[f], rel=1e-9)
    assert fit.error is not None and fit.error.samples == 200 and fit.error.p90_abs_error < 1e-9
    shape = StepShape(prefill=[(64, 10)], decode=[100, 200])
    assert model.predict(shape) == pytest.approx(float(np.dot(
        [TRUE[f] for f in FEATURES], features(shape))), rel=1e-9)  # fmt: skip
    assert model.predict(shape) == sum(model.breakdown(shape).values())
    summary = fit.summary()
    assert summary["samples"] == 200 and set(FEATURES) <= set(summary)
    assert summary["median_abs_error"] < 1e-9


def test_fit_drops_a_negative_coefficient() -> None:
    fit = StepTimeFit("smollm2-135m")
    for shape, seconds in synthetic({**TRUE, "sequences": -1e-5}):
        assert seconds > 0
        fit.record(shape, seconds)
    assert fit.fit() is not None and fit.coefficients is not None
    assert fit.coefficients["sequences"] == 0
    assert all(v >= 0 for v in fit.coefficients.values())


def test_window_records_and_unknown_model_names() -> None:
    fit = StepTimeFit("engine", window=50, min_samples=10)
    assert fit.model is None and fit.model_name == "engine"
    for shape, seconds in synthetic(TRUE, 80):
        fit.record(shape, seconds)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        fit.record(StepShape(decode=[3]), bad)
    assert len(fit) == 50 and fit.recorded == 80
    assert fit.fit() is None and fit.coefficients is not None  # fitted, but no shape to build on
    assert fit.summary()["samples"] == 50


def test_cpu_fitted_needs_coefficients_and_they_must_be_valid() -> None:
    with pytest.raises(InvalidRequestError, match="StepTimeFit"):
        StepTimeModel.for_device("cpu-fitted", "smollm2-135m")
    with pytest.raises(InvalidRequestError, match="unknown"):
        StepTimeModel.for_device("cpu-fitted", "smollm2-135m", coefficients={"flops": 1.0})
    with pytest.raises(InvalidRequestError, match=">= 0"):
        StepTimeModel.for_device("cpu-fitted", "smollm2-135m", coefficients={"step": -1.0})
    m = StepTimeModel.for_device("cpu-fitted", "smollm2-135m", dtype=None,
                                 coefficients={"step": 0.01})  # fmt: skip
    assert m.predict(StepShape(decode=[5] * 9)) == 0.01
    assert m.kv_capacity_tokens(2 * 30 * 3 * 64 * 4) == 1
    with pytest.raises(InvalidRequestError, match="no device memory"):
        m.default_kv_cache_bytes()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    fit = StepTimeFit("smollm2-135m")
    for shape, seconds in synthetic(TRUE, 64):
        fit.record(shape, seconds)
    model = fit.fit()
    assert model is not None and fit.coefficients is not None and fit.error is not None
    path = tmp_path / "fit.json"
    save_fit(path, model.model, fit.coefficients, fit.error)
    loaded = load_fit(path)
    assert loaded.model == model.model and loaded.coefficients == fit.coefficients
    shape = StepShape(prefill=[(30, 3)], decode=[9, 90])
    assert loaded.predict(shape) == model.predict(shape)
    assert StepTimeFit.from_json(fit.to_json()) == fit.coefficients
    assert json.loads(path.read_text())["error"]["samples"] == 64
    path.write_text("{}")
    with pytest.raises(InvalidRequestError, match="not a step-time fit"):
        load_fit(path)
