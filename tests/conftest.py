"""Shared fixtures: the real model engine (loaded once per session) and tiny random engines."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import pytest_asyncio

from parrot_actors.engines import Engine, EngineConfig

# A Ray call made before `ray.init` (by code under test or a test's stand-in) must fail, not
# start a local Ray instance in this process that outlives its test and serves the later ones
# (Ray reads this when it is first imported; see ray/_private/auto_init_hook.py).
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
}


def load_example(name: str):
    """`examples/<name>.py` imported as a module (examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> EngineConfig:
    """A 2-layer random-weight model on the real tokenizer (fast; outputs are arbitrary but
    deterministic)."""
    return EngineConfig(random_model=dict(TINY), **overrides)


@pytest_asyncio.fixture(scope="session")
async def real_engine():
    """One engine on the embedded SmolLM2 model for the whole session (float32, CPU)."""
    engine = await Engine.start(EngineConfig(name="real"))
    yield engine
    await engine.close()


@pytest_asyncio.fixture
async def tiny_engine():
    """A fresh tiny random engine per test."""
    engine = await Engine.start(tiny_config())
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
def hf_model():
    """transformers' own model on the same weights, for reference outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    from parrot_actors.engines.model_loader import default_model_path

    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
