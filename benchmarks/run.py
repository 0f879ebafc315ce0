"""One command for the whole benchmark suite: ``python benchmarks/run.py [--quick]``.

Measures every quantization recipe lit-qft defines (any subclass of ``lit_qft.quantization.Recipe``,
found at run time) for accuracy, training throughput, training memory, inference speed and size,
plus lit-qft's ``fit`` against the plain Hugging Face Trainer script. Writes
``benchmarks/results/<timestamp>.json`` (updated after every section, so a stopped run keeps what it
measured), then a Markdown report and PNG plots next to it (``benchmarks/report.py``).

The device is chosen automatically (CUDA when present), so the same command gives GPU columns
(allocator peak memory, tokens/s on the GPU) on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python benchmarks/run.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import measure  # noqa: E402

SECTIONS = ("train", "framework", "memory", "inference", "accuracy", "finetune", "tasks")
#: Small enough for a quick run, the shape of the quickstart config.
TINY_GPT2 = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}


def build_settings(quick: bool, device: torch.device, accuracy_model: str | None) -> dict[str, Any]:
    """The workloads of each section. Quick: tiny GPT-2, a few steps. Full: GPT-2 small and SmolLM2-135M."""
    from benchmarks.inference import InferSpec
    from benchmarks.tasks import TaskSpec
    from benchmarks.training import TrainSpec

    gpu = device.type == "cuda"
    if quick:
        s = {
            "train": TrainSpec(config_overrides=TINY_GPT2, max_documents=800, batch_size=8, warmup_steps=1, steps=2),
            "train_rounds": 1, "framework_rounds": 1, "memory_spec": None,
            "inference": InferSpec(config_overrides=TINY_GPT2, prompt_len=16, new_tokens=6, batches=(1, 2),
                                   compile_batches=(1,), repeats=1, compile_float=("fp32",)),
            "compile": "auto", "compile_top": 1,
            "accuracy": TrainSpec(config_overrides=TINY_GPT2, max_documents=800, batch_size=8, steps=8, lr=2e-3,
                                  warmup_steps=0),
            "val_batches": 2,
            # full fine-tuning vs LoRA over quantized bases (lit_qft.lora.fine_tuning_variants)
            "finetune": TrainSpec(config_overrides=TINY_GPT2, max_documents=800, batch_size=8, warmup_steps=1, steps=3),
            "finetune_val_batches": 2,
            "tasks": [
                TaskSpec("sentiment", {"source": "rotten-tomatoes", "tokenizer": "gpt2", "style": "head", "max_length": 64,
                                       "batch_size": 8, "max_examples": 400}, config_overrides=TINY_GPT2, steps=4,
                         lr=2e-3, val_batches=2),
                TaskSpec("translation", {"source": "bible-en-es", "tokenizer": "gpt2", "max_length": 96,
                                         "max_target_length": 48, "max_new_tokens": 8, "batch_size": 8,
                                         "max_examples": 400}, config_overrides=TINY_GPT2, steps=4, lr=2e-3, val_batches=1),
            ],
        }
    else:
        s = {
            # GPT-2 small (124M) built from config: the shapes of the published CPU speed facts
            "train": TrainSpec(config_overrides=None, max_documents=3000, batch_size=4, warmup_steps=2, steps=4),
            "train_rounds": 2, "framework_rounds": 2, "memory_spec": None,
            "inference": InferSpec(config_overrides=None, prompt_len=128, new_tokens=32, batches=(1, 8),
                                   compile_batches=(1, 8) if gpu else (1,), repeats=3),
            "compile": "auto", "compile_top": 2,
            "accuracy": TrainSpec(pretrained="smollm2-135m", tokenizer="smollm2", max_documents=6000, batch_size=4,
                                  steps=40, lr=5e-5, warmup_steps=0),
            "val_batches": 12,
            # SmolLM2-135M: 24 steps per variant, each in its own process (its peak RSS is the variant's)
            "finetune": TrainSpec(pretrained="smollm2-135m", tokenizer="smollm2", max_documents=6000, batch_size=4,
                                  warmup_steps=2, steps=22),
            "finetune_val_batches": 8,
            "tasks": [
                # label-word prompts ("Review: ...\nSentiment: positive"): the pretrained model scores from step 0
                TaskSpec("sentiment", {"source": "rotten-tomatoes", "tokenizer": "smollm2", "style": "prompt",
                                       "max_length": 64, "batch_size": 8, "max_examples": 2000},
                         pretrained="smollm2-135m", steps=20, lr=2e-5, val_batches=10),
                TaskSpec("translation", {"source": "bible-en-es", "tokenizer": "smollm2", "max_length": 96,
                                         "max_target_length": 48, "max_new_tokens": 32, "batch_size": 8,
                                         "max_examples": 3000, "val_fraction": 0.02},
                         pretrained="smollm2-135m", steps=20, lr=5e-5, val_batches=4),
            ],
        }
    if accuracy_model:
        acc = s["accuracy"]
        if accuracy_model == "smollm2-135m":
            s["accuracy"] = dataclasses.replace(acc, pretrained="smollm2-135m", tokenizer="smollm2", config_overrides=None,
                                                lr=5e-5)
        elif accuracy_model == "tiny-gpt2":
            s["accuracy"] = dataclasses.replace(acc, pretrained=None, tokenizer="gpt2", config_overrides=TINY_GPT2, lr=2e-3)
        else:
            raise ValueError(f"--accuracy-model={accuracy_model!r}: use smollm2-135m or tiny-gpt2")
    # memory probes: the training workload, a few steps (low-bit optimizers compile on their first step)
    s["memory_spec"] = dataclasses.replace(s["train"], warmup_steps=1, steps=1)
    s["train_precisions"] = ["32-true", "bf16-mixed"]
    s["framework_precisions"] = ["fp32", "bf16"]
    s["accuracy_precision"] = "bf16-mixed"
    return s


def recipe_facts(recipes: list) -> list[dict[str, Any]]:
    out = []
    for r in recipes:
        cfg = r.base_config() if r.quantizes else None
        wdt = getattr(cfg, "weight_dtype", None)
        int4 = wdt == torch.int4 or "Int4" in type(cfg).__name__ if cfg is not None else False
        out.append({"name": measure.recipe_name(r), "class_path": measure.recipe_class_path(r), "qat": r.qat,
                    "quantizes": r.quantizes, "args": measure.recipe_args(r),
                    "base_config": type(cfg).__name__ if cfg is not None else None, "int4_weight": bool(int4)})
    return out


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def save(results: dict, path: Path) -> None:
    from lit_qft.assets import atomic_file

    with atomic_file(path) as f:
        json.dump(_jsonable(results), f, indent=1)


def new_results(a, s: dict, command: str, stamp: str, device, compile_names: str, facts: list, skipped: dict,
                allocator_tuned: bool) -> dict[str, Any]:
    """The skeleton of a new result file: settings, machine, versions, recipes."""
    return {
        "timestamp": stamp,
        "settings": {"mode": "quick" if a.quick else "full", "command": command,
                     "sections": a.sections, "compile": compile_names, **dict(s)},
        "machine": {**measure.machine_info(device), "allocator_tuned": allocator_tuned},
        "recipes": facts, "skipped_recipes": skipped,
        "qat_recipes": [f["name"] for f in facts if f["qat"]],
        "int4_weight_recipes": [f["name"] for f in facts if f["int4_weight"]],
        "section_seconds": {}, "errors": {},
    }


def resume(a, s: dict, command: str, stamp: str, device) -> tuple[Path, dict[str, Any]]:
    """Load an earlier result file to add sections to it; refuse one made in the other mode."""
    path = Path(a.resume)
    if not path.is_file():
        raise SystemExit(f"run.py: error: --resume={a.resume}: no such result file")
    results = json.loads(path.read_text())
    mode = "quick" if a.quick else "full"
    if results.get("settings", {}).get("mode") != mode:
        raise SystemExit(f"run.py: error: --resume={a.resume} is a {results.get('settings', {}).get('mode')}-mode "
                         f"run; add --quick to match it, or drop --resume")
    settings = results["settings"]
    settings["sections"] = [x for x in SECTIONS if x in set(settings.get("sections", [])) | set(a.sections)]
    settings["command"] = f"{settings.get('command', '')} ; then {command}"
    for key in ("finetune", "finetune_val_batches", "tasks", "accuracy", "val_batches"):
        settings[key] = s.get(key)
    results.setdefault("resumed", []).append({"timestamp": stamp, "sections": a.sections,
                                              "load_average_start": measure.load_average()})
    results["machine"]["load_average_end"] = None
    return path, results


def run_section(results: dict[str, Any], section: str, job, out: Path, log=print) -> None:
    """Run one section, saving the result file after every row it reports and when it ends.

    While the section runs, ``results["incomplete"]`` names it: a run stopped there keeps the rows
    measured so far, and the report marks the section as partial. A section that raises is recorded
    in ``results["errors"]``; the other sections still run.
    """
    log(f"[{section}]")
    incomplete = results.setdefault("incomplete", [])
    if section not in incomplete:
        incomplete.append(section)

    def progress(partial) -> None:
        results[section] = partial
        save(results, out)

    t0 = time.perf_counter()
    try:
        results[section] = job(progress)
        incomplete.remove(section)
        results["errors"].pop(section, None)
    except Exception as e:  # keep the other sections' results
        import traceback

        results["errors"][section] = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    results["section_seconds"][section] = round(time.perf_counter() - t0, 1)
    log(f"[{section}] {results['section_seconds'][section]:.0f} s")
    save(results, out)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description="lit-qft benchmark suite (accuracy, throughput, memory, size).")
    p.add_argument("--quick", action="store_true", help="tiny models, a few steps (minutes); the smoke-test mode")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--recipes", default=None, help="comma-separated recipe class names (default: every Recipe subclass)")
    p.add_argument("--compile", default=None, choices=["auto", "all", "float", "none"],
                   help="which inference variants are compiled: auto (float + the fastest quantized ones), all, float, none")
    p.add_argument("--accuracy-model", default=None, help="smollm2-135m or tiny-gpt2 (default: by mode)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds for throughput ratios")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default=str(measure.REPO / "benchmarks" / "results"), help="folder for results")
    p.add_argument("--finetune-variants", default=None,
                   help="comma-separated fine-tuning variants to (re)run (default: all); with --resume the "
                        "other variants' rows are kept")
    p.add_argument("--resume", default=None, metavar="JSON",
                   help="add the chosen --sections to an earlier result file (same settings mode) instead of a new one")
    a = p.parse_args(argv)
    a.sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    bad = set(a.sections) - set(SECTIONS)
    if bad:
        p.error(f"--sections: unknown {sorted(bad)}; choose from {','.join(SECTIONS)}")
    return a


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    from lit_qft.runtime import tune_glibc_allocator

    allocator_tuned = tune_glibc_allocator()  # the same process setting `lit-qft` applies for its users
    if a.threads:
        torch.set_num_threads(a.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchao", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = measure.pick_device(a.device)
    recipes, skipped = measure.discover_recipes(a.recipes.split(",") if a.recipes else None)
    s = build_settings(a.quick, device, a.accuracy_model)
    if a.rounds:
        s["train_rounds"] = s["framework_rounds"] = a.rounds
    compile_names = a.compile or s["compile"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out) / f"{stamp}{'-quick' if a.quick else ''}.json"
    facts = recipe_facts(recipes)
    command = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    if a.resume:
        out, results = resume(a, s, command, stamp, device)
    else:
        results = new_results(a, s, command, stamp, device, compile_names, facts, skipped, allocator_tuned)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"lit-qft benchmark ({results['settings']['mode']}) on {device}: recipes "
        + ", ".join(f["name"] for f in facts) + f"; sections {','.join(a.sections)}; results -> {out}")
    t_start = time.perf_counter()
    rates = {"fp32": measure.matmul_rate(device, torch.float32), "bf16": measure.matmul_rate(device, torch.bfloat16)}
    if "matmul_flops" in results:  # a resumed run: keep every measurement (the report uses the best)
        results.setdefault("matmul_flops_resumed", []).append(rates)
    results.setdefault("matmul_flops", rates)
    log("matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()))
    results["bf16_measured"] = measure.native_bf16(device, rates)
    if not results["bf16_measured"]:
        results["bf16_skipped_reason"] = (
            f"this CPU emulates bf16 matmuls ({rates['bf16'] / 1e9:.2f} GFLOP/s vs fp32 "
            f"{rates['fp32'] / 1e9:.1f}; no AVX-512 BF16/AMX): bf16 rows skipped")
        log(results["bf16_skipped_reason"])
        s["train_precisions"], s["framework_precisions"], s["accuracy_precision"] = ["32-true"], ["fp32"], "32-true"
        s["inference"] = dataclasses.replace(s["inference"], dtypes=("fp32",), compile_float=("fp32",))
        results["settings"].update(train_precisions=s["train_precisions"], accuracy_precision="32-true",
                                   inference=s["inference"])
    save(results, out)

    from benchmarks import accuracy, finetune, inference, tasks, training
    from lit_qft import quantization as Q

    earlier_finetune = json.loads(json.dumps(results.get("finetune"))) if results.get("finetune") else None
    jobs = {  # each takes ``progress``: the section's results so far, saved as they grow
        "train": lambda progress: training.recipe_throughput(s["train"], recipes, device, s["train_precisions"],
                                                             s["train_rounds"], log=log),
        "framework": lambda progress: training.framework_comparison(s["train"], device, s["framework_rounds"],
                                                                    s["framework_precisions"], log=log),
        "memory": lambda progress: training.memory_probes(s["memory_spec"], recipes, device, "32-true", log=log),
        "inference": lambda progress: inference.inference_benchmark(s["inference"], recipes, device, compile_names,
                                                                    s["compile_top"], log=log, progress=progress),
        "accuracy": lambda progress: accuracy.accuracy_benchmark(s["accuracy"], recipes, device, s["accuracy_precision"],
                                                                 s["val_batches"], log=log, progress=progress),
        "finetune": lambda progress: finetune.finetune_benchmark(
            s["finetune"], device, s["accuracy_precision"], s["finetune_val_batches"], log=log, progress=progress,
            only=a.finetune_variants.split(",") if a.finetune_variants else None, earlier=earlier_finetune),
        "tasks": lambda progress: tasks.task_benchmark(s["tasks"], Q.QAT8da4w(group_size=32), [Q.PTQInt8WeightOnly()],
                                                       device, s["accuracy_precision"], log=log, progress=progress),
    }
    if "framework" in a.sections:  # the precision `lit-qft fit` uses by default on this machine
        from lit_qft.runtime import default_precision

        results["fit_default_precision"] = default_precision()
    if "inference" in a.sections:  # the setup `lit-qft generate` chooses by default on this machine
        from lit_qft.generate import choose_inference

        results["inference_default"] = choose_inference(device.type).describe()
    for section in SECTIONS:
        if section in a.sections:
            run_section(results, section, jobs[section], out, log)
    rates_end = measure.matmul_rate(device, torch.float32)
    results["matmul_flops_fp32_end"] = rates_end
    results["machine"]["load_average_end"] = measure.load_average()
    results["total_seconds"] = round(results.get("total_seconds", 0) + time.perf_counter() - t_start, 1)
    save(results, out)
    from benchmarks.report import write_report

    md = write_report(out)
    log(f"wrote {out} and {md} in {results['total_seconds'] / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
