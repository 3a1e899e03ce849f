"""What the benchmarks measure besides FLOPs: per-token times inside one generation call, the
process's peak resident memory, the KV bytes a cache holds, and what autograd keeps for backward.

- :class:`TokenTimes`: a transformers streamer (``put``/``end``) that timestamps every token as
  generation hands it over. ``generate()`` and ``speed_generate`` put the prompt first, then each
  new token right after it is chosen (before the next forward), so TTFT and TPOT come from one
  call: TTFT = first token - call start, TPOT = (last token - first token) / (new tokens - 1).
  The process's CPU time is recorded alongside (on a shared machine, CPU time / wall time shows
  how much of the call the process actually ran).
- :class:`PeakRSS`: peak resident memory during a block above the resident memory at its start.
  Linux's high-water mark (``VmHWM`` of /proc/self/status) is reset by writing 5 to
  /proc/self/clear_refs; memory freed earlier is first handed back to the system
  (``malloc_trim``) so it does not hide in the baseline.
- :func:`kv_tensor_bytes`: bytes of the key and value tensors a cache holds, read from the
  tensors (an HF ``Cache`` with ``layers[i].keys/values``, or SPEED's ``SpeedCache``).
- :class:`SavedForBackward`: the storages autograd saves during a forward (deduplicated), and
  among them the full-sequence attention masks ([B, 1, T, T]): how many distinct ones, how many
  saves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class TokenTimes:
    """Streamer that records ``time.perf_counter()`` at each new token (one put per step).

    Call :meth:`start` right before the generation call. ``times`` holds one timestamp per new
    token; the first ``put`` (the prompt) is not a new token."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.ended: float | None = None
        self.cpu_t0 = time.process_time()
        self.t0 = time.perf_counter()

    def put(self, value) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(now)
        self.cpu_times.append(cpu)

    def end(self) -> None:
        self.ended = time.perf_counter()

    @property
    def ttft(self) -> float:
        return self.times[0] - self.t0

    @property
    def ttft_cpu(self) -> float:
        return self.cpu_times[0] - self.cpu_t0

    @property
    def tpot_cpu(self) -> float | None:
        if len(self.cpu_times) < 2:
            return None
        return (self.cpu_times[-1] - self.cpu_times[0]) / (len(self.cpu_times) - 1)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, inside this call (None for one token)."""
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark; False where the system cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.delta`` (bytes; None where not measurable),
    ``m.before`` and ``m.peak``."""

    method = "VmHWM reset via /proc/self/clear_refs, after gc + malloc_trim"

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        self.ok = reset_peak_rss()
        self.before = _status_bytes("VmRSS")
        self.peak = self.delta = None
        return self

    def __exit__(self, *exc) -> None:
        if self.ok and self.before is not None:
            self.peak = _status_bytes("VmHWM")
            self.delta = None if self.peak is None else self.peak - self.before


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def kv_tensor_bytes(cache) -> int:
    """Bytes of every key and value tensor the cache holds (allocated, used or not)."""
    if isinstance(getattr(cache, "keys", None), list):  # SpeedCache: one tensor per layer
        tensors = [*cache.keys, *cache.values]
    else:  # transformers' Cache (DynamicCache, StaticCache): per-layer objects
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(_tensor_bytes(t) for t in tensors)


class SavedForBackward:
    """Within the block, record what autograd saves for backward (``saved_tensors_hooks``).

    ``bytes``: the distinct storages saved; ``mask_storages`` / ``mask_bytes``: the distinct
    [B, 1, seq, seq] tensors among them (a dense attention mask over the whole sequence, shared by
    the heads; choose ``seq`` unlike the head dimension, or RoPE's [B, 1, T, head_dim] tables
    count too); ``mask_saves``: how many times one was saved (one per layer that keeps one).
    Storages are told apart by address without being referenced (so the block's memory is the
    step's own): a tensor saved for backward lives until the backward, so no address is reused
    while the forward saves."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def is_mask(self, t: torch.Tensor) -> bool:
        return t.dim() == 4 and t.shape[1] == 1 and t.shape[2] == t.shape[3] == self.seq

    def __enter__(self) -> SavedForBackward:
        self._seen: dict[int, tuple[int, bool]] = {}
        self.mask_saves = 0

        def pack(t: torch.Tensor):
            s = t.untyped_storage()
            mask = self.is_mask(t)
            self.mask_saves += mask
            self._seen.setdefault(s.data_ptr(), (s.nbytes(), mask))
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.bytes = sum(n for n, _ in self._seen.values())
        self.mask_storages = sum(m for _, m in self._seen.values())
        self.mask_bytes = sum(n for n, m in self._seen.values() if m)

    def summary(self) -> dict:
        return {
            "saved_bytes": self.bytes,
            "mask_storages": self.mask_storages,
            "mask_bytes": self.mask_bytes,
            "mask_saves": self.mask_saves,
        }
