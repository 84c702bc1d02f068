"""How close decode comes to the memory bandwidth of the device that holds the weights.

`turbollm bench` measures, in the same run, the copy and read bandwidth of every device that
holds weights a decode step reads (the CPU's memory, a CUDA/ROCm device's memory), and prints
beside decode tok/s the bytes a step reads from each device and the share of its bandwidth
that reaches:

    share = bytes read per token x tokens/s / bandwidth

The bytes per token are an estimate from the GGUF's tensor table, not a count of what the
kernels load: every tensor once, except that an expert tensor counts n_expert_used/n_expert of
its bytes (the active experts) and an input embedding table one row (the LM head, tied to the
token embedding in Gemma, reads the whole table). Activations, the KV cache and re-reads are
left out, so the share is a lower bound on the traffic.

Bandwidth: a large buffer copied (bytes read plus bytes written, STREAM's "copy" convention)
and summed (bytes read), best of a few runs, on the device itself: on a GPU timed with the
device's events, on the CPU with the wall clock on the given threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from turbollm.gguf.reader import GGUFFile

CPU_COPY_BYTES = 256 * 2**20  # far larger than a CPU's caches
CPU_READ_BYTES = 512 * 2**20
GPU_BYTES = 2**30  # far larger than a GPU's L2 (50 MB on an H100)


def tensor_decode_bytes(name: str, n_bytes: int, n_rows: int, n_expert: int, n_expert_used: int, tied: bool) -> int:
    """Bytes of one tensor a decode step reads (see the module docstring)."""
    if "_exps." in name and n_expert:
        return n_bytes * n_expert_used // n_expert
    if name == "per_layer_token_embd.weight" or (name == "token_embd.weight" and not tied):
        return n_bytes // n_rows  # one row of the table
    return n_bytes


def decode_bytes(gf: GGUFFile, n_expert: int, n_expert_used: int,
                 placement: dict[str, str] | None = None) -> dict[str, int]:
    """Weight bytes one decode step reads, by the device that holds them (`placement`: tensor name
    -> device, as the memory plan places them; every tensor on "cpu" without it)."""
    tied = "output.weight" not in gf.tensors
    out: dict[str, int] = {}
    for t in gf.tensors.values():
        device = (placement or {}).get(t.name, "cpu")
        out[device] = out.get(device, 0) + tensor_decode_bytes(t.name, t.n_bytes, t.shape[0], n_expert, n_expert_used, tied)
    return out


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a host clock reads its end."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_seconds(fn, device: torch.device, repetitions: int) -> float:
    fn()  # warm: fault the pages in, load the kernel
    if device.type == "cpu":
        best = float("inf")
        for _ in range(repetitions):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best
    torch.cuda.synchronize(device)
    times = []
    with torch.cuda.device(device):
        for _ in range(repetitions):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def _gpu_bytes(device: torch.device, n_bytes: int | None, buffers: int) -> int:
    """The buffer size on a GPU: GPU_BYTES, or less where `buffers` of them would take more than
    half of what is free (the model is loaded)."""
    if n_bytes is not None:
        return n_bytes
    free, _ = torch.cuda.mem_get_info(device)
    return max(16 * 2**20, min(GPU_BYTES, free // (2 * buffers)) // 2**20 * 2**20)


def _on_threads(threads: int | None, fn):
    if threads is None:
        return fn()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def copy_bandwidth(device: str | torch.device = "cpu", threads: int | None = None, n_bytes: int | None = None,
                   repetitions: int = 10) -> float:
    """Bytes/s read plus written copying a buffer far larger than the caches, best of `repetitions`."""
    dev = torch.device(device)
    if dev.type != "cpu":
        n_bytes = _gpu_bytes(dev, n_bytes, 2)
    n_bytes = n_bytes or CPU_COPY_BYTES

    def measure() -> float:
        src = torch.rand(n_bytes // 4, dtype=torch.float32, device=dev)  # random data, never zeros
        dst = torch.empty_like(src)
        seconds = _best_seconds(lambda: dst.copy_(src), dev, repetitions)
        return 2 * (n_bytes // 4 * 4) / seconds

    try:
        return _on_threads(threads, measure)
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def read_bandwidth(device: str | torch.device = "cpu", threads: int | None = None, n_bytes: int | None = None,
                   repetitions: int = 10) -> float:
    """Bytes/s reading a buffer far larger than the caches (a sum): the limit of a decode step,
    which reads the weights and writes next to nothing."""
    dev = torch.device(device)
    if dev.type != "cpu":
        n_bytes = _gpu_bytes(dev, n_bytes, 1)
    n_bytes = n_bytes or CPU_READ_BYTES

    def measure() -> float:
        src = torch.rand(n_bytes // 4, dtype=torch.float32, device=dev)
        return (n_bytes // 4 * 4) / _best_seconds(src.sum, dev, repetitions)

    try:
        return _on_threads(threads, measure)
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Bandwidth:
    copy: float  # bytes/s read + written
    read: float  # bytes/s read


def measure(device: str, threads: int | None = None) -> Bandwidth:
    return Bandwidth(copy_bandwidth(device, threads), read_bandwidth(device, threads))


@dataclass(frozen=True)
class DecodeShare:
    device: str
    bytes_per_token: int
    tokens_per_second: float
    bandwidth: Bandwidth

    @property
    def achieved(self) -> float:
        """Bytes/s of weights read from this device's memory."""
        return self.bytes_per_token * self.tokens_per_second

    @property
    def of_copy(self) -> float:
        return self.achieved / self.bandwidth.copy

    @property
    def of_read(self) -> float:
        return self.achieved / self.bandwidth.read


def shares(by_device: dict[str, int], tokens_per_second: float, bandwidths: dict[str, Bandwidth]) -> list[DecodeShare]:
    """One DecodeShare per device that holds decode bytes and whose bandwidth was measured."""
    return [DecodeShare(d, n, tokens_per_second, bandwidths[d]) for d, n in by_device.items() if n and d in bandwidths]


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def format_lines(by_device: dict[str, int], bandwidths: dict[str, Bandwidth], decode: tuple[str, float] | None,
                 n_expert: int = 0, n_expert_used: int = 0) -> list[str]:
    """The bench report's lines: bytes per token, the bandwidth measured, and for the fastest
    decode test `decode` = (its name, tok/s) the share of each device's bandwidth it reached."""
    total = sum(by_device.values())
    experts = f"expert tensors x {n_expert_used}/{n_expert} (the active experts), " if n_expert else ""
    where = ", ".join(f"{d} {_size(n)}" for d, n in by_device.items() if n) if len(by_device) > 1 else ""
    lines = [f"decode reads {_size(total)} of weights per token{': ' + where if where else ''} (estimated from the "
             f"GGUF's tensor sizes: {experts}one row of an untied input embedding; activations and KV cache not counted)"]
    lines.append("memory bandwidth measured in this run: " + "; ".join(
        f"{d} copy {b.copy / 1e9:.1f} GB/s (read + written), read {b.read / 1e9:.1f} GB/s" for d, b in bandwidths.items()))
    if decode is not None:
        name, tps = decode
        for s in shares(by_device, tps, bandwidths):
            lines.append(f"decode ({name}, {tps:.2f} tok/s) reads the weights on {s.device} at {s.achieved / 1e9:.1f} GB/s = "
                         f"{s.of_copy:.0%} of the copy bandwidth, {s.of_read:.0%} of the read bandwidth")
    return lines
