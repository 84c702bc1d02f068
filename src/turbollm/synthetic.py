"""Write a synthetic Gemma 4 GGUF with the exact layout of a real model and random weights.

    python -m turbollm.synthetic -o gemma4-26b-a4b-synthetic-Q4_0.gguf --vocab-from TINY.gguf

The default preset is google/gemma-4-26B-A4B-it in the layout of its Q4_0 (QAT) GGUF: 30 layers
(5 sliding : 1 global), hidden 2816, 16 query heads, 8 KV heads x 256 on sliding layers and 2 x
512 on global layers (K = V there: no attn_v), a dense MLP of 2112 beside 128 experts of 704
(8 active), 262,144 tokens, window 1024; every matrix Q4_0 except the tied embedding (Q6_K, as
llama.cpp's quantizer writes it) and the F32 router, norms and scales: 658 tensors, 25.2 B
parameters, about 14.4 GB. It exists to measure loading, memory and speed at real scale on a
machine with no model downloads; its outputs are meaningless.

The vocabulary comes from a real Gemma 4 GGUF (`--vocab-from`, e.g. one of the tiny fixtures in
tests/data) and is padded with inert tokens to the preset's size. Tensors are written
one at a time, so memory use stays at the largest tensor.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType, GGUFWriter
from gguf.constants import LlamaFileType

from turbollm.gguf.reader import GGUFFile


@dataclass(frozen=True)
class Gemma4Shape:
    name: str
    n_layer: int = 30
    n_embd: int = 2816
    n_head: int = 16
    n_head_kv_swa: int = 8
    n_head_kv_global: int = 2
    head_dim_swa: int = 256
    head_dim_global: int = 512
    swa_period: int = 6  # every 6th layer is global
    n_ff: int = 2112
    n_expert: int = 128
    n_expert_used: int = 8
    n_ff_expert: int = 704
    n_vocab: int = 262_144
    sliding_window: int = 1024
    n_ctx_train: int = 262_144
    rope_partial: float = 0.25  # share of global-layer frequency pairs that rotate
    weight_type: QType = QType.Q4_0
    embd_type: QType = QType.Q6_K

    def is_swa(self, il: int) -> bool:
        return il % self.swa_period < self.swa_period - 1


PRESETS = {"26b-a4b": Gemma4Shape("Gemma 4 26B A4B (synthetic)")}


def tensor_plan(s: Gemma4Shape) -> list[tuple[str, tuple[int, ...], QType]]:
    """(name, logical shape outermost first, type) of every tensor, in file order."""
    w, f32 = s.weight_type, QType.F32
    plan: list[tuple[str, tuple[int, ...], QType]] = [
        ("token_embd.weight", (s.n_vocab, s.n_embd), s.embd_type),
        ("rope_freqs.weight", (s.head_dim_global // 2,), f32),
        ("output_norm.weight", (s.n_embd,), f32),
    ]
    d = s.n_embd
    for il in range(s.n_layer):
        p = f"blk.{il}."
        hd, n_kv = (s.head_dim_swa, s.n_head_kv_swa) if s.is_swa(il) else (s.head_dim_global, s.n_head_kv_global)
        plan += [
            (p + "attn_norm.weight", (d,), f32),
            (p + "attn_q.weight", (s.n_head * hd, d), w),
            (p + "attn_k.weight", (n_kv * hd, d), w),
        ]
        if s.is_swa(il):  # global layers take V from the K projection
            plan.append((p + "attn_v.weight", (n_kv * hd, d), w))
        plan += [
            (p + "attn_output.weight", (d, s.n_head * hd), w),
            (p + "attn_q_norm.weight", (hd,), f32),
            (p + "attn_k_norm.weight", (hd,), f32),
            (p + "post_attention_norm.weight", (d,), f32),
            (p + "layer_output_scale.weight", (1,), f32),
            (p + "ffn_norm.weight", (d,), f32),
            (p + "ffn_gate.weight", (s.n_ff, d), w),
            (p + "ffn_up.weight", (s.n_ff, d), w),
            (p + "ffn_down.weight", (d, s.n_ff), w),
            (p + "post_ffw_norm.weight", (d,), f32),
            (p + "post_ffw_norm_1.weight", (d,), f32),
            (p + "post_ffw_norm_2.weight", (d,), f32),
            (p + "pre_ffw_norm_2.weight", (d,), f32),
            (p + "ffn_gate_inp.weight", (s.n_expert, d), f32),
            (p + "ffn_gate_inp.scale", (d,), f32),
            (p + "ffn_gate_up_exps.weight", (s.n_expert, 2 * s.n_ff_expert, d), w),
            (p + "ffn_down_exps.weight", (s.n_expert, d, s.n_ff_expert), w),
            (p + "ffn_down_exps.scale", (s.n_expert,), f32),
        ]
    return plan


def architecture_metadata(s: Gemma4Shape) -> dict:
    """The `gemma4.*` keys of the file (what ModelConfig reads), without the vocabulary."""
    a = "gemma4."
    swa = [s.is_swa(il) for il in range(s.n_layer)]
    md = {a + key: value for key, value in [
        ("context_length", s.n_ctx_train), ("embedding_length", s.n_embd), ("block_count", s.n_layer),
        ("feed_forward_length", s.n_ff), ("attention.head_count", s.n_head),
        ("expert_count", s.n_expert), ("expert_used_count", s.n_expert_used),
        ("attention.key_length", s.head_dim_global), ("attention.value_length", s.head_dim_global),
        ("attention.sliding_window", s.sliding_window), ("attention.shared_kv_layers", 0),
        ("embedding_length_per_layer_input", 0), ("attention.key_length_swa", s.head_dim_swa),
        ("attention.value_length_swa", s.head_dim_swa), ("expert_feed_forward_length", s.n_ff_expert),
        ("rope.dimension_count", s.head_dim_global), ("rope.dimension_count_swa", s.head_dim_swa),
    ]}
    md[a + "attention.head_count_kv"] = [s.n_head_kv_swa if x else s.n_head_kv_global for x in swa]
    md[a + "attention.sliding_window_pattern"] = swa
    md[a + "rope.freq_base"] = 1_000_000.0
    md[a + "rope.freq_base_swa"] = 10_000.0
    md[a + "attention.layer_norm_rms_epsilon"] = 1e-6
    md[a + "final_logit_softcapping"] = 30.0
    return md


def _nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _random_tensor(name: str, shape: tuple[int, ...], qtype: QType, s: Gemma4Shape, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with every block scale set so that weights have std ~ 1/sqrt(fan_in)."""
    if qtype == QType.F32:
        if name == "rope_freqs.weight":  # proportional RoPE: only the first share of pairs rotates
            n_rot = int(shape[0] * s.rope_partial)
            return np.array([1.0] * n_rot + [1e30] * (shape[0] - n_rot), dtype=np.float32)
        if name.endswith("ffn_gate_inp.weight"):
            return rng.standard_normal(shape, dtype=np.float32)
        if name.endswith(("post_attention_norm.weight", "post_ffw_norm.weight", "post_norm.weight")):
            return np.full(shape, 0.2, dtype=np.float32)  # small residual updates: a tame random model
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    raw = np.frombuffer(rng.bytes(n_blocks * type_size), dtype=np.uint8).reshape(n_blocks, type_size).copy()
    fan_in = shape[-1]
    if qtype == QType.Q4_0:  # d f16 at [0:2]; values (q - 8) have std ~4.6
        raw[:, 0:2] = np.frombuffer(np.float16(1.0 / (4.6 * math.sqrt(fan_in))).tobytes(), dtype=np.uint8)
    elif qtype == QType.Q6_K:  # int8 scales at [192:208] (std ~74) times q - 32 (std ~18); d f16 at [208:210]
        raw[:, 208:210] = np.frombuffer(np.float16(0.03 / (74 * 18)).tobytes(), dtype=np.uint8)
    elif qtype == QType.Q8_0:
        raw[:, 0:2] = np.frombuffer(np.float16(1.0 / (74 * math.sqrt(fan_in))).tobytes(), dtype=np.uint8)
    else:
        raise ValueError(f"synthetic weights of type {qtype.name} are not implemented (use Q4_0, Q8_0 or Q6_K)")
    return raw


def write(path: Path, s: Gemma4Shape, vocab_from: Path, seed: int = 0, progress: bool = False) -> None:
    source = GGUFFile(vocab_from)
    md = source.metadata
    if md.get("tokenizer.ggml.model") != "gemma4":
        raise SystemExit(f"{vocab_from}: not a Gemma 4 vocabulary (tokenizer.ggml.model = {md.get('tokenizer.ggml.model')!r})")
    tokens = list(md["tokenizer.ggml.tokens"])
    if len(tokens) > s.n_vocab:
        raise SystemExit(f"{vocab_from} has {len(tokens)} tokens, more than the preset's {s.n_vocab}")
    n_pad = s.n_vocab - len(tokens)
    tokens += [f"<synthetic_{i}>" for i in range(n_pad)]
    scores = list(md["tokenizer.ggml.scores"]) + [-1000.0] * n_pad
    types = list(md["tokenizer.ggml.token_type"]) + [5] * n_pad  # UNUSED: never produced by encoding

    writer = GGUFWriter(path, "gemma4")
    writer.add_name(s.name)
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0 if s.weight_type == QType.Q4_0 else LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(2)
    for key, value in architecture_metadata(s).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_string("tokenizer.ggml.model", "gemma4")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", list(md["tokenizer.ggml.merges"]))
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        writer.add_uint32("tokenizer.ggml." + key, int(md["tokenizer.ggml." + key]))
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    if md.get("tokenizer.chat_template"):
        writer.add_string("tokenizer.chat_template", md["tokenizer.chat_template"])

    plan = tensor_plan(s)
    for name, shape, qtype in plan:
        nbytes = _nbytes(shape, qtype)
        if qtype == QType.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            writer.add_tensor_info(name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(_nbytes(shape, qtype) for _, shape, qtype in plan)
    done = 0
    for name, shape, qtype in plan:
        writer.write_tensor_data(_random_tensor(name, shape, qtype, s, rng))
        done += _nbytes(shape, qtype)
        if progress and name.endswith("ffn_down_exps.scale"):  # once per layer
            print(f"\r{done / 2**30:6.2f} / {total / 2**30:.2f} GiB written", end="", file=sys.stderr, flush=True)
    writer.close()
    if progress:
        print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, help="GGUF file to write")
    parser.add_argument("--preset", default="26b-a4b", choices=sorted(PRESETS))
    parser.add_argument("--vocab-from", required=True, help="a Gemma 4 GGUF whose vocabulary, merges and chat template to use")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (for quick checks)")
    parser.add_argument("--experts", type=int, default=None, help="fewer experts than the preset")
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary than the preset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    if args.layers:
        shape = replace(shape, n_layer=args.layers)
    if args.experts:
        shape = replace(shape, n_expert=args.experts, n_expert_used=min(shape.n_expert_used, args.experts))
    if args.vocab:
        shape = replace(shape, n_vocab=args.vocab)
    n_params = sum(math.prod(shp) for _, shp, _ in tensor_plan(shape))
    n_bytes = sum(_nbytes(shp, q) for _, shp, q in tensor_plan(shape))
    print(f"writing {args.output}: {len(tensor_plan(shape))} tensors, {n_params:,} parameters, {n_bytes / 1e9:.2f} GB of tensor data", file=sys.stderr)
    write(Path(args.output), shape, Path(args.vocab_from), args.seed, progress=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
