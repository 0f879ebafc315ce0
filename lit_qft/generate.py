"""Text generation with a converted (quantized) model folder, with tokens/s.

From the command line::

    lit-qft generate --model_dir outputs/quickstart/quantized --prompt "In the beginning" \\
        --max_new_tokens 64 --temperature 0.8 --top_k 50 --seed 0

``--temperature 0`` (the default) is greedy decoding. ``--compile true`` wraps the forward pass in
``torch.compile`` (a warm-up generation is run first and not timed); it is off by default because
compiling takes minutes on CPU and only pays for long generations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

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


def compile_for_inference(model: nn.Module) -> nn.Module:
    """Compile ``model``'s forward in place (dynamic shapes: the sequence grows while decoding)."""
    model.forward = torch.compile(model.forward, dynamic=True)
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
    compile: bool = False,
) -> Generation:
    """Generate text with a quantized model folder (from fit's export or ``lit-qft convert``); prints tokens/s.

    Args:
        model_dir: Folder written by lit-qft (``--export.output_dir`` or ``lit-qft convert``).
        prompt: Text to continue.
        max_new_tokens: Number of new tokens.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: Sample among the top-k tokens (null: all).
        seed: Random seed for sampling.
        compile: ``torch.compile`` the model first (slow to start; off by default on CPU).
    """
    model, tokenizer, recipe = load_quantized(model_dir)
    if compile:
        compile_for_inference(model)
        generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)  # warm-up: compiles
    result = generate(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)
    print(prompt + result.text)
    print(
        f"lit-qft: {result.new_tokens} new tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s "
        f"({type(recipe).__name__}, {'greedy' if temperature == 0 else f'sampling T={temperature}'}"
        f"{', compiled' if compile else ''})",
        flush=True,
    )
    return result
