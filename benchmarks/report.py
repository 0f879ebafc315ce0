"""Turn a benchmark result JSON into a Markdown report and PNG plots.

    python benchmarks/report.py benchmarks/results/<timestamp>.json

writes ``<timestamp>.md``, ``<timestamp>_accuracy_vs_throughput.png`` and ``<timestamp>_size_vs_accuracy.png``
next to the JSON. Pure formatting: every number comes from the JSON (``benchmarks/run.py`` writes it).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

MiB = 2**20


def _f(x, fmt: str = ".1f", none: str = "—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, fmt)


def _x(x) -> str:
    return _f(x, ".2f") + "x" if x is not None else "—"


def _mib(b) -> str:
    return _f(b / MiB if b else None, ".1f")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


# ------------------------------------------------------------------ derived figures
def framework_row(res: dict, tool: str, precision: str) -> dict | None:
    return next((r for r in res.get("framework", []) if r.get("tool") == tool and r.get("precision") == precision
                 and "error" not in r), None)


def train_row(res: dict, recipe: str, precision: str) -> dict | None:
    return next((r for r in res.get("train", []) if r.get("recipe") == recipe and r.get("precision") == precision
                 and "error" not in r), None)


def matmul_rate(res: dict, dtype: str = "fp32") -> float | None:
    """The machine's matmul rate: the best of the measurements the run took (start, resumes, end).

    A rate measured while something else shared the CPU is low, and MFU against it overstates the
    training step (above 100 %); the best measurement is closest to what the hardware can do."""
    rates = [res.get("matmul_flops", {}).get(dtype)]
    rates += [r.get(dtype) for r in res.get("matmul_flops_resumed", [])]
    if dtype == "fp32":
        rates.append(res.get("matmul_flops_fp32_end"))
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def mfu(res: dict, row: dict, precision: str) -> float | None:
    rate = matmul_rate(res, "bf16" if "bf16" in precision else "fp32")
    if not row or not rate or not row.get("flops_per_token"):
        return None
    return row["flops_per_token"] * row["tokens_per_second"] / rate


def _decode(row: dict, mode: str, batch: int = 1) -> float | None:
    r = row.get(f"{mode}_b{batch}")
    return r.get("decode_tokens_per_second") if r and "error" not in r else None


def inference_float(res: dict, dtype: str) -> dict | None:
    return next((r for r in res.get("inference", []) if r.get("recipe") == "float" and r.get("dtype") == dtype), None)


def best_quantized_decode(res: dict, mode: str) -> dict | None:
    rows = [r for r in res.get("inference", []) if r.get("recipe") not in (None, "float") and _decode(r, mode)]
    return max(rows, key=lambda r: _decode(r, mode), default=None)


def targets(res: dict) -> list[dict[str, Any]]:
    """Each target of issue 8 with the measured value and whether it is met (None: not measured)."""
    out = []

    def add(name, target, value, met, note=""):
        out.append({"target": name, "goal": target, "measured": value, "met": met, "note": note})

    hf32, hfbf = framework_row(res, "HF Trainer", "fp32"), framework_row(res, "HF Trainer", "bf16")
    lit32, litbf = framework_row(res, "lit-qft fit", "fp32"), framework_row(res, "lit-qft fit", "bf16")
    # lit-qft's default precision follows the hardware (bf16-mixed where bf16 is native); HF's is fp32
    default = res.get("fit_default_precision", "32-true")
    lit_default = litbf if default == "bf16-mixed" else lit32
    if hf32 and lit_default:
        r = lit_default["tokens_per_second"] / hf32["tokens_per_second"]
        add(f"default `lit-qft fit` ({default} here) vs HF Trainer script at its default fp32 (tokens/s)", ">= 1.30x",
            _x(r), r >= 1.3)
    if hf32 and litbf and default != "bf16-mixed":
        r = litbf["tokens_per_second"] / hf32["tokens_per_second"]
        add("`lit-qft fit` bf16-mixed vs HF Trainer default fp32", ">= 1.30x", _x(r), r >= 1.3,
            "bf16 is not native here, so it is not the default")
    for prec, a, b in (("fp32", lit32, hf32), ("bf16", litbf, hfbf)):
        if a and b:
            r = a["tokens_per_second"] / b["tokens_per_second"]
            add(f"`lit-qft fit` vs HF Trainer at equal precision ({prec})", ">= 1.00x", _x(r), r >= 1.0)
    m = mfu(res, train_row(res, "NoQuantization", "32-true"), "32-true")
    if m is not None:
        add("float fp32 training step, share of measured fp32 matmul rate (MFU)", ">= 75 %", _f(100 * m, ".0f") + " %", m >= 0.75)
    for r in res.get("train", []):
        if r.get("recipe") in res.get("qat_recipes", []) and "error" not in r and r.get("step_time_vs_float"):
            v = r["step_time_vs_float"]
            add(f"{r['recipe']} step time vs float ({r['precision']})", "<= 1.15x", _x(v), v <= 1.15)
    default = res.get("inference_default")  # what `lit-qft generate` picks on this machine
    for mode in ("compiled", "eager"):
        best = best_quantized_decode(res, mode)
        f32, fbf = inference_float(res, "fp32"), inference_float(res, "bf16")
        if best and f32 and _decode(f32, mode):
            v = _decode(best, mode) / _decode(f32, mode)
            add(f"quantized decode, batch 1, {mode}: best variant vs fp32", ">= 3.00x", _x(v), v >= 3.0,
                best["variant"] + (f"; `lit-qft generate` default here: {default}" if default else ""))
        if best and fbf and _decode(fbf, mode):
            v = _decode(best, mode) / _decode(fbf, mode)
            add(f"quantized decode, batch 1, {mode}: best variant vs bf16", ">= 1.40x", _x(v), v >= 1.4, best["variant"])
    f32 = inference_float(res, "fp32")
    q = [r for r in res.get("inference", []) if r.get("recipe") not in (None, "float") and r.get("memory_bytes")]
    if f32 and q:
        small = min(q, key=lambda r: r["memory_bytes"])
        v = small["memory_bytes"] / f32["memory_bytes"]
        add("quantized weights, share of fp32 bytes (smallest variant)", "<= 30 %", _f(100 * v, ".0f") + " %", v <= 0.30,
            small["variant"])
    quick = res.get("settings", {}).get("mode") == "quick"
    for r in res.get("accuracy", {}).get("rows", []):
        if r.get("kind") == "QAT" and r.get("recipe") in res.get("int4_weight_recipes", []):
            rec, met, note = r.get("recovered"), None, ""
            float_ppl = r["ppl"] - r["degradation"] if r.get("degradation") is not None else None
            if quick:  # a few steps on a tiny model: the ratio of two noise-sized differences
                note = "quick mode: a few steps on a tiny model, not a measurement"
            elif rec is None or not float_ppl or r.get("ptq_degradation", 0) < 0.005 * float_ppl:
                note = "PTQ degrades perplexity by < 0.5 %: nothing measurable to recover"
            else:
                met = rec >= 0.7
            add(f"{r['recipe']}: share of PTQ perplexity degradation QAT recovers ({res['accuracy'].get('model')})",
                ">= 70 %", _f(100 * rec, ".1f") + " %" if rec is not None else "—", met, note)
    compiled = [(r["variant"], v) for r in res.get("inference", []) for k, v in r.items() if k.startswith("compiled_b")]
    if compiled:
        bad = [n for n, v in compiled if "error" in v or v.get("dynamo", {}).get("unique_graphs", 0) == 0]
        add("compiled runs really compiled (fullgraph, recompile limit = error, graphs counted)", "all",
            f"{len(compiled) - len(bad)}/{len(compiled)}", not bad, ", ".join(bad)[:200])
    return out


# ------------------------------------------------------------------ markdown
def markdown(res: dict, plots: list[str]) -> str:
    s = res.get("settings", {})
    m = res.get("machine", {})
    L = [f"# lit-qft benchmark — {res.get('timestamp', '')} ({s.get('mode', '?')} mode)", ""]
    if s.get("mode") == "quick":
        L += ["> **Quick mode**: tiny models and a few steps to exercise every path; the figures are not the "
              "full benchmark's and say little about real models.", ""]
    if res.get("notes"):
        L += [f"> {res['notes']}", ""]
    if res.get("incomplete"):
        L += [f"> **Stopped inside section(s) {', '.join(res['incomplete'])}**: their tables hold only the rows "
              "measured before the stop (`--resume` this file with `--sections` to redo them).", ""]
    if res.get("bf16_skipped_reason"):
        L += [f"> bf16: {res['bf16_skipped_reason']}.", ""]
    L += [f"- Machine: {m.get('cpu')} ({m.get('logical_cpus')} logical CPUs, torch threads {m.get('torch_threads')}), "
          f"device `{m.get('device')}`" + (f", GPU {m['gpu']['name']}" if m.get("gpu") else ""),
          f"- Load average (1/5/15 min) at start {m.get('load_average_start')}, at end {m.get('load_average_end')}; "
          f"glibc allocator tuned in-process: {m.get('allocator_tuned')}",
          "- Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v),
          "- Measured matmul rate (best of the run's measurements; MFU uses it): "
          + ", ".join(f"{k} {matmul_rate(res, k) / 1e9:.0f} GFLOP/s" for k in res.get("matmul_flops", {}))
          + f" (fp32 at start {res.get('matmul_flops', {}).get('fp32', 0) / 1e9:.0f}, at end "
          + f"{(res.get('matmul_flops_fp32_end') or 0) / 1e9:.0f})",
          f"- Total time {res.get('total_seconds', 0) / 60:.1f} min. Command: `{s.get('command', '')}`", ""]
    if res.get("skipped_recipes"):
        L += ["Recipes not measured (need arguments): " + ", ".join(f"{k} ({v})" for k, v in res["skipped_recipes"].items()), ""]

    L += ["## Targets", ""]
    L += _table(["target", "goal", "measured", "met", "note"],
                [[t["target"], t["goal"], t["measured"], {True: "yes", False: "**no**", None: "—"}[t["met"]], t["note"]]
                 for t in targets(res)])

    acc = res.get("accuracy")
    if acc:
        L += [f"## Accuracy ({acc.get('model')}, {acc.get('steps')} fine-tuning steps, {acc.get('precision')}, "
              f"{acc.get('val_tokens')} validation tokens)", ""]
        if acc.get("pretrained_ppl"):
            L += [f"Pretrained model before fine-tuning: perplexity {acc['pretrained_ppl']:.3f}.", ""]
        rows = []
        for r in acc.get("rows", []):
            if "error" in r:
                rows.append([r["recipe"], "error", r["error"][:120], "", "", "", "", ""])
                continue
            rows.append([r["recipe"], r["kind"], _f(r["ppl"], ".3f"), _f(r.get("degradation"), "+.3f"),
                         _f(r.get("ptq_same_target_ppl"), ".3f"), _f(100 * r["recovered"], ".1f") + " %" if r.get("recovered") is not None else "—",
                         _mib(r.get("memory_bytes")), _mib(r.get("disk_bytes"))])
        L += _table(["recipe", "kind", "val ppl", "Δ vs float", "PTQ same target ppl", "QAT recovers", "weights MiB", "disk MiB"], rows)

    ft = res.get("finetune")
    if ft:
        L += [f"## Fine-tuning toward a quantized model: full vs LoRA ({ft.get('model')}, {ft.get('steps')} steps x "
              f"{ft.get('tokens_per_step')} tokens, {ft.get('precision')}, LoRA rank {ft.get('lora_rank')}, "
              f"{ft.get('val_tokens')} validation tokens; fresh `lit-qft fit` process each)", ""]
        L += ["before: the starting model (pretrained float for full fine-tuning, the quantized base for LoRA); "
              "trained: as trained (float / fake-quantized / base + adapters); final: the deployable quantized model "
              "(int8 PTQ of the float fine-tune / QAT converted / adapters merged and re-quantized: into the "
              "reloaded pretrained float weights for a PTQ base, marked *, else into the base's own weights).", ""]
        full = next((r for r in ft.get("rows", []) if r.get("variant") == "full-ft" and "error" not in r), None)
        rows = []
        for r in ft.get("rows", []):
            if "error" in r:
                rows.append([r["variant"], r["recipe"], "error: " + r["error"][:100]] + [""] * 9)
                continue
            speed = r["tokens_per_second"] / full["tokens_per_second"] if full and r.get("tokens_per_second") else None
            rows.append([r["variant"], r["recipe"], f"{r['trainable_params']:,}" if r.get("trainable_params") else "—",
                         _mib(r.get("peak_rss_bytes")), _mib(r.get("allocator_peak_bytes")),
                         _f(r.get("tokens_per_second"), ".0f"), _x(speed),
                         _f(r.get("before_ppl"), ".3f"), _f(r.get("trained_ppl"), ".3f"),
                         _f(r.get("final_ppl"), ".3f") + (" *" if r.get("merged_through_float_layers") else ""),
                         _mib(r.get("final_bytes")), _mib(r.get("adapter_bytes"))])
        L += _table(["variant", "recipe", "trainable params", "peak RSS MiB", "GPU peak MiB", "tokens/s", "speed vs full-ft",
                     "before ppl", "trained ppl", "final ppl", "final weights MiB", "adapters on disk MiB"], rows)

    for t in res.get("tasks", []) or []:
        names = t.get("metrics", [])
        L += [f"## Task: {t['task']} ({t.get('model')}, {t.get('steps')} fine-tuning steps, "
              f"{t.get('val_examples')} validation examples; `lit-qft`'s own validation metrics)", ""]
        rows = []
        for r in t.get("rows", []):
            if "error" in r:
                rows.append([r["model"], r["kind"], "error: " + r["error"][:100]] + [""] * (len(names) + 1))
                continue
            rows.append([r["model"], r["kind"], *[_f(r.get(n), ".4f") for n in names], _f(r.get("loss"), ".4f"),
                         _mib(r.get("memory_bytes"))])
        L += _table(["model", "kind", *[f"val {n}" for n in names], "val loss", "weights MiB"], rows)

    if res.get("train"):
        spec = s.get("train", {})
        L += [f"## Training throughput per recipe (one process, interleaved; {spec.get('config_overrides') or 'GPT-2 small'}, "
              f"batch {spec.get('batch_size')} x {spec.get('block_size')} tokens)", ""]
        rows = []
        for r in res["train"]:
            if "error" in r:
                rows.append([r["recipe"], r["precision"], "error: " + r["error"][:100], "", "", "", ""])
                continue
            rows.append([r["recipe"], r["precision"], _f(1000 * r["step_seconds"], ".0f"), _f(r["tokens_per_second"], ".0f"),
                         _x(r.get("step_time_vs_float")), _x(r.get("speed_vs_float_fp32")),
                         _f(100 * mfu(res, r, r["precision"]), ".0f") + " %" if mfu(res, r, r["precision"]) else "—"])
        L += _table(["recipe", "precision", "step ms", "tokens/s", "step time vs float", "speed vs float fp32", "MFU"], rows)
        L += ["PTQ recipes train exactly like float (they quantize after training).", ""]

    if res.get("framework"):
        L += ["## lit-qft fit vs the plain HF Trainer script (fresh process each, same model/data/batch/steps)", ""]
        hf32 = framework_row(res, "HF Trainer", "fp32")
        rows = []
        for r in res["framework"]:
            if "error" in r:
                rows.append([r["tool"], r["precision"], "error: " + r["error"], "", "", "", ""])
                continue
            same = framework_row(res, "HF Trainer", r["precision"])
            rows.append([r["tool"], r["precision"], _f(1000 * r["step_seconds"], ".0f"), _f(r["tokens_per_second"], ".0f"),
                         _x(r["tokens_per_second"] / hf32["tokens_per_second"]) if hf32 else "—",
                         _x(r["tokens_per_second"] / same["tokens_per_second"]) if same else "—",
                         _f(100 * (mfu(res, r, r["precision"]) or float("nan")), ".0f") + " %",
                         _mib(r.get("peak_rss_bytes")), _mib(r.get("allocator_peak_bytes"))])
        L += _table(["tool", "precision", "step ms", "tokens/s", "vs HF fp32", "vs HF same precision", "MFU",
                     "peak RSS MiB", "GPU peak MiB"], rows)

    if res.get("memory"):
        L += ["## Peak training memory (fresh `lit-qft fit` process each)", ""]
        rows = [[r["recipe"], r["optimizer"], r["precision"], "error: " + r["error"] if "error" in r else _mib(r.get("peak_rss_bytes")),
                 _mib(r.get("allocator_peak_bytes")), _f(r.get("tokens_per_second"), ".0f")] for r in res["memory"]]
        L += _table(["recipe", "optimizer", "precision", "peak RSS MiB", "GPU allocator peak MiB", "tokens/s"], rows)

    if res.get("inference"):
        spec = s.get("inference", {})
        L += [f"## Inference ({spec.get('config_overrides') or 'GPT-2 small'}, prompt {spec.get('prompt_len')}, "
              f"{spec.get('new_tokens')} new tokens, greedy; tokens/s)", "",
              "peak MiB: weights + KV cache + activations at their peak while generating (CUDA: allocator peak; "
              "CPU: peak RSS above the process's RSS before the model was built).", ""]
        f32 = inference_float(res, "fp32")
        batches = spec.get("batches", [1])
        header = ["variant", "weights MiB", "% of fp32", "disk MiB"]
        for b in batches:
            header += [f"eager prefill b{b}", f"eager decode b{b}", f"peak MiB b{b}"]
        for b in spec.get("compile_batches", []):
            header += [f"compiled prefill b{b}", f"compiled decode b{b}", "graphs"]
        header += ["decode b1 vs fp32 (same mode)"]
        rows = []
        for r in res["inference"]:
            if "error" in r:
                rows.append([r["variant"], "error: " + r["error"][:100]] + [""] * (len(header) - 2))
                continue
            row = [r["variant"], _mib(r["memory_bytes"]),
                   _f(100 * r["memory_bytes"] / f32["memory_bytes"], ".0f") + " %" if f32 else "—", _mib(r["disk_bytes"])]
            for b in batches:
                e = r.get(f"eager_b{b}", {})
                row += [_f(e.get("prefill_tokens_per_second"), ".0f"), _f(e.get("decode_tokens_per_second"), ".1f"),
                        _mib(e.get("peak_memory_bytes"))]
            for b in spec.get("compile_batches", []):
                c = r.get(f"compiled_b{b}")
                if not c:
                    row += ["", "", ""]
                elif "error" in c:
                    row += ["error: " + c["error"][:60], "", ""]
                else:
                    row += [_f(c["prefill_tokens_per_second"], ".0f"), _f(c["decode_tokens_per_second"], ".1f"),
                            str(c.get("dynamo", {}).get("unique_graphs"))]
            mode = "compiled" if _decode(r, "compiled") else "eager"
            ratio = _decode(r, mode) / _decode(f32, mode) if f32 and _decode(f32, mode) and _decode(r, mode) else None
            row.append(f"{_x(ratio)} ({mode})" if ratio else "—")
            rows.append(row)
        L += _table(header, rows)
    for p in plots:
        L += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(L)


# ------------------------------------------------------------------ plots
def plots(res: dict, stem: Path) -> list[str]:
    """Accuracy vs throughput and size vs accuracy, one point per recipe; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {r["recipe"]: r for r in res.get("accuracy", {}).get("rows", []) if "error" not in r}
    if not acc:
        return []
    written = []
    float_name = "float (fine-tuned)"
    # training speed vs float (fp32; PTQ trains as float) and decode speed vs fp32 (batch 1, best mode)
    train_speed = {r["recipe"]: r.get("speed_vs_float") for r in res.get("train", [])
                   if r.get("precision") == "32-true" and "error" not in r}
    f32 = inference_float(res, "fp32")
    decode = {}
    for r in res.get("inference", []):
        for mode in ("compiled", "eager"):
            if f32 and _decode(r, mode) and _decode(f32, mode):
                for name in r.get("recipes", [r["recipe"]]):
                    name = name if name != "float" else float_name
                    decode[name] = max(decode.get(name, 0), _decode(r, mode) / _decode(f32, mode))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in acc.items():
        key = "NoQuantization" if name == float_name else name
        t = 1.0 if r["kind"] == "PTQ" else train_speed.get(key)
        for ax, x in ((axes[0], t), (axes[1], decode.get(name))):
            if x:
                ax.scatter(x, r["ppl"], s=40)
                ax.annotate(name, (x, r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    model = res.get("accuracy", {}).get("model")
    axes[0].set(xlabel="training tokens/s vs float (fp32)", ylabel=f"validation perplexity ({model})",
                title="accuracy vs training throughput")
    axes[1].set(xlabel="best batch-1 decode tokens/s vs fp32 (same compile mode)", ylabel="validation perplexity",
                title="accuracy vs decode throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = f"{stem}_accuracy_vs_throughput.png"
    _save(fig, path)
    written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, r in acc.items():
        if r.get("memory_bytes"):
            ax.scatter(r["memory_bytes"] / MiB, r["ppl"], s=40)
            ax.annotate(name, (r["memory_bytes"] / MiB, r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="weights in memory (MiB, tied storage once)", ylabel=f"validation perplexity ({model})",
           title="size vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = f"{stem}_size_vs_accuracy.png"
    _save(fig, path)
    written.append(path)
    return written


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    from lit_qft.assets import atomic_file

    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_report(json_path: str | Path) -> Path:
    """Write the Markdown report and plots next to ``json_path``; returns the Markdown path."""
    from lit_qft.assets import atomic_file

    json_path = Path(json_path)
    res = json.loads(json_path.read_text())
    stem = json_path.with_suffix("")
    pngs = plots(res, stem)
    md = json_path.with_suffix(".md")
    with atomic_file(md) as f:
        f.write(markdown(res, pngs))
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Markdown table and PNG plots from a benchmark result JSON.")
    p.add_argument("json", help="benchmarks/results/<timestamp>.json")
    print(write_report(p.parse_args(argv).json))


if __name__ == "__main__":
    main()
