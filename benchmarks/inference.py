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

from benchmarks.measure import allocator_peak, current_rss, median, peak_above, recipe_name, release, reset_peak, sync

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
    compile_float: tuple[str, ...] = ("fp32", "bf16")
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    seed: int = 0


@dataclass
class Variant:
    """One model to measure: a recipe (None = float) at an activation/weight dtype.

    ``batches``: eager batch sizes measured (None: all of the spec's); ``same_as``: other recipes whose
    converted model is the same (same torchao target config), reported on this row.
    """

    recipe: Any
    dtype: str = "fp32"
    batches: tuple[int, ...] | None = None
    same_as: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.recipe is None:
            return f"float {self.dtype}"
        policy = getattr(self.recipe, "embedding_policy", "float")
        names = " = ".join((recipe_name(self.recipe), *self.same_as))
        return f"{names} {self.dtype}" + ("" if policy == "float" else f" head={policy}")


def embedding_policies() -> tuple[str, ...]:
    """The embedding/head policies lit_qft offers (read from its type, so new ones are picked up)."""
    from lit_qft import quantization as Q

    return typing.get_args(getattr(Q, "EmbeddingPolicy", typing.Literal["float"])) or ("float",)


def variants(recipes: list, all_batches: bool = False, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[Variant]:
    """Float at each dtype; each distinct quantized target at each dtype; the other head policies at the last dtype.

    Recipes that convert to the same torchao config (a QAT recipe and its PTQ twin) give the same
    model, so they share one row. Only float and the default-policy rows at the last dtype (bf16,
    the fast one, when measured) run every batch size unless ``all_batches``; the rest run batch 1,
    the decode case the targets are about.
    """
    out = [Variant(None, d) for d in dtypes]
    groups: dict[str, list] = {}
    for recipe in recipes:
        if recipe.quantizes:
            groups.setdefault(f"{recipe.base_config()!r} {recipe.skip} {recipe.embedding_policy}", []).append(recipe)
    one = None if all_batches else (1,)
    main = dtypes[-1]
    for group in groups.values():
        group.sort(key=lambda r: r.qat)  # name the row after the PTQ recipe when there is one
        recipe, same = group[0], tuple(recipe_name(r) for r in group[1:])
        out += [Variant(recipe, d, None if d == main else one, same) for d in reversed(dtypes)]
        for policy in embedding_policies():
            if policy != recipe.embedding_policy:
                try:
                    out.append(Variant(dataclasses.replace(recipe, embedding_policy=policy), main, one, same))
                except (TypeError, ValueError):
                    continue
    return out


def compile_selection(rows: list[dict], variant_list: list[Variant], how: str, top: int,
                      float_dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[Variant]:
    """Which variants to compile: ``float`` (fp32 and bf16 float), ``auto`` (float plus the ``top`` fastest
    quantized bf16 variants by eager batch-1 decode: compiling takes minutes per model on CPU), ``all``, ``none``."""
    if how == "none":
        return []
    if how == "all":
        return list(variant_list)
    chosen = [v for v in variant_list if v.recipe is None and v.dtype in float_dtypes]
    if how == "auto":
        speed = {r["variant"]: r.get("eager_b1", {}).get("decode_tokens_per_second", 0) for r in rows if "error" not in r}
        main = variant_list[-1].dtype if variant_list else "fp32"
        quantized = [v for v in variant_list if v.recipe is not None and v.dtype == main and v.name in speed]
        # one per quantization target: a head-policy twin decodes at the same speed and would waste a compile
        best: dict[str, Variant] = {}
        for v in sorted(quantized, key=lambda v: (-speed[v.name], v.recipe.embedding_policy != "float")):
            best.setdefault(type(v.recipe).__name__, v)
        chosen += list(best.values())[:top]
    return chosen


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


def _baseline(device) -> int | None:
    """Memory before a variant is built (freed memory of earlier variants returned first)."""
    release(device)
    reset_peak(device)
    return current_rss() if torch.device(device).type == "cpu" else None


def _measure(fwd, model, spec: InferSpec, batch: int, device, cache_factory, eager_tokens=None,
             baseline: int | None = None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(spec.seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, spec.prompt_len), generator=gen).to(device)
    cache = cache_factory(batch)
    if cache is not None:  # initialize the static cache's lazy buffers eagerly so dynamo sees one state
        model(input_ids=prompt[:, :1], past_key_values=cache, cache_position=torch.arange(1, device=device), use_cache=True)
        cache.reset()
    reset_peak(device)
    runs = []
    for i in range(spec.repeats + 1):  # the first run (2 tokens: prefill + one decode step) warms up and compiles
        if cache is not None:
            cache.reset()
        runs.append(greedy(fwd, prompt, spec.new_tokens if i else 2, cache, device))
    prefill = median([r[0] for r in runs[1:]])
    decode = median([r[1] for r in runs[1:]])
    res = {
        "batch": batch, "prefill_tokens_per_second": batch * spec.prompt_len / prefill,
        "decode_tokens_per_second": batch * (spec.new_tokens - 1) / decode,
        "first_run_seconds": runs[0][0] + runs[0][1], "allocator_peak_bytes": allocator_peak(device),
        # weights + KV cache + activations at their peak (CPU: peak RSS above the process before the model)
        "peak_memory_bytes": peak_above(device, baseline),
        "tokens": runs[-1][2],
    }
    if eager_tokens is not None:
        res["matches_eager"] = bool(torch.equal(runs[-1][2].cpu(), eager_tokens.cpu()))
    return res


def measure_eager(spec: InferSpec, variant: Variant, tokenizer, device: torch.device) -> dict[str, Any]:
    """Size on disk and in memory, eager prefill/decode speed of one variant."""
    from lit_qft import quantization as Q

    baseline = _baseline(device)
    model = build_variant(spec, variant, len(tokenizer), device)
    row: dict[str, Any] = {
        "variant": variant.name, "recipe": recipe_name(variant.recipe) if variant.recipe else "float",
        "recipes": [recipe_name(variant.recipe), *variant.same_as] if variant.recipe else ["float"],
        "dtype": variant.dtype, "embedding_policy": getattr(variant.recipe, "embedding_policy", None),
        "memory_bytes": Q.model_size_bytes(model), "disk_bytes": disk_bytes(model, tokenizer, variant.recipe),
        "quantized_modules": len(Q.quantized_modules(model)),
    }
    for batch in variant.batches or spec.batches:
        res = _measure(model, model, spec, batch, device, lambda b: None, baseline=baseline)
        row["_tokens_b%d" % batch] = res.pop("tokens")
        row[f"eager_b{batch}"] = res
    return row


def measure_compiled(spec: InferSpec, variant: Variant, row: dict[str, Any], tokenizer, device: torch.device) -> None:
    """Compiled prefill/decode speed (static cache, fullgraph); adds ``compiled_b<batch>`` entries to ``row``."""
    from transformers import StaticCache

    baseline = _baseline(device)
    model = build_variant(spec, variant, len(tokenizer), device)
    torch._dynamo.reset()  # a fresh recompile budget per model: no silent fallback to eager
    from torch._dynamo.utils import counters

    counters.clear()  # graph counts per model, not cumulative
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    max_len = spec.prompt_len + spec.new_tokens
    for batch in spec.compile_batches:
        try:
            res = _measure(compiled, model, spec, batch, device,
                           lambda b: StaticCache(config=model.config, max_cache_len=max_len), row.get(f"_tokens_b{batch}"),
                           baseline=baseline)
            res.pop("tokens")
        except Exception as e:  # compile errors are results too (tensor subclasses under dynamo)
            res = {"batch": batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        res["dynamo"] = _dynamo_counters()
        row[f"compiled_b{batch}"] = res
    torch._dynamo.reset()


def inference_benchmark(spec: InferSpec, recipes: list, device: torch.device, compile_names: str = "auto",
                        compile_top: int = 2, log=print, progress=None) -> list[dict[str, Any]]:
    """Measure every variant eagerly, then compile the selected ones; failures are recorded, not raised.

    ``progress(rows)`` is called after every measurement with the rows so far (the runner saves them).
    """
    from lit_qft.assets import load_tokenizer

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    tokenizer = load_tokenizer(spec.tokenizer)
    variant_list = variants(recipes, all_batches=device.type == "cuda", dtypes=spec.dtypes)
    rows = []
    for variant in variant_list:
        try:
            row = measure_eager(spec, variant, tokenizer, device)
        except Exception as e:
            row = {"variant": variant.name, "recipe": recipe_name(variant.recipe) if variant.recipe else "float",
                   "dtype": variant.dtype, "embedding_policy": getattr(variant.recipe, "embedding_policy", None),
                   "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        log("  infer " + summarize(row))
        _report(progress, rows)
    by_name = {r["variant"]: r for r in rows}
    for variant in compile_selection(rows, variant_list, compile_names if spec.compile else "none", compile_top,
                                     spec.compile_float):
        row = by_name[variant.name]
        if "error" in row:
            continue
        measure_compiled(spec, variant, row, tokenizer, device)
        log("  infer " + summarize(row))
        _report(progress, rows)
    for row in rows:
        for key in [k for k in row if k.startswith("_tokens")]:
            del row[key]
    return rows


def _report(progress, rows: list[dict[str, Any]]) -> None:
    if progress is not None:  # without the greedy tokens kept for the compiled-vs-eager check
        progress([{k: v for k, v in r.items() if not k.startswith("_tokens")} for r in rows])


def summarize(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['variant']}: {row['error']}"
    parts = [f"{row['variant']}: {row['memory_bytes'] / 2**20:.1f} MiB"]
    for key, res in row.items():
        if key.startswith(("eager_b", "compiled_b")):
            parts.append(f"{key} " + (res["error"][:80] if "error" in res else
                                      f"prefill {res['prefill_tokens_per_second']:.0f} decode {res['decode_tokens_per_second']:.1f} tok/s"))
    return ", ".join(parts)
