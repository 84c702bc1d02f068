"""The Gemma decoder, Gemma 3 and Gemma 4 (llama.cpp `src/models/gemma3.cpp`, `gemma4.cpp`;
transformers `Gemma3TextModel`, `Gemma4TextModel`). One forward, the differences as flags:

    x = embed(tok) * sqrt(n_embd)
    per layer:
      h = x + post_attn_norm(attn(attn_norm(x)))                     # sandwich norms
      f = mlp(ffn_norm(h))                                           # down(gelu_tanh(gate) * up)
      [MoE]  f = post_ffn_norm_1(f) + moe(h)                         # Gemma 4 26B-A4B (models/moe.py)
      x = h + post_ffn_norm(f)
      [PLE]  x = x + ple_post_norm(ple_proj(gelu_tanh(ple_gate(x)) * per_layer_input[il]))
      [scale] x = x * layer_output_scale
    attn: q, k RMS-normed per head, RoPE (NeoX) per layer type, q.k * attn_scale; Gemma 4 also
          RMS-norms v (no weight), may take V from the K projection (no attn_v: "K=V"), and its
          last `n_kv_shared` layers read the K/V of an earlier layer instead of computing their own.
    logits = final_norm(x) @ embed.T   (tied), soft-capped when the model says so

Weights stay quantized (`QTensor`); every matmul goes through `turbollm.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from turbollm import kernels
from turbollm.config import ModelConfig
from turbollm.gguf.reader import GGUFFile
from turbollm.kernels import QTensor
from turbollm.kv.cache import KVCache
from turbollm.kv.plan import CacheConfig, KVPlan, LayerKVShape, plan_kv
from turbollm.kernels import blocks
from turbollm.kernels.blocks import AttentionBlock, FfnBlock, MoEBlock
from turbollm.models.layers import Rope
from turbollm.models.moe import load_moe_block
from turbollm.models.weights import TensorLoader


@dataclass(frozen=True)
class PleLayerWeights:
    gate: QTensor  # inp_gate (n_embd_per_layer, n_embd)
    proj: QTensor  # proj (n_embd, n_embd_per_layer)
    post_norm: torch.Tensor  # (n_embd,)


@dataclass(frozen=True)
class GemmaLayer:
    attn: AttentionBlock  # x -> h = x + post_attention_norm(attention(attn_norm(x)))
    ffn: FfnBlock  # dense MLP; post_norm is post_ffw_norm, or post_ffw_norm_1 in a MoE layer
    post_ffn_norm: torch.Tensor | None = None  # MoE layers: post_ffw_norm over dense + experts
    moe: MoEBlock | None = None
    ple: PleLayerWeights | None = None
    out_scale: torch.Tensor | None = None  # Gemma 4 layer_output_scale, shape (1,)


def load_layer(t: TensorLoader, cfg: ModelConfig, il: int, has_kv: bool | None = None) -> GemmaLayer:
    """Layer `il`'s weights; has_kv=False for a layer with only a query projection (a KV-shared
    layer, or an MTP assistant's layer reading the target's K/V)."""
    p, d, hd, n_kv, ff = f"blk.{il}.", cfg.n_embd, cfg.head_dim[il], cfg.n_head_kv[il], cfg.n_ff[il]
    has_kv = cfg.has_kv(il) if has_kv is None else has_kv
    attn = AttentionBlock(
        norm=t.dense(p + "attn_norm.weight", (d,)),
        wq=t.quantized(p + "attn_q.weight", (cfg.n_head * hd, d)),
        wk=t.quantized(p + "attn_k.weight", (n_kv * hd, d)) if has_kv else None,
        # Gemma 3 always has V; Gemma 4 global layers may use the K projection as V
        wv=(t.quantized(p + "attn_v.weight", (n_kv * hd, d)) if cfg.arch == "gemma3"
            else t.optional_quantized(p + "attn_v.weight", (n_kv * hd, d))) if has_kv else None,
        wo=t.quantized(p + "attn_output.weight", (d, cfg.n_head * hd)),
        q_norm=t.dense(p + "attn_q_norm.weight", (hd,)),
        k_norm=t.dense(p + "attn_k_norm.weight", (hd,)) if has_kv else None,
        post_norm=t.dense(p + "post_attention_norm.weight", (d,)),
        n_head=cfg.n_head, n_kv=n_kv, head_dim=hd, v_norm=cfg.v_norm, scale=cfg.attn_scale,
        window=cfg.sliding_window if cfg.is_swa(il) else 0, eps=cfg.rms_eps,
    )
    post_ffw_norm = t.dense(p + "post_ffw_norm.weight", (d,))
    ffn = FfnBlock(
        norm=t.dense(p + "ffn_norm.weight", (d,)),
        gate=t.quantized(p + "ffn_gate.weight", (ff, d)),
        up=t.quantized(p + "ffn_up.weight", (ff, d)),
        down=t.quantized(p + "ffn_down.weight", (d, ff)),
        post_norm=t.dense(p + "post_ffw_norm_1.weight", (d,)) if cfg.is_moe else post_ffw_norm,
        eps=cfg.rms_eps,
    )
    return GemmaLayer(
        attn=attn, ffn=ffn,
        post_ffn_norm=post_ffw_norm if cfg.is_moe else None,
        moe=load_moe_block(t, p, cfg) if cfg.is_moe else None,
        ple=PleLayerWeights(
            gate=t.quantized(p + "inp_gate.weight", (cfg.n_embd_per_layer, d)),
            proj=t.quantized(p + "proj.weight", (d, cfg.n_embd_per_layer)),
            post_norm=t.dense(p + "post_norm.weight", (d,)),
        ) if cfg.n_embd_per_layer else None,
        out_scale=t.optional_dense(p + "layer_output_scale.weight", (1,)),
    )


@dataclass(frozen=True)
class PleWeights:
    """Per-Layer Embeddings (E2B/E4B): a second, wide token table looked up row by row."""

    token_embd: QTensor  # per_layer_token_embd (n_vocab, n_layer * n_embd_per_layer): never dequantized whole
    model_proj: QTensor  # per_layer_model_proj (n_layer * n_embd_per_layer, n_embd)
    proj_norm: torch.Tensor  # (n_embd_per_layer,)


class Gemma:
    def __init__(self, cfg: ModelConfig, token_embd: QTensor, output: QTensor, output_norm: torch.Tensor,
                 layers: list[GemmaLayer], ple: PleWeights | None = None,
                 rope_freq_factors: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 ops: kernels.Backend | None = None):
        self.cfg, self.token_embd, self.output, self.output_norm = cfg, token_embd, output, output_norm
        self.layers, self.ple, self.device = layers, ple, torch.device(device)
        self.ops = ops if ops is not None else kernels.reference.ReferenceBackend()  # the kernel backend (turbollm.kernels.backend)
        # named taps (llama.cpp's cb(cur, name, il)): tap(name, il, tensor) after every step of
        # every layer; while set, the blocks run composed from the backend's single ops (the same
        # products as its fused blocks) so that their insides are visible. il -1: outside layers.
        self.tap: Callable[[str, int, torch.Tensor], None] | None = None
        self.ropes = {
            True: Rope(_swa_dim(cfg), cfg.rope_base_swa, 1.0, None, device),
            False: Rope(_global_dim(cfg), cfg.rope_base, cfg.rope_freq_scale, rope_freq_factors, device),
        }

    @classmethod
    def from_gguf(cls, gf: GGUFFile, cfg: ModelConfig, device: torch.device | str = "cpu",
                  ops: kernels.Backend | None = None, placement: dict[str, str] | None = None) -> "Gemma":
        """`placement` (the planner's): tensors kept off `device`: the input embedding and the
        experts of --n-cpu-moe layers, computed where they are; only activations cross."""
        t = TensorLoader(gf, device, placement)
        d = cfg.n_embd
        token_embd = t.quantized("token_embd.weight", (cfg.n_vocab, d))
        output = t.optional_quantized("output.weight", (cfg.n_vocab, d)) or token_embd
        layers = [load_layer(t, cfg, il) for il in range(cfg.n_layer)]
        ple = None
        if cfg.n_embd_per_layer:
            width = cfg.n_layer * cfg.n_embd_per_layer
            ple = PleWeights(
                token_embd=t.quantized("per_layer_token_embd.weight", (cfg.n_vocab, width)),
                model_proj=t.quantized("per_layer_model_proj.weight", (width, d)),
                proj_norm=t.dense("per_layer_proj_norm.weight", (cfg.n_embd_per_layer,)),
            )
        freq_factors = None
        if cfg.arch == "gemma4" and not all(cfg.swa_layers):
            freq_factors = t.optional_dense("rope_freqs.weight", (_global_dim(cfg) // 2,))
        return cls(cfg, token_embd, output, t.dense("output_norm.weight", (d,)), layers, ple, freq_factors, device, ops)

    def kv_layout(self) -> list[LayerKVShape | None]:
        return self.cfg.kv_layout()

    def new_cache_plan(self, capacity: int, config: CacheConfig = CacheConfig()) -> KVPlan:
        return plan_kv(self.kv_layout(), capacity, config)

    def new_cache(self, capacity: int, config: CacheConfig = CacheConfig()) -> KVCache:
        """A sequence's cache; its quantized keys are conditioned along each layer's RoPE."""
        rope_freqs = [self.ropes[self.cfg.is_swa(il)].inv_freq for il in range(self.cfg.n_layer)]
        return KVCache(self.new_cache_plan(capacity, config), self.device, rope_freqs)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, commit: bool = True) -> torch.Tensor:
        """Run tokens `ids` [T] that follow the cache's contents; returns final-normed hidden
        [T, n_embd]. commit=False leaves the step open: the caller keeps what it accepts with
        `cache.advance(k)` (speculative decoding)."""
        return self.forward_batch([ids], [cache], commit)

    @torch.inference_mode()
    def forward_batch(self, ids: list[torch.Tensor], caches: list[KVCache], commit: bool = True) -> torch.Tensor:
        """One step of several sequences: `ids[i]` [T_i] follow `caches[i]`. Returns the hidden
        rows of all of them, concatenated in order. The projections, FFNs and experts see every
        row at once (each weight read once per step); attention runs per sequence on its own
        cache. Row results do not depend on the other rows of the batch (the decode kernels
        quantize and reduce each row on its own), so a sequence decodes the same tokens batched
        as alone."""
        cfg = self.cfg
        for seq_ids, cache in zip(ids, caches, strict=True):
            cache.begin(seq_ids.shape[0])
        rows = [(sum(t.shape[0] for t in ids[:i]), t.shape[0]) for i, t in enumerate(ids)]
        positions = [torch.arange(c.n_tokens, c.n_tokens + t.shape[0], device=self.device) for t, c in zip(ids, caches)]
        all_ids = torch.cat(ids).to(self.device)
        x = self.ops.embedding(all_ids.to(self.token_embd.device), self.token_embd).to(self.device) * cfg.embed_scale
        per_layer_input = self._per_layer_inputs(all_ids, x) if self.ple is not None else None
        angles = [{swa: rope.angles(p) for swa, rope in self.ropes.items()} for p in positions]
        ops, eps, tap = self.ops, cfg.rms_eps, self.tap
        if tap is not None:
            tap("inp_scaled", -1, x)
        for il, w in enumerate(self.layers):
            attention_block, ffn_block, moe_block, tap_l = ops.attention_block, ops.ffn_block, ops.moe_block, None
            if tap is not None:
                tap_l = partial(_layer_tap, tap, il)
                attention_block = partial(blocks.attention_block, ops, tap=tap_l)
                ffn_block = partial(blocks.ffn_block, ops, tap=tap_l)
                moe_block = partial(blocks.moe_block, ops, tap=tap_l)
            src, store = (il, True) if cfg.has_kv(il) else (cfg.kv_source(il), False)
            parts = [attention_block(x[at:at + n], w.attn, a[cfg.is_swa(il)], c.slots(src, store=store), p)
                     for (at, n), a, c, p in zip(rows, angles, caches, positions)]
            h = parts[0] if len(parts) == 1 else torch.cat(parts)
            if tap_l:
                tap_l("attn_out", h)
            if w.moe is None:
                x = ffn_block(h, w.ffn, residual=h)
            else:
                moe = moe_block(h.to(w.moe.gate.device), w.moe).to(h.device)  # host experts: a hop
                mlp = ffn_block(h, w.ffn)
                if tap_l:
                    tap_l("ffn_mlp", mlp), tap_l("ffn_moe", moe)
                x = h + ops.rms_norm(mlp + moe, w.post_ffn_norm, eps)
            if w.ple is not None:
                gated = ops.gelu_mul(ops.linear(x, w.ple.gate), per_layer_input[:, il])
                x = x + ops.rms_norm(ops.linear(gated, w.ple.proj), w.ple.post_norm, eps)
            if w.out_scale is not None:
                x = x * w.out_scale
            if tap_l:
                tap_l("l_out", x)
        if commit:
            for cache in caches:
                cache.advance()
        x = ops.rms_norm(x, self.output_norm, eps)
        if tap is not None:
            tap("result_norm", -1, x)
        return x

    def _per_layer_inputs(self, ids: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[T, n_layer, n_embd_per_layer]: (rms_norm(proj(x0) / sqrt(n_embd)) + table[ids] * sqrt(ple)) / sqrt(2)."""
        cfg, ple = self.cfg, self.ple
        shape = (ids.shape[0], cfg.n_layer, cfg.n_embd_per_layer)
        from_token = self.ops.embedding(ids, ple.token_embd).view(shape) * math.sqrt(cfg.n_embd_per_layer)
        from_context = (self.ops.linear(x0, ple.model_proj) * cfg.n_embd ** -0.5).view(shape)
        from_context = self.ops.rms_norm(from_context, ple.proj_norm, cfg.rms_eps)
        return (from_context + from_token) * 2.0 ** -0.5

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [T, n_embd] -> [T, n_vocab] float32, soft-capped if the model says so."""
        logits = self.ops.linear(hidden, self.output)
        cap = self.cfg.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits


def _layer_tap(tap: Callable[[str, int, torch.Tensor], None], il: int, name: str, t: torch.Tensor) -> None:
    tap(name, il, t)


def _swa_dim(cfg: ModelConfig) -> int:
    dims = {cfg.head_dim[il] for il in range(cfg.n_layer) if cfg.is_swa(il)}
    return dims.pop() if dims else cfg.head_dim[0]


def _global_dim(cfg: ModelConfig) -> int:
    dims = {cfg.head_dim[il] for il in range(cfg.n_layer) if not cfg.is_swa(il)}
    return dims.pop() if dims else cfg.head_dim[0]
