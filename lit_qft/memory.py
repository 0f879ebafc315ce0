"""Trainable parameters and peak training memory, printed at the start and end of training.

Peak memory is what decides whether a fine-tuning recipe fits a machine, so every run reports it the
same way: on a GPU, ``torch.cuda.max_memory_allocated`` (reset at fit start); on CPU, the process's
resident set size (RSS). For RSS the kernel's own high-water mark (``VmHWM``) is reset at fit start
through ``/proc/self/clear_refs`` (Linux >= 4.0) so it covers this fit only, and every training batch
also samples RSS with ``psutil`` (the fallback where ``/proc`` is not writable).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import lightning as L
import psutil
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from lit_qft import quantization as Q

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared (tied) parameter counted once.

    Quantized weights count their logical number of elements (an int8 or NF4 ``768 x 768`` weight is
    589,824 parameters), so totals compare across recipes.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return psutil.Process().memory_info().rss


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Give memory that is freed but kept by glibc's allocator back to the OS (``malloc_trim``).

    lit-qft raises glibc's trim threshold for speed (:mod:`lit_qft.runtime`), so e.g. the float
    weights freed by quantizing a base model would otherwise stay in the RSS and in its peak.
    """
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: nothing to do


def reset_peak_memory(device: torch.device | None = None) -> bool:
    """Start a new peak-memory window; returns True when the kernel's RSS high-water mark was reset.

    Memory freed before the window (but kept by the allocator) is released first, so the window
    measures what this fit uses. Note: this also resets ``resource.getrusage(...).ru_maxrss``.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    release_free_memory()
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets only the peak-RSS counter (see proc(5))
        return True
    except OSError:
        return False


def peak_memory(device: torch.device | None = None, sampled_rss: int = 0, hwm_reset: bool = False) -> dict[str, int]:
    """Peak memory since :func:`reset_peak_memory`: ``peak_rss_bytes`` always, ``peak_cuda_bytes`` on GPU."""
    hwm = _vm_hwm_bytes() if hwm_reset else None
    out = {"peak_rss_bytes": max(sampled_rss, hwm or 0, rss_bytes())}
    if device is not None and device.type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


class TrainingMemory(L.Callback):
    """Print trainable parameters and weight bytes at fit start, peak training memory when training ends.

    ``report`` keeps the numbers (``trainable_params``, ``total_params``, ``weight_bytes``,
    ``start_rss_bytes``, ``peak_rss_bytes``, ``peak_cuda_bytes`` on GPU) for benchmarks.
    """

    def __init__(self) -> None:
        self.report: dict[str, int] = {}
        self._sampled = 0
        self._hwm_reset = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None) or pl_module
        trainable, total = parameter_counts(model)
        self._hwm_reset = reset_peak_memory(pl_module.device)
        self.report = {
            "trainable_params": trainable, "total_params": total,
            "weight_bytes": Q.model_size_bytes(model), "start_rss_bytes": rss_bytes(),
        }
        self._sampled = self.report["start_rss_bytes"]
        self._print_start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sampled = max(self._sampled, rss_bytes())

    def on_after_backward(self, trainer, pl_module) -> None:
        # gradients and (for most models) the last activations are alive here: the usual peak
        self._sampled = max(self._sampled, rss_bytes())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end: before the fit-end export (convert, evaluate, save) that is not training
        if not self.report:
            return
        self.report.update(peak_memory(pl_module.device, self._sampled, self._hwm_reset))
        for logger in trainer.loggers:
            logger.log_metrics({f"memory/{k}": v for k, v in self.report.items()})
        self._print_end()

    @rank_zero_only
    def _print_start(self) -> None:
        r = self.report
        print(
            f"lit-qft: trainable parameters {r['trainable_params']:,} of {r['total_params']:,} "
            f"({100 * r['trainable_params'] / max(r['total_params'], 1):.2f} %), weights "
            f"{r['weight_bytes'] / 2**20:.1f} MiB, process RSS {r['start_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )

    @rank_zero_only
    def _print_end(self) -> None:
        r = self.report
        line = f"lit-qft: peak training memory: RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
        if "peak_cuda_bytes" in r:
            line += f", CUDA allocated {r['peak_cuda_bytes'] / 2**20:.0f} MiB"
        print(line, flush=True)
