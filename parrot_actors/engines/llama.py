"""Our own forward pass for the Llama family over a paged KV cache.

RMSNorm, rotary position embedding (inv_freq and scaling from transformers' own
`LlamaRotaryEmbedding`, so every rope_type the config names is computed the library's way),
grouped-query attention through an `AttentionBackend`, SwiGLU MLP, tied or separate LM head.
Source: Touvron et al., "Llama 2" (2023) §2; the transformers `modeling_llama` reference.
Weights are taken from a Hugging Face state dict; q/k/v and gate/up projections are fused so a
layer does three matmuls instead of seven. With `kernels=True` (CPU, float32) every matmul runs
the engine's packed kernel (`cpu_kernels.packed_linear`) over weights packed once at load, and
the elementwise work runs fused (`cpu_kernels`: residual add + RMSNorm, rotary + KV write,
SwiGLU); decode attention is the backend's (`TorchAttention(decode_kernel=True)` reads the paged
blocks in place), and a step of decodes only runs each layer as one `decoder_layer` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parrot_actors.cuda.backend import AttentionBackend
from parrot_actors.cuda.layout import BatchLayout
from parrot_actors.cuda.torch_backend import (
    TorchAttention,
    host_ints,
    kv_slot_rows,
    write_kv_flat,
)
from parrot_actors.engines.cpu_kernels import (
    LayerOperands,
    PackedWeight,
    add_rms_norm_,
    decoder_layer,
    layer_operands,
    pack_weight,
    pack_weight_int8,
    packed_linear,
    rms_norm,
    rope_store_kv_,
    silu_mul,
)
from parrot_actors.engines.model_loader import LoadedModel
from parrot_actors.errors import EngineError

Weight = torch.Tensor | PackedWeight
"""A matmul weight: `[out_features, in_features]`, or the same packed for the CPU kernel."""


def _linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """`x @ w.T`: x `[num_tokens, in_features]` -> `[num_tokens, out_features]`."""
    return packed_linear(x, w) if isinstance(w, PackedWeight) else F.linear(x, w)


class _Layer:
    """One decoder layer's weights (on the runner's device and dtype; matmul weights packed
    for the CPU kernel when `packed`, quantized to int8 and packed when `int8`)."""

    def __init__(
        self,
        sd: dict[str, torch.Tensor],
        prefix: str,
        dev: torch.device,
        dtype: torch.dtype,
        packed: bool,
        int8: bool,
    ) -> None:
        def w(name: str) -> torch.Tensor:
            return sd[prefix + name].to(device=dev, dtype=dtype)

        def mat(t: torch.Tensor) -> Weight:
            return pack_weight_int8(t) if int8 else pack_weight(t) if packed else t

        # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]
        self.qkv = mat(
            torch.cat(
                [
                    w("self_attn.q_proj.weight"),
                    w("self_attn.k_proj.weight"),
                    w("self_attn.v_proj.weight"),
                ]
            )
        )
        self.o = mat(w("self_attn.o_proj.weight"))  # [hidden, num_heads * head_dim]
        # [2 * intermediate, hidden]
        self.gate_up = mat(torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]))
        self.down = mat(w("mlp.down_proj.weight"))  # [hidden, intermediate]
        self.norm1 = w("input_layernorm.weight")  # [hidden]
        self.norm2 = w("post_attention_layernorm.weight")  # [hidden]
        # The same weights as `decoder_layer` takes them (packed only).
        self.operands: LayerOperands | None = None
        if isinstance(self.qkv, PackedWeight):
            mats = (self.qkv, self.o, self.gate_up, self.down)
            assert all(isinstance(m, PackedWeight) for m in mats), "packed together"
            self.operands = layer_operands(*mats)  # type: ignore[arg-type]


class LlamaRunner:
    """Runs Llama forward passes for one engine step at a time.

    Attributes: num_layers, num_heads, num_kv_heads, head_dim, vocab_size, max_len (the
    config's max_position_embeddings, in tokens), eos_token_ids, kernels (whether matmuls run
    the packed CPU kernel), int8 (whether their weights are weight-only int8). `kernels=True`
    needs a CPU device, float32 and `cpu_kernels.load_kernels()` to have succeeded, `int8=True`
    needs `kernels=True`; raises `EngineError` otherwise.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        dtype: torch.dtype,
        backend: AttentionBackend,
        kernels: bool = False,
        int8: bool = False,
    ) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = loaded.config
        sd = loaded.state_dict
        self.device, self.dtype, self.backend = device, dtype, backend
        if (kernels or int8) and (device.type != "cpu" or dtype != torch.float32):
            raise EngineError(f"the packed CPU kernels need cpu/float32, not {device}/{dtype}")
        if int8 and not kernels:
            raise EngineError("int8 weights run only in the packed CPU kernels (kernels=True)")
        self.kernels, self.int8 = kernels, int8
        # Decode steps run whole layers in one kernel call where this backend plans them.
        self._fused_attention = backend if kernels and isinstance(backend, TorchAttention) else None
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads or self.num_heads)
        self.hidden = int(cfg.hidden_size)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.num_heads)
        self.vocab_size = int(cfg.vocab_size)
        self.max_len = int(cfg.max_position_embeddings)
        self.eps = float(cfg.rms_norm_eps)
        self.embed = sd["model.embed_tokens.weight"].to(device=device, dtype=dtype)  # [V, H]
        head = sd.get("lm_head.weight")
        lm_head = self.embed if head is None else head.to(device=device, dtype=dtype)
        # [vocab, hidden]; packed, a tied head is a second copy of the embedding (~113 MB for
        # the default model), the price of the kernel's layout.
        self.lm_head: Weight = (
            pack_weight_int8(lm_head) if int8 else pack_weight(lm_head) if kernels else lm_head
        )
        self.final_norm = sd["model.norm.weight"].to(device=device, dtype=dtype)  # [hidden]
        self.layers = [
            _Layer(sd, f"model.layers.{i}.", device, dtype, kernels, int8)
            for i in range(self.num_layers)
        ]
        rotary = LlamaRotaryEmbedding(cfg)
        pos = torch.arange(self.max_len, dtype=torch.float32)
        freqs = torch.outer(pos, rotary.inv_freq.float())  # [max_len, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_len, head_dim]
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)  # [max_len, head_dim]
        self.sin = (emb.sin() * scale).to(device=device, dtype=dtype)
        eos = getattr(loaded.tokenizer, "eos_token_id", None)
        gen_eos = getattr(cfg, "eos_token_id", None)
        ids = {eos} if eos is not None else set()
        ids |= set(
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )
        self.eos_token_ids = tuple(sorted(ids))
        self.row_tokens: list[int] | None = None  # a model's logits are sampled

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of K and V for one block of `block_size` tokens across all layers."""
        elem = int(torch.tensor([], dtype=self.dtype).element_size())
        return self.num_layers * 2 * block_size * self.num_kv_heads * self.head_dim * elem

    def allocate_kv(self, num_blocks: int, block_size: int) -> list[torch.Tensor]:
        """One zeroed cache per layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`."""
        shape = (num_blocks, 2, block_size, self.num_kv_heads, self.head_dim)
        return [
            torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)
        ]

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x `[num_tokens, hidden]` by w `[hidden]`."""
        if self.kernels:
            return rms_norm(x, w, self.eps)
        # Normalize in float32 as the reference does, whatever the model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def _add_rms(self, x: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The residual add `x += d` (in place) and the next RMSNorm of x."""
        if self.kernels:
            return add_rms_norm_(x, d, w, self.eps)
        x.add_(d)
        return self._rms(x, w)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`silu(gate) * up` of `[num_tokens, 2 * intermediate]` -> `[num_tokens, intermediate]`."""
        if self.kernels:
            return silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rope_store(
        self,
        qkv: torch.Tensor,
        pos: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor] | None,
        cache: torch.Tensor,
        kv_slots: torch.Tensor,
    ) -> torch.Tensor:
        """Rotary on the q and k heads of qkv `[T, (n_q + 2 n_kv) * hd]`, K and V into the
        layer's cache at `kv_slots`; returns q `[T, n_q, hd]`. pos: `[T]`; cos_sin: the
        step's rows of the tables, `[T, 1, hd]` each (None with the kernels, which read them
        by position)."""
        n_q, n_kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if cos_sin is None:
            rope_store_kv_(qkv, pos, self.cos, self.sin, cache, kv_slots, n_q, n_kv)
            return qkv[:, : n_q * hd].view(-1, n_q, hd)
        cos, sin = cos_sin
        qk, v = torch.split(qkv, [(n_q + n_kv) * hd, n_kv * hd], dim=-1)
        # One rotary pass over q and k heads together (rotate-half form): half the small ops.
        qk = qk.view(-1, n_q + n_kv, hd)  # [T, n_q + n_kv, hd]
        rot = torch.cat([-qk[..., hd // 2 :], qk[..., : hd // 2]], dim=-1)
        q, k = torch.split(qk * cos + rot * sin, [n_q, n_kv], dim=1)
        write_kv_flat(cache, k, v.view(-1, n_kv, hd), kv_slots)
        return q

    @torch.inference_mode()
    def forward(
        self,
        token_ids: list[int],
        positions: list[int],
        layout: BatchLayout,
        kv_caches: list[torch.Tensor],
        logit_rows: list[int],
    ) -> torch.Tensor:
        """One step: compute and store K/V for `token_ids`, return logits of `logit_rows`.

        token_ids, positions: `[num_tokens]` in the layout's token order. logit_rows: indices of
        the tokens whose next-token logits are wanted (the last new token of each sequence that
        samples or finishes a fill). Returns float32 `[len(logit_rows), vocab_size]`.
        With the kernels, each residual add is fused into the next norm and rotary into the
        KV write (`cpu_kernels`): 9 ops per layer instead of ~30, and a step of decodes only
        runs each layer as one `decoder_layer` call.
        """
        dev = self.device
        ids = host_ints(token_ids, dev)  # [T]
        pos = host_ints(positions, dev)  # [T]
        kv_slots = kv_slot_rows(layout, dev)  # [2T] rows of the flat cache
        self.backend.plan(layout)
        x = self.embed[ids]  # [T, hidden], a copy: the residual stream is updated in place
        h = self._rms(x, self.layers[0].norm1)
        fused = self._fused_attention
        dec = fused.kernel_decode() if fused is not None else None
        if dec is not None:
            self._decode_layers(x, h, pos, kv_slots, kv_caches, *dec)
        else:
            self._op_layers(x, h, pos, kv_slots, kv_caches)
        rows = host_ints(logit_rows, dev)
        h = self._rms(x[rows], self.final_norm)  # [R, hidden]
        return _linear(h, self.lm_head).float()  # [R, vocab]

    def _op_layers(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        pos: torch.Tensor,
        kv_slots: torch.Tensor,
        kv_caches: list[torch.Tensor],
    ) -> None:
        """Every layer of any step (prefills, decodes, shared prefixes), op by op through
        the attention backend: x `[T, hidden]` ends as the last layer's residual stream. h: x
        normed by the first layer's input norm; pos `[T]`; kv_slots `[2T]`."""
        n_q, hd = self.num_heads, self.head_dim
        cos_sin = None if self.kernels else (self.cos[pos][:, None, :], self.sin[pos][:, None, :])
        last = len(self.layers) - 1
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            q = self._rope_store(_linear(h, layer.qkv), pos, cos_sin, cache, kv_slots)
            attn = self.backend.forward(q, cache)  # [T, n_q, hd]
            h = self._add_rms(x, _linear(attn.reshape(-1, n_q * hd), layer.o), layer.norm2)
            mlp = _linear(self._swiglu(_linear(h, layer.gate_up)), layer.down)
            if i < last:
                h = self._add_rms(x, mlp, self.layers[i + 1].norm1)
            else:
                x.add_(mlp)

    def _decode_layers(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        pos: torch.Tensor,
        kv_slots: torch.Tensor,
        kv_caches: list[torch.Tensor],
        block_tables: torch.Tensor,
        kv_lens: torch.Tensor,
        scale: float,
    ) -> None:
        """Every layer of a decode step, one `cpu_kernels.decoder_layer` call each (the same
        kernels in the same order as `_op_layers`, from C++): x `[batch, hidden]` ends as the
        last layer's residual stream. h: x normed by the first layer's input norm;
        block_tables, kv_lens, scale: the attention backend's plan for the step."""
        last = len(self.layers) - 1
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            assert layer.operands is not None, "kernels=True packs every layer"
            h = decoder_layer(
                x,
                h,
                layer.operands,
                layer.norm2,
                self.layers[i + 1].norm1 if i < last else None,
                cache,
                pos,
                self.cos,
                self.sin,
                kv_slots,
                block_tables,
                kv_lens,
                self.num_heads,
                self.num_kv_heads,
                self.eps,
                scale,
            )
