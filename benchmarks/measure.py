"""Measuring helpers shared by the benchmark sections: devices, timers, machine facts, matmul rate, recipes.

Nothing here knows about a particular section; every timing helper synchronizes the device before
reading the clock, so the same code gives honest numbers on CPU and CUDA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "


# ------------------------------------------------------------------ devices and clocks
def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:1`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: CUDA is not available on this machine; use --device=cpu or auto")
    return device


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], Any], device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def release(device=None) -> None:
    """Free what finished runs left behind. A fitted LightningModule and its Trainer point at each
    other, and Python's cycle collector runs on object counts, not bytes: without this every
    in-process fit of GPT-2 small kept its ~2 GB (weights, grads, AdamW state) until the machine ran
    out of memory."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    """Start a peak-memory window: the CUDA allocator's, or on CPU this process's peak RSS (``VmHWM``).

    On CPU freed heap is first returned to the OS (``malloc_trim``: the tuned allocator keeps it
    otherwise), then ``VmHWM`` is reset to the current RSS (``/proc/self/clear_refs``), so the
    window's peak is what lives now plus what the measured work adds.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    """This process's resident memory now (``VmRSS``), or None without /proc."""
    return _proc_status_bytes("VmRSS")


def allocator_peak(device) -> int | None:
    """Peak bytes held by the CUDA caching allocator since the last reset (None on CPU)."""
    return int(torch.cuda.max_memory_allocated()) if torch.device(device).type == "cuda" else None


def peak_above(device, baseline: int | None) -> int | None:
    """Peak memory since :func:`reset_peak` above ``baseline``: CUDA allocator peak, or on CPU peak RSS
    minus ``baseline`` (the process's RSS before the model was built: the Python/torch runtime)."""
    if torch.device(device).type == "cuda":
        return allocator_peak(device)
    peak = peak_rss_self()
    return peak - baseline if peak is not None and baseline is not None else None


# ------------------------------------------------------------------ machine
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions, hardware and thread settings recorded with every result file."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average_start": load_average(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "versions": {d: _version(d) for d in (
            "torch", "torchao", "transformers", "lightning", "datasets", "peft", "accelerate", "lit-qft",
        )},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}"}
    return info


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 10, budget_s: float = 3.0) -> float:
    """Measured dense matmul rate in FLOP/s (median of up to ``repeats``): the denominator of MFU.

    On CPU the shape is a GPT-2-small MLP matmul (1024 tokens x 768 -> 3072), the work a training step
    is made of; on CUDA a large square product that reaches the tensor cores' rate. A dtype the
    hardware emulates (bf16 on a CPU without AVX-512 BF16/AMX takes about a minute per product) is
    timed fewer times, within ``budget_s``.
    """
    m, k, n = (1024, 768, 3072) if device.type == "cpu" else (8192, 8192, 8192)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    first = timed(lambda: a @ b, device, repeats=1, warmup=0)[0]
    if first > budget_s:
        return 2 * m * k * n / first
    times = timed(lambda: a @ b, device, repeats=max(1, min(repeats, int(budget_s / first))), warmup=2)
    return 2 * m * k * n / median(times)


def native_bf16(device: torch.device, rates: dict[str, float]) -> bool:
    """bf16 is worth measuring: a GPU, or a CPU whose bf16 matmul is at least half its fp32 rate.

    CPUs without AVX-512 BF16 or AMX emulate bf16 matmuls hundreds of times slower than fp32; there
    every bf16 row would take hours and say nothing a user could want.
    """
    return device.type == "cuda" or rates.get("bf16", 0) >= 0.5 * rates.get("fp32", float("inf"))


def peak_rss_self() -> int | None:
    """This process's own peak resident memory (``VmHWM``), which, unlike ``ru_maxrss``, does not
    inherit the parent's size through fork/exec; ``ru_maxrss`` where /proc is missing."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ------------------------------------------------------------------ models
def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with tied weights counted once."""
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, PaLM/nanoGPT style: ``6 N + 12 L d T`` (N: matmul weights, T: sequence length).

    Position embeddings do no matmul and are left out of N; the tied head is counted once (its
    matmul is the embedding's parameters used once more, which ``6 N`` already covers).
    """
    config = model.config
    n = sum(p.numel() for p in unique_parameters(model))
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    if wpe is not None:
        n -= wpe.weight.numel()
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    width = getattr(config, "n_embd", None) or config.hidden_size
    return 6 * n + 12 * layers * width * seq_len


# ------------------------------------------------------------------ recipes
def all_recipe_classes() -> list[type]:
    """Every concrete subclass of :class:`lit_qft.quantization.Recipe` known once lit_qft is imported.

    New recipes slot in without a table here: whatever subclasses ``Recipe`` is benchmarked.
    """
    import lit_qft  # noqa: F401  (imports every module that defines recipes)
    from lit_qft.quantization import Recipe

    found, stack = [], list(Recipe.__subclasses__())
    while stack:
        cls = stack.pop(0)
        if cls not in found:
            found.append(cls)
            stack.extend(cls.__subclasses__())
    return found


def discover_recipes(only: list[str] | None = None) -> tuple[list, dict[str, str]]:
    """Instantiate every recipe class with its defaults; returns ``(recipes, {name: why skipped})``."""
    recipes, skipped = [], {}
    for cls in all_recipe_classes():
        name = cls.__name__
        if only and name not in only:
            continue
        try:
            recipe = cls()
            if recipe.quantizes:
                recipe.base_config()
                recipe.check_supported() if hasattr(recipe, "check_supported") else None
        except NotImplementedError:  # an abstract base such as QATRecipe
            continue
        except Exception as e:  # a recipe that needs arguments or hardware this machine lacks
            skipped[name] = f"{type(e).__name__}: {e}"[:200]
            continue
        recipes.append(recipe)
    if only:
        unknown = set(only) - {type(r).__name__ for r in recipes} - set(skipped)
        if unknown:
            names = ", ".join(c.__name__ for c in all_recipe_classes())
            raise ValueError(f"--recipes: unknown recipe(s) {sorted(unknown)}; known: {names}")
    return recipes, skipped


def recipe_name(recipe) -> str:
    return type(recipe).__name__


def recipe_class_path(recipe) -> str:
    return f"{type(recipe).__module__}.{type(recipe).__qualname__}"


def recipe_args(recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


# ------------------------------------------------------------------ subprocesses
def run_child(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a Python child process; return its result line (JSON, see :func:`emit`) and wall time.

    Memory is measured in children because in one long process the allocator keeps freed memory
    and earlier runs would hide later peaks; :func:`emit` adds the child's own peak RSS.
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        killer.cancel()
        proc.stdout.close()
    if time.perf_counter() - t0 >= timeout:
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": out[-2000:]}
    result: dict[str, Any] = {}
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode != 0 or not result:
        return {"error": f"exit status {proc.returncode}", "log_tail": out[-2000:]}
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def emit(result: dict[str, Any], peak_rss: bool = True) -> dict[str, Any]:
    """Print a child's result as one line the parent finds (see :func:`run_child`); the last line wins.

    With ``peak_rss`` the child's peak RSS so far is added as ``peak_rss_bytes``. Returns the line's dict.
    """
    line = {**result, "peak_rss_bytes": peak_rss_self()} if peak_rss else dict(result)
    print(RESULT_PREFIX + json.dumps(line, default=str), flush=True)
    return line
