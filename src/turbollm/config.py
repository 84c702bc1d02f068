"""The two configurations of a run: ModelConfig, the architecture of a model read from GGUF
metadata (llama.cpp's llama_hparams), and RunConfig, what this run does with it (device,
threads, context and slots, KV cache, speculative decoding, placement, budgets: llama.cpp's
llama_cparams plus the loader's flags).

One frozen dataclass for the Gemma family, with per-layer tuples where layers differ
(sliding-window vs global attention, and in Gemma 4 head sizes and KV heads) and small
accessors such as `is_swa(il)` in the manner of llama.cpp's `llama_hparams`. Values that the
GGUF does not carry are llama.cpp's defaults for the architecture, named where they are set.

ModelConfig leaves out tensors, which the model loader checks against it. RunConfig is what
every command parses its flags into (cli/flags.py) and what `Model.load`, the planner,
`bench`, `fit` and `serve` read; `ctx_size` there is always the context of all slots
together (llama.cpp's n_ctx), `slot_ctx` the context of one (n_ctx_seq).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from turbollm.engine.speculative import SpecConfig
from turbollm.errors import GGUFError, TurbollmError
from turbollm.kv.plan import CacheConfig

SUPPORTED_ARCHITECTURES = ("gemma3", "gemma4")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ctx_train: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    head_dim: tuple[int, ...]  # per layer; keys and values have the same size in Gemma
    n_ff: tuple[int, ...]  # per layer
    rms_eps: float
    swa_layers: tuple[bool, ...]  # True: sliding-window layer
    sliding_window: int  # a query at p sees keys p-W+1 .. p on sliding layers
    rope_base: float  # global layers
    rope_base_swa: float  # sliding layers
    rope_freq_scale: float  # linear position scaling on global layers (1 / rope.scaling.factor)
    attn_scale: float  # multiplies q.k
    final_logit_softcap: float  # 0: none
    embed_scale: float  # token embeddings are multiplied by this (sqrt(n_embd))
    # Gemma 4 features; the defaults describe Gemma 3.
    v_norm: bool = False  # values are RMS-normed (no weight) before attention
    n_kv_shared: int = 0  # the last n layers reuse the K/V of the last earlier layer of their type
    n_expert: int = 0  # Mixture of Experts beside the dense MLP when > 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    n_embd_per_layer: int = 0  # Per-Layer Embeddings width (0: none)

    def is_swa(self, il: int) -> bool:
        return self.swa_layers[il]

    def rope_base_for(self, il: int) -> float:
        return self.rope_base_swa if self.is_swa(il) else self.rope_base

    def has_kv(self, il: int) -> bool:
        """Whether layer `il` computes and stores its own K/V (else it reads `kv_source(il)`'s)."""
        return il < self.n_layer - self.n_kv_shared

    def kv_layout(self) -> list:
        """Per layer: the K/V it stores (kv.plan.LayerKVShape), or None for a layer that reads
        another layer's: what the KV cache and the planner size."""
        from turbollm.kv.plan import LayerKVShape
        return [LayerKVShape(self.n_head_kv[il], self.head_dim[il], self.sliding_window if self.is_swa(il) else 0)
                if self.has_kv(il) else None for il in range(self.n_layer)]

    def kv_source(self, il: int) -> int:
        """The layer whose K/V layer `il` attends to: itself, or for a KV-shared layer the last
        layer before the shared block with the same attention type (transformers' "store" layer)."""
        if self.has_kv(il):
            return il
        first_shared = self.n_layer - self.n_kv_shared
        return max(j for j in range(first_shared) if self.swa_layers[j] == self.swa_layers[il])

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def __post_init__(self) -> None:
        for name in ("n_head_kv", "head_dim", "n_ff", "swa_layers"):
            if len(getattr(self, name)) != self.n_layer:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected one per layer ({self.n_layer})")
        for il, n_kv in enumerate(self.n_head_kv):
            if n_kv <= 0 or self.n_head % n_kv:
                raise ValueError(f"layer {il}: {self.n_head} query heads cannot be grouped over {n_kv} KV heads")
        if not 0 <= self.n_kv_shared < self.n_layer:
            raise ValueError(f"n_kv_shared {self.n_kv_shared} must be in 0..{self.n_layer - 1}")
        if self.n_kv_shared:
            first_shared = self.n_layer - self.n_kv_shared
            for il in range(first_shared, self.n_layer):
                if not any(self.swa_layers[j] == self.swa_layers[il] for j in range(first_shared)):
                    raise ValueError(f"KV-shared layer {il} has no earlier layer of its attention type to share with")
        if self.n_expert and not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError(f"expert_used_count {self.n_expert_used} must be in 1..{self.n_expert}")

    @classmethod
    def from_metadata(cls, md: dict[str, Any], where: str = "model") -> "ModelConfig":
        """Build from GGUF metadata; `where` (the file name) prefixes every error."""
        arch = md.get("general.architecture")
        if arch is None:
            raise GGUFError(f"{where}: missing required metadata key 'general.architecture'")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{where}: architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        build = _gemma3 if arch == "gemma3" else _gemma4
        keys = _Keys(md, arch, where)
        try:
            return build(keys)
        except ValueError as e:
            raise GGUFError(f"{where}: {e}") from None


class _Keys:
    """Typed access to `<arch>.*` keys with one-line errors naming the key."""

    def __init__(self, md: dict[str, Any], arch: str, where: str):
        self.md, self.arch, self.where = md, arch, where

    def _key(self, key: str) -> str:
        return key if "." in key and key.split(".", 1)[0] in ("general", "tokenizer") else f"{self.arch}.{key}"

    def get(self, key: str, default: Any = None) -> Any:
        return self.md.get(self._key(key), default)

    def require(self, key: str) -> Any:
        full = self._key(key)
        if full not in self.md:
            raise GGUFError(f"{self.where}: missing required metadata key '{full}'")
        return self.md[full]

    def positive_int(self, key: str, default: Any = None) -> int:
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, list) or int(value) <= 0:
            raise GGUFError(f"{self.where}: metadata key '{self._key(key)}' must be a positive integer, got {value!r}")
        return int(value)

    def per_layer(self, key: str, n_layer: int, default: Any = None) -> tuple[int, ...]:
        """A key that is either one number for all layers or an array with one entry per layer."""
        value = self.require(key) if default is None else self.get(key, default)
        values = value if isinstance(value, list) else [value] * n_layer
        if len(values) != n_layer:
            raise GGUFError(f"{self.where}: metadata key '{self._key(key)}' has {len(values)} entries, expected {n_layer} (one per layer)")
        return tuple(int(v) for v in values)

    def n_vocab(self) -> int:
        tokens = self.md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise GGUFError(f"{self.where}: missing required metadata key 'tokenizer.ggml.tokens'")
        return len(tokens)


def _swa_pattern(keys: _Keys, n_layer: int, default_period: int) -> tuple[bool, ...]:
    """Which layers use the sliding window (llama.cpp `load_swa_pattern`: an explicit bool array,
    or a period N where every N-th layer is global, or the architecture's default period)."""
    pattern = keys.get("attention.sliding_window_pattern", default_period)
    if isinstance(pattern, list):
        if len(pattern) != n_layer:
            raise GGUFError(f"{keys.where}: '{keys._key('attention.sliding_window_pattern')}' has {len(pattern)} entries, expected {n_layer}")
        return tuple(bool(p) for p in pattern)
    period = int(pattern)
    return tuple(period == 0 or il % period < period - 1 for il in range(n_layer))


def _gemma3(keys: _Keys) -> ModelConfig:
    n_layer = keys.positive_int("block_count")
    n_embd = keys.positive_int("embedding_length")
    n_head = keys.positive_int("attention.head_count")
    head_dim = keys.positive_int("attention.key_length", n_embd // n_head)
    value_dim = keys.positive_int("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{keys.where}: key_length {head_dim} != value_length {value_dim}: not a Gemma 3 layout")
    window = int(keys.get("attention.sliding_window", 0))
    swa_layers = _swa_pattern(keys, n_layer, 6) if window > 0 else (False,) * n_layer
    rope_factor = float(keys.get("rope.scaling.factor", 1.0) or 1.0)
    n_layer_to_size = {18: "270M", 26: "1B", 34: "4B", 48: "12B", 62: "27B"}
    # Query scaling (llama.cpp models/gemma3.cpp, from gemma_pytorch): 27B uses n_embd / n_head.
    scale_dim = n_embd // n_head if n_layer_to_size.get(n_layer) == "27B" else head_dim
    return ModelConfig(
        arch="gemma3",
        name=str(keys.get("general.name", "gemma3")),
        n_vocab=keys.n_vocab(),
        n_embd=n_embd,
        n_layer=n_layer,
        n_ctx_train=keys.positive_int("context_length"),
        n_head=n_head,
        n_head_kv=keys.per_layer("attention.head_count_kv", n_layer, n_head),
        head_dim=(head_dim,) * n_layer,
        n_ff=keys.per_layer("feed_forward_length", n_layer),
        rms_eps=float(keys.require("attention.layer_norm_rms_epsilon")),
        swa_layers=swa_layers,
        sliding_window=window,
        rope_base=float(keys.get("rope.freq_base", 1_000_000.0)),
        rope_base_swa=float(keys.get("rope.freq_base_swa", 10_000.0)),  # llama.cpp's default for Gemma 3
        rope_freq_scale=1.0 / rope_factor,
        attn_scale=1.0 / math.sqrt(scale_dim),
        final_logit_softcap=float(keys.get("final_logit_softcapping", 0.0) or 0.0),
        embed_scale=math.sqrt(n_embd),
    )


def assistant_config(md: dict[str, Any], where: str) -> tuple[ModelConfig, int]:
    """A Gemma 4 MTP assistant head (`gemma4-assistant`, llama.cpp `src/models/gemma4-assistant.cpp`):
    its layers as a Gemma 4 config (every layer reads the target's K/V, so none counts as
    KV-shared here), and the target width it was trained against (`embedding_length_out`)."""
    arch = md.get("general.architecture")
    if arch != "gemma4-assistant":
        raise GGUFError(f"{where}: architecture '{arch}' is not a Gemma 4 assistant head (gemma4-assistant)")
    keys = _Keys(md, arch, where)
    try:
        return _gemma4(keys, kv_from_target=True), keys.positive_int("embedding_length_out")
    except ValueError as e:
        raise GGUFError(f"{where}: {e}") from None


def _gemma4(keys: _Keys, kv_from_target: bool = False) -> ModelConfig:
    """Gemma 4 (llama.cpp `src/models/gemma4.cpp`): per-layer sliding/global pattern with its own
    head size and KV heads for each type, no query scaling (QK-norm), V normed, optional MoE,
    Per-Layer Embeddings and KV sharing, soft-capped logits."""
    n_layer = keys.positive_int("block_count")
    n_embd = keys.positive_int("embedding_length")
    head_global = keys.positive_int("attention.key_length")
    head_swa = keys.positive_int("attention.key_length_swa")
    for k, v in (("attention.value_length", head_global), ("attention.value_length_swa", head_swa)):
        if int(keys.get(k, v)) != v:
            raise GGUFError(f"{keys.where}: '{keys._key(k)}' differs from the key length {v}: Gemma 4 needs equal K and V head sizes")
    pattern = keys.require("attention.sliding_window_pattern")
    if not isinstance(pattern, list):
        raise GGUFError(f"{keys.where}: '{keys._key('attention.sliding_window_pattern')}' must be a per-layer bool array")
    swa_layers = _swa_pattern(keys, n_layer, 0)
    n_expert = int(keys.get("expert_count", 0) or 0)
    return ModelConfig(
        arch="gemma4",
        name=str(keys.get("general.name", "gemma4")),
        n_vocab=keys.n_vocab(),
        n_embd=n_embd,
        n_layer=n_layer,
        n_ctx_train=keys.positive_int("context_length"),
        n_head=keys.positive_int("attention.head_count"),
        n_head_kv=keys.per_layer("attention.head_count_kv", n_layer),
        head_dim=tuple(head_swa if swa else head_global for swa in swa_layers),
        n_ff=keys.per_layer("feed_forward_length", n_layer),
        rms_eps=float(keys.require("attention.layer_norm_rms_epsilon")),
        swa_layers=swa_layers,
        sliding_window=keys.positive_int("attention.sliding_window"),
        rope_base=float(keys.get("rope.freq_base", 1_000_000.0)),
        rope_base_swa=float(keys.get("rope.freq_base_swa", 10_000.0)),
        rope_freq_scale=1.0 / float(keys.get("rope.scaling.factor", 1.0) or 1.0),
        attn_scale=1.0,
        final_logit_softcap=float(keys.get("final_logit_softcapping", 0.0) or 0.0),
        embed_scale=math.sqrt(n_embd),
        v_norm=True,
        n_kv_shared=0 if kv_from_target else int(keys.get("attention.shared_kv_layers", 0) or 0),
        n_expert=n_expert,
        n_expert_used=int(keys.get("expert_used_count", 0) or 0) if n_expert else 0,
        n_ff_expert=keys.positive_int("expert_feed_forward_length") if n_expert else 0,
        n_embd_per_layer=int(keys.get("embedding_length_per_layer_input", 0) or 0),
    )


# ---- the run ---------------------------------------------------------------------------------

class Backend(str, enum.Enum):
    AUTO = "auto"  # CPU: the native kernels where built, else the reference; accelerator: triton if it imports
    FAST = "fast"  # insist on the native CPU kernels
    REFERENCE = "reference"  # exact float32 PyTorch, any device
    TRITON = "triton"  # Triton kernels on a CUDA/ROCm device (kernels/triton/)


class PrefillPrecision(str, enum.Enum):
    """The fast backend's prefill GEMMs (kernels.fast.resolve_prefill_precision; the FastBackend instance holds it)."""

    AUTO = "auto"  # bf16 where the CPU has AVX512-BF16/AMX, else fp32
    FP32 = "fp32"
    BF16 = "bf16"


class Residency(str, enum.Enum):
    """How weights live in CPU memory (planner.resolve_residency)."""

    AUTO = "auto"  # copy on the CPU, mapped under an accelerator
    MMAP = "mmap"  # --mmap: compute from the mapped file's pages
    COPY = "copy"  # --no-mmap: read into process memory
    LOCK = "lock"  # --mlock: mapped and locked in RAM


_ENUMS = {"backend": Backend, "prefill": PrefillPrecision, "residency": Residency}


@dataclass(frozen=True)
class RunConfig:
    """What a run does with a model: the flags run, chat, serve, bench and fit share."""

    model: str | None = None  # the GGUF (None: the default model)
    device: str = "cpu"  # where the model computes: "cpu" or "cuda:N"
    backend: Backend = Backend.AUTO
    threads: int | None = None  # CPU threads (None: all cores)
    prefill: PrefillPrecision = PrefillPrecision.AUTO
    ctx_size: int | None = None  # tokens of context of all slots together (-c); None: the training context
    parallel: int = 1  # slots: sequences decoded at once (-np), each with ctx_size / parallel tokens
    n_batch: int = 512  # prompt tokens per forward (-b)
    cache: CacheConfig = CacheConfig()  # KV cache codecs and layout
    spec: SpecConfig = SpecConfig()  # speculative decoding
    draft_model: str | None = None  # the MTP assistant head (-md)
    # placement (turbollm.planner)
    n_gpu_layers: int = -1  # -ngl; -1: all layers on the accelerator (when there is one)
    n_cpu_moe: int = 0  # the expert tensors of the first N layers stay in CPU memory
    overrides: tuple[tuple[str, str], ...] = ()  # -ot (regex, device)
    draft_overrides: tuple[tuple[str, str], ...] = ()  # -otd
    residency: Residency = Residency.AUTO
    ram: int | None = None  # system memory budget in bytes (None: what is free)
    vram: int | None = None  # the accelerator's budget (None: what is free)

    def __post_init__(self) -> None:
        for name, kind in _ENUMS.items():  # accept the flag's spelling ("bf16") for the Enum
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    raise TurbollmError(f"{name} must be one of {', '.join(k.value for k in kind)}, got {value!r}") from None
        for name in ("model", "draft_model"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        for name, value in (("--threads", self.threads), ("--ctx-size", self.ctx_size)):
            if value is not None and value <= 0:
                raise TurbollmError(f"{name} must be positive, got {value}")
        if self.parallel <= 0:
            raise TurbollmError(f"--parallel must be positive, got {self.parallel}")
        if self.n_batch <= 0:
            raise TurbollmError(f"--batch-size must be positive, got {self.n_batch}")

    def total_ctx(self, model: ModelConfig) -> int:
        """llama.cpp's n_ctx: all slots together."""
        return self.ctx_size if self.ctx_size is not None else model.n_ctx_train

    def slot_ctx(self, model: ModelConfig) -> int:
        """llama.cpp's n_ctx_seq: one slot's context, at most the model's training context."""
        total = self.total_ctx(model)
        slot = total // self.parallel
        if slot < 2:
            raise TurbollmError(f"--ctx-size {total} split over --parallel {self.parallel} leaves {slot} tokens per slot")
        if slot > model.n_ctx_train:
            per = f" ({self.parallel} slots of {slot})" if self.parallel > 1 else ""
            raise TurbollmError(f"--ctx-size {total}{per} is more than the model's training context of "
                                f"{model.n_ctx_train} tokens per slot: use at most {model.n_ctx_train * self.parallel}")
        return slot
