"""Text generation with a converted (quantized) model folder, with tokens/s.

From the command line::

    lit-qft generate --model_dir outputs/quickstart/quantized --prompt "In the beginning" \\
        --max_new_tokens 64 --temperature 0.8 --top_k 50 --seed 0

``--temperature 0`` (the default) is greedy decoding.

How the model runs is chosen for the hardware unless given (``--dtype``, ``--compile``, ``--device``):
where bf16 is native (a CUDA GPU with bf16, or a CPU with AVX-512 BF16 / AMX) the model runs in bf16
and compiled (static KV cache, ``torch.compile(fullgraph=True, dynamic=False)``, a warm-up generation
first): int8 weight-only kernels beat the float matvec only with bf16 activations (3.02x fp32 measured
on GPT-2 small, compiled, AVX-512 BF16). Elsewhere it runs fp32 and eager: with emulated bf16 a bf16
matmul runs at ~1 % of fp32's speed, and on an AVX2-only CPU the compiled quantized models decoded
no faster than eager (``benchmarks/README.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lit_qft import runtime
from lit_qft.export import load_quantized


@dataclass
class Generation:
    """The continuation of a prompt and how fast it was produced."""

    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class InferenceSetup:
    """How a model is run for generation: device, dtype, compiled or not, and why."""

    device: torch.device
    dtype: torch.dtype
    compile: bool
    reason: str

    def describe(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')} {'compiled' if self.compile else 'eager'} ({self.reason})"


def choose_inference(device: str = "auto", dtype: str = "auto", compile: bool | None = None) -> InferenceSetup:
    """Resolve ``auto`` settings for the hardware: bf16 + compile where bf16 is native, else fp32 eager.

    Explicit choices are kept as given (e.g. ``dtype="bf16"`` on a CPU that emulates it).
    """
    if dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--dtype={dtype!r}: use auto, fp32 or bf16")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    native = runtime.native_bf16(dev)
    why = "native bf16" if native else "no native bf16 on this device"
    chosen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype, torch.bfloat16 if native else torch.float32)
    chosen_compile = native if compile is None else compile
    given = [f"{k} given" for k, v in (("dtype", dtype != "auto"), ("compile", compile is not None)) if v]
    return InferenceSetup(dev, chosen_dtype, chosen_compile, ", ".join([why, *given]))


def compile_for_inference(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward in place for decoding with a static KV cache.

    One graph for the prefill and one for the one-token decode steps (``dynamic=False``: every
    decode step has the same shapes with a static cache); ``fullgraph=True`` makes a graph break an
    error instead of a silent slow path. CUDA graphs (``reduce-overhead``) on GPU.
    """
    device = next(model.parameters()).device
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead" if device.type == "cuda" else None)
    model._lit_qft_compiled = True
    return model


def prepare_for_inference(model: nn.Module, setup: InferenceSetup) -> nn.Module:
    """Move ``model`` to the chosen device and dtype (quantized weights keep their format), compile if chosen."""
    model.to(device=setup.device, dtype=setup.dtype).eval()
    if setup.compile:
        compile_for_inference(model)
    return model


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = 50,
    seed: int = 0,
) -> Generation:
    """Continue ``prompt`` greedily (``temperature == 0``) or by sampling; returns text and timing.

    Args:
        model: A Hugging Face causal LM (float or converted).
        tokenizer: Its tokenizer.
        prompt: Text to continue.
        max_new_tokens: Number of tokens to generate (generation may stop early at end-of-text).
        temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
        top_k: Sample among the ``top_k`` most likely tokens (null: all); ignored when greedy.
        seed: Random seed for sampling.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ValueError(f"--temperature={temperature} must be >= 0 (0 = greedy)")
    if not prompt:
        raise ValueError("--prompt must not be empty")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if getattr(model, "_lit_qft_compiled", False):  # fixed shapes per step: no recompiles while decoding
        sampling["cache_implementation"] = "static"
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, pad_token_id=pad,
        top_p=None, **sampling,
    )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds)


def generate_command(
    model_dir: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = 50,
    seed: int = 0,
    dtype: Literal["auto", "fp32", "bf16"] = "auto",
    compile: bool | None = None,
    device: str = "auto",
) -> Generation:
    """Generate text with a quantized model folder (from fit's export or ``lit-qft convert``); prints tokens/s.

    Args:
        model_dir: Folder written by lit-qft (``--export.output_dir`` or ``lit-qft convert``).
        prompt: Text to continue.
        max_new_tokens: Number of new tokens.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: Sample among the top-k tokens (null: all).
        seed: Random seed for sampling.
        dtype: Activations and float weights: auto (bf16 where the hardware has native bf16, else fp32), fp32, bf16.
        compile: ``torch.compile`` with a static KV cache (a warm-up generation compiles first). Default
            (null): where bf16 is native; on other CPUs compiling takes minutes and did not speed up decoding.
        device: auto (CUDA when present), cpu, cuda.
    """
    setup = choose_inference(device, dtype, compile)
    model, tokenizer, recipe = load_quantized(model_dir, device=setup.device)
    prepare_for_inference(model, setup)
    if setup.compile:
        generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)  # warm-up: compiles
    result = generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)
    print(prompt + result.text)
    print(
        f"lit-qft: {result.new_tokens} new tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s "
        f"({type(recipe).__name__}, {'greedy' if temperature == 0 else f'sampling T={temperature}'}, "
        f"{setup.describe()})",
        flush=True,
    )
    return result
