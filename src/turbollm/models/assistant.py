"""Gemma 4's MTP assistant head: a small drafter that reads the target's K/V instead of keeping
its own (transformers `Gemma4AssistantForCausalLM`, llama.cpp `src/models/gemma4-assistant.cpp`;
the fixture README in tests/data/gemma4-tiny-assistant has the details and numbers).

One draft step, for token `tok` at position P (the target's cache holds 0 .. P-1):

    x = pre_projection(concat(target_embed(tok) * sqrt(n_embd_target), h))     # h: [n_embd_target]
    per layer: a Gemma 4 layer whose attention has only a query projection and reads the target
               cache of the target's last sliding layer (sliding layers) or last global layer
    y = output_norm(x)
    logits = y @ token_embd.T            (the head's own table, tied; no soft-cap)
    h_out  = post_projection(y)          (the next step's h)

The first step takes the target's final-normed hidden row at P-1; later steps feed back h_out
and keep position P (every draft of a round sits at the same position, as in both references).
A sliding query at P sees the target's keys P-W+1 .. P-1, llama.cpp's window (the fixture's
`hf_w_*` records; transformers' own mask sees W+1 keys, the README shows the difference).

Ordered embeddings (E2B/E4B heads): with `masked_embd.centroids.weight` [n_centroids, n_embd]
and `masked_embd.token_ordering.weight` [n_vocab] in the GGUF (llama.cpp's converter drops
them, so only files that keep them have them), the head scores clusters, keeps the top
`masked_embd.top_k` and computes logits for those clusters' tokens only; the others get the
minimum of those minus 1, as transformers does.
"""

from __future__ import annotations

import os

import torch

from turbollm.config import ModelConfig, assistant_config
from turbollm.errors import GGUFError, TurbollmError
from turbollm.gguf.reader import GGUFFile
from turbollm.kernels import QTensor
from turbollm.models.gemma import Gemma, load_layer
from turbollm.models.weights import TensorLoader


class Assistant:
    def __init__(self, cfg: ModelConfig, body: Gemma, pre_projection: QTensor, post_projection: QTensor,
                 target_layers: dict[bool, int], centroids: torch.Tensor | None = None,
                 token_ordering: torch.Tensor | None = None, centroid_top_k: int = 0):
        self.cfg, self.body = cfg, body
        self.pre_projection, self.post_projection = pre_projection, post_projection
        self.target_layers = target_layers  # is_swa -> the target layer whose K/V the head reads
        self.centroids, self.token_ordering, self.centroid_top_k = centroids, token_ordering, centroid_top_k

    @classmethod
    def load(cls, path: str | os.PathLike[str], target: Gemma, device: torch.device | str = "cpu") -> "Assistant":
        """Open an assistant GGUF and check it against the target it will draft for."""
        gf = GGUFFile(path)
        where = str(gf.path)
        cfg, n_embd_out = assistant_config(gf.metadata, where)
        tcfg = target.cfg
        _check_matches(where, cfg, n_embd_out, tcfg)
        t = TensorLoader(gf, target.device)  # the head computes where the target does, its table too
        layers = [load_layer(t, cfg, il, has_kv=False) for il in range(cfg.n_layer)]
        freq_factors = t.optional_dense("rope_freqs.weight", (cfg.head_dim[cfg.swa_layers.index(False)] // 2,)) \
            if not all(cfg.swa_layers) else None
        token_embd = t.quantized("token_embd.weight", (cfg.n_vocab, cfg.n_embd))
        body = Gemma(cfg, token_embd, token_embd, t.dense("output_norm.weight", (cfg.n_embd,)), layers,
                     rope_freq_factors=freq_factors, device=target.device, ops=target.ops)
        pre = t.quantized("nextn.pre_projection.weight", (cfg.n_embd, 2 * tcfg.n_embd))
        post = t.quantized("nextn.post_projection.weight", (tcfg.n_embd, cfg.n_embd))
        last = {swa: max(il for il in range(tcfg.n_layer) if tcfg.is_swa(il) == swa) for swa in set(cfg.swa_layers)}
        target_layers = {swa: tcfg.kv_source(il) for swa, il in last.items()}
        centroids = ordering = None
        top_k = 0
        if t.has("masked_embd.centroids.weight"):
            n_centroids = gf.tensors["masked_embd.centroids.weight"].shape[0]
            centroids = t.dense("masked_embd.centroids.weight", (n_centroids, cfg.n_embd))
            ordering = t.dense("masked_embd.token_ordering.weight", (cfg.n_vocab,)).long()
            top_k = int(gf.get("gemma4-assistant.masked_embd.top_k", 0) or 0)
            if not 0 < top_k <= n_centroids or cfg.n_vocab % n_centroids:
                raise GGUFError(f"{where}: ordered embeddings need 0 < masked_embd.top_k <= {n_centroids} "
                                f"clusters dividing the {cfg.n_vocab}-token vocabulary, got top_k {top_k}")
        return cls(cfg, body, pre, post, target_layers, centroids, ordering, top_k)

    @torch.inference_mode()
    def step(self, token: int, h: torch.Tensor, target: Gemma, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step at position cache.n_tokens: (logits [n_vocab], h_out [n_embd_target])."""
        ops, cfg = self.body.ops, self.cfg
        ids = torch.tensor([token], device=target.device)
        e = ops.embedding(ids, target.token_embd) * target.cfg.embed_scale
        x = ops.linear(torch.cat([e, h.reshape(1, -1).to(e.dtype)], dim=-1), self.pre_projection)
        positions = torch.tensor([cache.n_tokens], device=target.device)
        angles = {swa: rope.angles(positions) for swa, rope in self.body.ropes.items()}
        cache.begin(0)  # an empty step: the head reads the committed K/V and writes nothing
        for il, w in enumerate(self.body.layers):
            swa = cfg.is_swa(il)
            slots = cache.slots(self.target_layers[swa], store=False)
            h1 = ops.attention_block(x, w.attn, angles[swa], slots, positions)
            x = ops.ffn_block(h1, w.ffn, residual=h1)
            if w.out_scale is not None:
                x = x * w.out_scale
        y = ops.rms_norm(x, self.body.output_norm, cfg.rms_eps)
        return self.logits(y)[0], ops.linear(y, self.post_projection)[0]

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """[T, n_embd] -> [T, n_vocab]: the tied table, or only the top clusters' tokens."""
        ops = self.body.ops
        if self.centroids is None:
            return ops.linear(y, self.body.token_embd)
        n_centroids = self.centroids.shape[0]
        clusters = torch.topk(y @ self.centroids.T, self.centroid_top_k, dim=-1).indices  # [T, top_k]
        table = self.token_ordering.view(n_centroids, -1)
        out = []
        for row, chosen in zip(y, clusters):
            ids = table[chosen].reshape(-1)
            scores = ops.embedding(ids, self.body.token_embd) @ row
            full = torch.full((self.cfg.n_vocab,), float(scores.min()) - 1.0, device=y.device)
            full[ids] = scores
            out.append(full)
        return torch.stack(out)

    def drafter(self, target: Gemma, cache, p_min: float = 0.0) -> "MtpDrafter":
        return MtpDrafter(self, target, cache, p_min)


class MtpDrafter:
    """Greedy drafts from the assistant head for one sequence (engine/speculative.py Drafter)."""

    def __init__(self, assistant: Assistant, target: Gemma, cache, p_min: float = 0.0):
        self.assistant, self.target, self.cache, self.p_min = assistant, target, cache, p_min
        self.hidden: torch.Tensor | None = None

    def observe(self, hidden_row: torch.Tensor) -> None:
        self.hidden = hidden_row

    def propose(self, history: list[int], n_max: int) -> list[int]:
        if self.hidden is None:
            return []
        token, h, drafts = history[-1], self.hidden, []
        for _ in range(n_max):
            logits, h = self.assistant.step(token, h, self.target, self.cache)
            token = int(torch.argmax(logits))
            if self.p_min > 0.0 and float(torch.softmax(logits, -1)[token]) < self.p_min:
                break  # --draft-p-min: the head is unsure; verifying more costs more than it saves
            drafts.append(token)
        return drafts


def _check_matches(where: str, cfg: ModelConfig, n_embd_out: int, target: ModelConfig) -> None:
    """A head drafts only for the model it was trained with: one-line errors otherwise."""
    problems = []
    if target.arch != "gemma4":
        problems.append(f"the target is {target.arch}, the head is for gemma4")
    if n_embd_out != target.n_embd:
        problems.append(f"its backbone width is {n_embd_out}, the target's hidden size {target.n_embd}")
    if cfg.n_vocab != target.n_vocab:
        problems.append(f"its vocabulary has {cfg.n_vocab} tokens, the target's {target.n_vocab}")
    for swa in sorted(set(cfg.swa_layers)):
        kind = "sliding" if swa else "global"
        head = [il for il in range(cfg.n_layer) if cfg.is_swa(il) == swa]
        tlay = [il for il in range(target.n_layer) if target.is_swa(il) == swa]
        if not tlay:
            problems.append(f"it has {kind} layers, the target none")
            continue
        if {cfg.head_dim[il] for il in head} != {target.head_dim[tlay[-1]]} or \
                {cfg.n_head_kv[il] for il in head} != {target.n_head_kv[tlay[-1]]}:
            problems.append(f"its {kind} layers' head size / KV heads differ from the target's")
    if cfg.sliding_window != target.sliding_window and any(cfg.swa_layers):
        problems.append(f"its sliding window is {cfg.sliding_window}, the target's {target.sliding_window}")
    if problems:
        raise TurbollmError(f"{where}: this assistant head does not match the target model: " + "; ".join(problems))
