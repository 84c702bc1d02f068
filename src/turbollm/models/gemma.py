"""Gemma 3 decoder (llama.cpp `src/models/gemma3.cpp`, transformers `Gemma3TextModel`).

    x = embed(tok) * sqrt(n_embd)
    per layer:  h = x + post_attn_norm(attn(attn_norm(x)))      # sandwich norms
                x = h + post_ffn_norm(down(gelu_tanh(gate(n)) * up(n))),  n = ffn_norm(h)
    attn: q, k per-head RMS-normed, RoPE (NeoX) with base 1e4 on sliding layers and 1e6 on global
          ones, q.k * attn_scale, causal, sliding layers see the last `sliding_window` positions
    logits = final_norm(x) @ embed.T   (tied LM head), optionally soft-capped

Weights stay quantized (`QTensor`); every matmul goes through `turbollm.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm import kernels
from turbollm.config import ModelConfig
from turbollm.errors import GGUFError
from turbollm.gguf import quants
from turbollm.gguf.reader import GGUFFile
from turbollm.kernels import QTensor
from turbollm.kv.cache import KVCache, LayerKVShape
from turbollm.models.layers import Rope, gelu_tanh, rms_norm


@dataclass(frozen=True)
class GemmaLayerWeights:
    attn_norm: torch.Tensor
    wq: QTensor
    wk: QTensor
    wv: QTensor
    wo: QTensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: QTensor
    w_up: QTensor
    w_down: QTensor
    post_ffn_norm: torch.Tensor


class _TensorLoader:
    """Fetches tensors from a GGUF, checking names, shapes and types with one-line errors."""

    def __init__(self, gf: GGUFFile, device: torch.device | str):
        self.gf, self.device = gf, device

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.gf.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.gf.path}: missing tensor '{name}' (expected shape {shape})")
        if info.shape != shape:
            raise GGUFError(f"{self.gf.path}: tensor '{name}' has shape {info.shape}, expected {shape}")
        if not quants.is_supported(info.qtype):
            raise GGUFError(f"{self.gf.path}: tensor '{name}' has quantization type {info.qtype.name}, which turbollm cannot compute")
        return info

    def quantized(self, name: str, shape: tuple[int, ...]) -> QTensor:
        info = self._info(name, shape)
        return QTensor(self.gf.tensor_bytes(name), info.qtype, info.shape, name).to(self.device)

    def dense(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A small tensor (norm weights) as float32 on the device."""
        return self.quantized(name, shape).dequantize().to(self.device)

    def has(self, name: str) -> bool:
        return name in self.gf.tensors


class Gemma:
    def __init__(self, cfg: ModelConfig, token_embd: QTensor, output: QTensor, output_norm: torch.Tensor,
                 layers: list[GemmaLayerWeights], device: torch.device | str = "cpu"):
        self.cfg, self.token_embd, self.output, self.output_norm, self.layers = cfg, token_embd, output, output_norm, layers
        self.device = torch.device(device)
        self.rope_global = Rope(cfg.head_dim[0], cfg.rope_base, cfg.rope_freq_scale, device)
        self.rope_swa = Rope(cfg.head_dim[0], cfg.rope_base_swa, 1.0, device)

    @classmethod
    def from_gguf(cls, gf: GGUFFile, cfg: ModelConfig, device: torch.device | str = "cpu") -> "Gemma":
        t = _TensorLoader(gf, device)
        d = cfg.n_embd
        token_embd = t.quantized("token_embd.weight", (cfg.n_vocab, d))
        output = t.quantized("output.weight", (cfg.n_vocab, d)) if t.has("output.weight") else token_embd
        layers = []
        for il in range(cfg.n_layer):
            p, hd, n_kv, ff = f"blk.{il}.", cfg.head_dim[il], cfg.n_head_kv[il], cfg.n_ff[il]
            layers.append(GemmaLayerWeights(
                attn_norm=t.dense(p + "attn_norm.weight", (d,)),
                wq=t.quantized(p + "attn_q.weight", (cfg.n_head * hd, d)),
                wk=t.quantized(p + "attn_k.weight", (n_kv * hd, d)),
                wv=t.quantized(p + "attn_v.weight", (n_kv * hd, d)),
                wo=t.quantized(p + "attn_output.weight", (d, cfg.n_head * hd)),
                q_norm=t.dense(p + "attn_q_norm.weight", (hd,)),
                k_norm=t.dense(p + "attn_k_norm.weight", (hd,)),
                post_attn_norm=t.dense(p + "post_attention_norm.weight", (d,)),
                ffn_norm=t.dense(p + "ffn_norm.weight", (d,)),
                w_gate=t.quantized(p + "ffn_gate.weight", (ff, d)),
                w_up=t.quantized(p + "ffn_up.weight", (ff, d)),
                w_down=t.quantized(p + "ffn_down.weight", (d, ff)),
                post_ffn_norm=t.dense(p + "post_ffw_norm.weight", (d,)),
            ))
        return cls(cfg, token_embd, output, t.dense("output_norm.weight", (d,)), layers, device)

    def kv_layout(self) -> list[LayerKVShape]:
        return [LayerKVShape(self.cfg.n_head_kv[il], self.cfg.head_dim[il]) for il in range(self.cfg.n_layer)]

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.kv_layout(), capacity, self.device)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run tokens `ids` [T] that follow the cache's contents; returns final-normed hidden [T, n_embd]."""
        cfg = self.cfg
        n_new = ids.shape[0]
        cache.check_room(n_new)
        positions = torch.arange(cache.n_tokens, cache.n_tokens + n_new, device=self.device)
        x = kernels.embedding(ids.to(self.device), self.token_embd) * cfg.embed_scale
        for il, w in enumerate(self.layers):
            h = x + rms_norm(self._attention(il, w, rms_norm(x, w.attn_norm, cfg.rms_eps), positions, cache),
                             w.post_attn_norm, cfg.rms_eps)
            n = rms_norm(h, w.ffn_norm, cfg.rms_eps)
            ffn = kernels.linear(gelu_tanh(kernels.linear(n, w.w_gate)) * kernels.linear(n, w.w_up), w.w_down)
            x = h + rms_norm(ffn, w.post_ffn_norm, cfg.rms_eps)
        cache.advance(n_new)
        return rms_norm(x, self.output_norm, cfg.rms_eps)

    def _attention(self, il: int, w: GemmaLayerWeights, x: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        cfg = self.cfg
        n_tok, hd, n_kv = x.shape[0], cfg.head_dim[il], cfg.n_head_kv[il]
        q = rms_norm(kernels.linear(x, w.wq).view(n_tok, cfg.n_head, hd), w.q_norm, cfg.rms_eps)
        k = rms_norm(kernels.linear(x, w.wk).view(n_tok, n_kv, hd), w.k_norm, cfg.rms_eps)
        v = kernels.linear(x, w.wv).view(n_tok, n_kv, hd)
        rope = self.rope_swa if cfg.is_swa(il) else self.rope_global
        q, k = rope(q, positions), rope(k, positions)
        k_all, v_all, k_pos = cache.store(il, k, v)
        window = cfg.sliding_window if cfg.is_swa(il) else 0
        out = kernels.attention(q, k_all, v_all, positions, k_pos, cfg.attn_scale, window)
        return kernels.linear(out.reshape(n_tok, cfg.n_head * hd), w.wo)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [T, n_embd] -> [T, n_vocab] float32, soft-capped if the model says so."""
        logits = kernels.linear(hidden, self.output)
        cap = self.cfg.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits
