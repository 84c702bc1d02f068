"""What a sequence's KV cache will hold, and its exact bytes, before anything is allocated.

Layout (llama.cpp's iSWA cache, `llama-kv-cache-iswa.h`, with exact rings):
- a global layer keeps one slot per position of the context: `capacity` = the context size;
- a sliding-window layer keeps a ring of `window` slots (position p in slot p % window), so
  its memory does not grow with the context; `swa_full` gives it full-length slots instead;
- a KV-shared layer (Gemma 4's last `n_kv_shared`) stores nothing and reads its source's.
Each slot holds [n_head_kv, row_bytes] of one (layer, K or V) codec (kv/codecs.py); boundary
layers keep f16 whatever the codecs.

The exact window. A layer with a quantized codec also keeps f16 K/V rows of the sequence's
first `sink` positions and, in a ring, of its latest `recent` (KIVI's full-precision
residual, StreamingLLM's attention sink): a query reads those keys from their f16 rows and all
others from their coded rows (kernels.attention.ExactSplit). Attention puts most of its weight
there, so most of the coding error goes: default model, 3,202 tokens, turbo3 K and V, KL
0.061 -> 0.015 with the first 1 and the latest 64 positions at f16 (`turbollm quality`). Every
token is still coded when it is written (nothing is re-encoded as it ages), so the f16 rows
are a fixed cost per layer, independent of the context length.

`plan_kv` gives the bytes as an exact figure (`KVPlan`), the one the planner prints and the
one kv/cache.py allocates (tested equal).
"""

from __future__ import annotations

from dataclasses import dataclass

from turbollm.kv.codecs import FLOAT_DTYPES, Codec

EXACT = Codec("f16")  # the exact window's rows


@dataclass(frozen=True)
class LayerKVShape:
    n_head_kv: int
    head_dim: int
    window: int = 0  # > 0: a sliding-window layer


DEFAULT_RECENT = 64  # latest positions a quantized layer also keeps at f16
DEFAULT_SINK = 1  # first positions it keeps at f16 (Gemma's BOS draws much of the attention)


@dataclass(frozen=True)
class CacheConfig:
    """What the user chooses about the cache (`--cache-type-k/-v`, `--cache-boundary-layers`,
    `--cache-turbo-block`, `--swa-full`, `--cache-recent`, `--cache-sink`)."""

    type_k: str = "f16"
    type_v: str = "f16"
    boundary_layers: int = 0  # the first and last N storing layers keep f16 K and V
    turbo_block: int = 128  # TurboQuant rotation block: 128 or 32
    swa_full: bool = False  # sliding-window layers keep the whole context (llama.cpp --swa-full)
    # the exact window of quantized layers (see the module's docstring): f16 rows of each
    # query's latest `recent` positions and of the sequence's first `sink`. None: the defaults
    # where a codec has fewer than 8 bits per value, none for q8_0 (it measures at the noise
    # floor); the sink's default follows the recent window's (recent=0: neither)
    recent: int | None = None
    sink: int | None = None

    def __post_init__(self) -> None:
        Codec(self.type_k, self.turbo_block), Codec(self.type_v, self.turbo_block)  # validate names
        for name in ("boundary_layers", "recent", "sink"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 0, not {value}")

    @property
    def quantized(self) -> bool:
        """Whether K or V is coded below float precision (then the exact window applies)."""
        return self.type_k not in FLOAT_DTYPES or self.type_v not in FLOAT_DTYPES

    @property
    def exact_window(self) -> tuple[int, int]:
        """(sink, recent) of the quantized layers' exact window."""
        if not self.quantized:
            return 0, 0
        low = min(Codec(t, self.turbo_block).bits_per_value for t in (self.type_k, self.type_v)) < 8
        recent = (DEFAULT_RECENT if low else 0) if self.recent is None else self.recent
        return (DEFAULT_SINK if recent else 0) if self.sink is None else self.sink, recent

    @property
    def label(self) -> str:
        """'K[/V][@N][~R]', the form `turbollm quality --cache-types` reads (~R: an exact window
        of the latest R positions, when set)."""
        name = self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"
        name += f"@{self.boundary_layers}" if self.boundary_layers else ""
        return name + (f"~{self.recent}" if self.quantized and self.recent is not None else "")


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    n_head_kv: int
    head_dim: int
    window: int
    capacity: int  # slots
    k: Codec
    v: Codec
    sink: int = 0  # the exact window: f16 rows of the first `sink` positions,
    recent: int = 0  # and a ring of the latest `recent`

    @property
    def k_row_bytes(self) -> int:
        return self.k.row_bytes(self.head_dim)

    @property
    def v_row_bytes(self) -> int:
        return self.v.row_bytes(self.head_dim)

    @property
    def bytes_per_slot(self) -> int:
        return self.n_head_kv * (self.k_row_bytes + self.v_row_bytes)

    @property
    def has_k_offset(self) -> bool:
        """Quantized keys are stored relative to an offset (see KVSlots); float keys as they are."""
        return self.k.name not in ("f32", "f16", "bf16")

    @property
    def offset_bytes(self) -> int:
        """The key conditioning (kv/conditioning.py): float32 rotated offset, offset and scale per
        (KV head, channel), and the int32 flag saying they are set."""
        return 3 * self.n_head_kv * self.head_dim * 4 + 4 if self.has_k_offset else 0

    @property
    def exact_rows(self) -> int:
        return self.sink + self.recent

    @property
    def exact_row_bytes(self) -> int:
        return EXACT.row_bytes(self.head_dim)

    @property
    def exact_bytes(self) -> int:
        """The exact window's f16 K and V rows."""
        return self.exact_rows * self.n_head_kv * 2 * self.exact_row_bytes

    @property
    def nbytes(self) -> int:
        return self.capacity * self.bytes_per_slot + self.offset_bytes + self.exact_bytes

    @property
    def is_ring(self) -> bool:
        return self.window > 0 and self.capacity == self.window


@dataclass(frozen=True)
class KVPlan:
    """The exact bytes of a cache before it exists: `KVCache(plan).nbytes == plan.nbytes`."""

    ctx: int
    layers: tuple[LayerPlan | None, ...]  # None: the layer stores nothing (KV-shared)

    @property
    def stored(self) -> list[LayerPlan]:
        return [p for p in self.layers if p is not None]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.stored)

    @property
    def global_bytes(self) -> int:
        return sum(p.nbytes for p in self.stored if p.window == 0)

    @property
    def sliding_bytes(self) -> int:
        return sum(p.nbytes for p in self.stored if p.window > 0)

    def bytes_per_token(self) -> float:
        """Bytes one more token of context costs (global layers; rings are a fixed cost)."""
        return float(sum(p.bytes_per_slot for p in self.stored if not p.is_ring))


def plan_kv(layout: list[LayerKVShape | None], ctx: int, config: CacheConfig = CacheConfig()) -> KVPlan:
    if ctx <= 0:
        raise ValueError(f"KV cache context must be positive, got {ctx}")
    storing = [il for il, s in enumerate(layout) if s is not None]
    n = config.boundary_layers
    protected = set(storing[:n]) | set(storing[len(storing) - n:] if n else [])
    k = Codec(config.type_k, config.turbo_block, keep_length=True)
    v = Codec(config.type_v, config.turbo_block)
    f16 = Codec("f16")
    sink, recent = config.exact_window
    plans: list[LayerPlan | None] = []
    for il, s in enumerate(layout):
        if s is None:
            plans.append(None)
            continue
        ring = s.window > 0 and not config.swa_full
        capacity = min(ctx, s.window) if ring else ctx
        if il in protected:
            plans.append(LayerPlan(il, s.n_head_kv, s.head_dim, s.window, capacity, f16, f16))
        else:
            plans.append(LayerPlan(il, s.n_head_kv, s.head_dim, s.window, capacity, k, v, min(sink, capacity),
                                   min(recent, capacity)))
    return KVPlan(ctx, tuple(plans))


@dataclass(frozen=True)
class SlotsPlan:
    """The KV memory of `n_slots` sequences sharing a context of `ctx` tokens (llama.cpp's
    `--ctx-size` with `--parallel`): each slot's cache holds ctx / n_slots positions."""

    per_slot: KVPlan
    n_slots: int

    @property
    def global_bytes(self) -> int:
        return self.n_slots * self.per_slot.global_bytes

    @property
    def sliding_bytes(self) -> int:
        return self.n_slots * self.per_slot.sliding_bytes

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.per_slot.nbytes


def plan_slots(layout: list[LayerKVShape | None], ctx: int, n_slots: int, config: CacheConfig = CacheConfig()) -> SlotsPlan:
    if n_slots <= 0 or ctx % n_slots:
        raise ValueError(f"a context of {ctx} tokens does not split evenly into {n_slots} slots")
    return SlotsPlan(plan_kv(layout, ctx // n_slots, config), n_slots)
