"""Inference speed and size: prefill and greedy decode tokens/s, float vs converted, eager and compiled.

Every variant is a float model (fp32 or bf16) or a float model converted by a recipe with
``lit_qft.quantization.prepare`` + ``convert`` (the same path the CLI's export takes). Eager decoding
uses the model's dynamic KV cache; compiled decoding uses a static cache (fixed shapes, one graph
for prefill and one for decode per batch size) under ``torch.compile(fullgraph=True)``.

``torch.compile`` can silently fall back to eager when dynamo's recompile limit is hit (several
model copies in one process do that). Here ``fail_on_recompile_limit_hit`` turns that into an error,
``torch._dynamo.reset()`` runs between models, dynamo's counters are recorded for each variant,
and compiled greedy tokens are compared with eager ones.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.measure import allocator_peak, median, recipe_name, reset_peak, sync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class InferSpec:
    """Model and workload for the inference section."""

    architecture: str = "gpt2"
    config_overrides: dict[str, Any] | None = None
    pretrained: str | None = None
    tokenizer: str = "gpt2"
    prompt_len: int = 128
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8)
    compile_batches: tuple[int, ...] = (1,)
    repeats: int = 3
    compile: bool = True
    seed: int = 0


@dataclass
class Variant:
    """One model to measure: a recipe (None = float) at an activation/weight dtype, eager and maybe compiled."""

    recipe: Any
    dtype: str = "fp32"
    compiled: bool = False

    @property
    def name(self) -> str:
        if self.recipe is None:
            return f"float {self.dtype}"
        policy = getattr(self.recipe, "embedding_policy", "float")
        return f"{recipe_name(self.recipe)} {self.dtype}" + ("" if policy == "float" else f" head={policy}")


def embedding_policies() -> tuple[str, ...]:
    """The embedding/head policies lit_qft offers (read from its type, so new ones are picked up)."""
    from lit_qft import quantization as Q

    return typing.get_args(getattr(Q, "EmbeddingPolicy", typing.Literal["float"])) or ("float",)


def variants(recipes: list, compile_names: str = "auto") -> list[Variant]:
    """Float fp32/bf16, then every quantizing recipe at fp32 and bf16, plus every other head policy at bf16.

    ``compile_names``: ``auto`` compiles float fp32/bf16 and each quantizing recipe at bf16 with the
    last head policy (the decode-speed configuration); ``all`` compiles everything; ``none`` nothing.
    """
    out = [Variant(None, "fp32"), Variant(None, "bf16")]
    policies = embedding_policies()
    for recipe in recipes:
        if not recipe.quantizes:
            continue
        out += [Variant(recipe, "fp32"), Variant(recipe, "bf16")]
        for policy in policies:
            if policy != recipe.embedding_policy:
                try:
                    out.append(Variant(dataclasses.replace(recipe, embedding_policy=policy), "bf16"))
                except (TypeError, ValueError):
                    continue
    for v in out:
        if compile_names == "all":
            v.compiled = True
        elif compile_names == "auto":
            policy = getattr(v.recipe, "embedding_policy", None)
            v.compiled = v.recipe is None or (v.dtype == "bf16" and policy == policies[-1])
    return out


def build_variant(spec: InferSpec, variant: Variant, vocab_size: int, device: torch.device) -> nn.Module:
    from lit_qft import quantization as Q
    from lit_qft.models import build_model

    torch.manual_seed(spec.seed)
    model = build_model(spec.pretrained, spec.architecture, spec.config_overrides, vocab_size=vocab_size)
    model.to(device=device, dtype=DTYPES[variant.dtype]).eval()
    recipe = variant.recipe
    if recipe is None:
        from lit_qft.quantization import NoQuantization

        recipe = NoQuantization()
    Q.prepare(model, recipe)
    Q.convert(model, recipe)
    return model


def disk_bytes(model: nn.Module, tokenizer, recipe) -> int:
    """Bytes of the weights file :func:`lit_qft.export.save_quantized` writes (tied storage saved once)."""
    from lit_qft.export import WEIGHTS_FILE, save_quantized
    from lit_qft.quantization import NoQuantization

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_quantized(model, tokenizer, recipe or NoQuantization(), Path(tmp) / "m")
        return (folder / WEIGHTS_FILE).stat().st_size


@torch.no_grad()
def greedy(fwd, prompt: torch.Tensor, new_tokens: int, cache, device) -> tuple[float, float, torch.Tensor]:
    """Prefill ``prompt`` then decode ``new_tokens - 1`` more greedily; returns (prefill s, decode s, tokens)."""
    p = prompt.shape[1]
    sync(device)
    start = time.perf_counter()
    out = fwd(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(p, device=device), use_cache=True)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill = time.perf_counter() - start
    cache = out.past_key_values
    tokens = [tok]
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        out = fwd(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([p + i], device=device),
                  use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(tok)
    sync(device)
    return prefill, time.perf_counter() - start, torch.cat(tokens, 1)


def _dynamo_counters() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompile_limit": int(torch._dynamo.config.recompile_limit),
    }


def _measure(fwd, model, spec: InferSpec, batch: int, device, cache_factory, eager_tokens=None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(spec.seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, spec.prompt_len), generator=gen).to(device)
    cache = cache_factory(batch)
    if cache is not None:  # initialize the static cache's lazy buffers eagerly so dynamo sees one state
        model(input_ids=prompt[:, :1], past_key_values=cache, cache_position=torch.arange(1, device=device), use_cache=True)
        cache.reset()
    reset_peak(device)
    runs = []
    for i in range(spec.repeats + 1):  # the first run warms up (and compiles)
        if cache is not None:
            cache.reset()
        runs.append(greedy(fwd, prompt, spec.new_tokens, cache, device))
    prefill = median([r[0] for r in runs[1:]])
    decode = median([r[1] for r in runs[1:]])
    res = {
        "batch": batch, "prefill_tokens_per_second": batch * spec.prompt_len / prefill,
        "decode_tokens_per_second": batch * (spec.new_tokens - 1) / decode,
        "first_run_seconds": runs[0][0] + runs[0][1], "allocator_peak_bytes": allocator_peak(device),
        "tokens": runs[-1][2],
    }
    if eager_tokens is not None:
        res["matches_eager"] = bool(torch.equal(runs[-1][2].cpu(), eager_tokens.cpu()))
    return res


def measure_variant(spec: InferSpec, variant: Variant, tokenizer, device: torch.device) -> dict[str, Any]:
    """Size, eager and (if asked) compiled prefill/decode speed of one variant."""
    from lit_qft import quantization as Q
    from transformers import StaticCache

    model = build_variant(spec, variant, len(tokenizer), device)
    row: dict[str, Any] = {
        "variant": variant.name, "recipe": recipe_name(variant.recipe) if variant.recipe else "float",
        "dtype": variant.dtype, "embedding_policy": getattr(variant.recipe, "embedding_policy", None),
        "memory_bytes": Q.model_size_bytes(model), "disk_bytes": disk_bytes(model, tokenizer, variant.recipe),
        "quantized_modules": len(Q.quantized_modules(model)),
    }
    eager_tokens = {}
    for batch in spec.batches:
        res = _measure(model, model, spec, batch, device, lambda b: None)
        eager_tokens[batch] = res.pop("tokens")
        row[f"eager_b{batch}"] = res
    if variant.compiled and spec.compile:
        torch._dynamo.reset()  # a fresh recompile budget per model: no silent fallback to eager
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        max_len = spec.prompt_len + spec.new_tokens
        for batch in spec.compile_batches:
            try:
                res = _measure(compiled, model, spec, batch, device,
                               lambda b: StaticCache(config=model.config, max_cache_len=max_len), eager_tokens.get(batch))
                res.pop("tokens")
            except Exception as e:  # compile errors are results too (tensor subclasses under dynamo)
                res = {"batch": batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            res["dynamo"] = _dynamo_counters()
            row[f"compiled_b{batch}"] = res
        torch._dynamo.reset()
    return row


def inference_benchmark(spec: InferSpec, recipes: list, device: torch.device, compile_names: str = "auto",
                        log=print) -> list[dict[str, Any]]:
    """Measure every variant; a variant that fails is recorded with its error instead of stopping the run."""
    from lit_qft.assets import load_tokenizer

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    tokenizer = load_tokenizer(spec.tokenizer)
    rows = []
    for variant in variants(recipes, compile_names if spec.compile else "none"):
        try:
            row = measure_variant(spec, variant, tokenizer, device)
        except Exception as e:
            row = {"variant": variant.name, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        log("  infer " + summarize(row))
    return rows


def summarize(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['variant']}: {row['error']}"
    parts = [f"{row['variant']}: {row['memory_bytes'] / 2**20:.1f} MiB"]
    for key, res in row.items():
        if key.startswith(("eager_b", "compiled_b")):
            parts.append(f"{key} " + (res["error"][:80] if "error" in res else
                                      f"prefill {res['prefill_tokens_per_second']:.0f} decode {res['decode_tokens_per_second']:.1f} tok/s"))
    return ", ".join(parts)
