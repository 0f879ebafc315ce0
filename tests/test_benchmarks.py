"""The benchmark suite: its measuring pieces on tiny models, the report, and a ``--quick`` run end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ``benchmarks`` is a folder of the repository, not an installed package

from benchmarks import measure, report  # noqa: E402

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64}


def test_discovery_finds_every_recipe_subclass_and_rejects_unknown_names():
    from lit_qft import quantization as Q

    recipes, skipped = measure.discover_recipes()
    names = {type(r).__name__ for r in recipes} | set(skipped)
    defined = {c.__name__ for c in vars(Q).values()  # concrete recipes: they define base_config
               if isinstance(c, type) and issubclass(c, Q.Recipe) and c.base_config is not Q.Recipe.base_config}
    assert defined <= names
    assert {"NoQuantization", "QAT8da4w", "PTQInt8WeightOnly"} <= {type(r).__name__ for r in recipes}
    only, _ = measure.discover_recipes(["QAT8da4w"])
    assert [type(r).__name__ for r in only] == ["QAT8da4w"]
    with pytest.raises(ValueError, match="--recipes"):
        measure.discover_recipes(["NoSuchRecipe"])


def test_flops_per_token_counts_tied_head_once_and_skips_position_embeddings(tiny_gpt2):
    params = sum(p.numel() for p in tiny_gpt2.parameters())  # parameters() already yields the tied weight once
    wpe = tiny_gpt2.transformer.wpe.weight.numel()
    assert measure.flops_per_token(tiny_gpt2, 32) == 6 * (params - wpe) + 12 * 2 * 64 * 32


def test_greedy_loop_matches_generate_and_quantized_variant_is_smaller(tiny_gpt2):
    from benchmarks.inference import InferSpec, Variant, build_variant, greedy
    from lit_qft import PTQInt8WeightOnly
    from lit_qft import quantization as Q

    prompt = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    _, _, tokens = greedy(tiny_gpt2, prompt, 6, None, "cpu")
    ref = tiny_gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[:, 10:]
    assert torch.equal(tokens, ref)

    spec = InferSpec(config_overrides=TINY)
    fp32 = build_variant(spec, Variant(None, "fp32"), 512, torch.device("cpu"))
    q = build_variant(spec, Variant(PTQInt8WeightOnly(), "fp32"), 512, torch.device("cpu"))
    assert len(Q.quantized_modules(q)) == 8 and not Q.quantized_modules(fp32)
    assert Q.model_size_bytes(q) < Q.model_size_bytes(fp32)


def test_cpu_peak_memory_window_sees_what_the_work_allocates():
    cpu = torch.device("cpu")
    measure.release(cpu)
    measure.reset_peak(cpu)
    baseline = measure.current_rss()
    big = torch.ones(200 * 2**20 // 4)  # 200 MiB, touched
    del big
    peak = measure.peak_above(cpu, baseline)
    assert 190 * 2**20 < peak < 300 * 2**20
    measure.reset_peak(cpu)  # a new window: the freed 200 MiB is returned and no longer counts
    baseline = measure.current_rss()
    small = torch.ones(20 * 2**20 // 4)
    assert 15 * 2**20 < measure.peak_above(cpu, baseline) < 60 * 2**20
    del small


def test_in_process_fits_are_freed_before_the_next_one(text_file):
    """A fitted module and its Trainer reference each other: ``release`` must free them (GPT-2 small
    leaked ~2 GB per in-process fit until the benchmark was killed for memory)."""
    import weakref

    from benchmarks.training import TrainSpec, _datamodule, lit_fit
    from lit_qft import QAT8da4w

    spec = TrainSpec(config_overrides=TINY, source=str(text_file), block_size=32, batch_size=4, warmup_steps=0, steps=1)
    module, res = lit_fit(spec, QAT8da4w(group_size=32), _datamodule(spec), torch.device("cpu"), "32-true")
    assert res["tokens_per_step"] == 4 * 32 and res["trainable_params"] == sum(p.numel() for p in module.parameters())
    ref = weakref.ref(module)
    del module
    measure.release()
    assert ref() is None


def test_child_process_result_and_its_own_peak_rss():
    base = measure.run_child(["-c", "from benchmarks.measure import emit; emit({})"], timeout=120)
    code = ("import torch; from benchmarks.measure import emit; x = torch.ones(256 * 2**20 // 4); x += 1; "
            "emit({'sum': float(x.sum())})")
    big = measure.run_child(["-c", code], timeout=120)
    assert big["sum"] == 2 * 64 * 2**20
    # the child's own high-water mark: the 256 MiB tensor shows, the parent's memory does not
    assert 200 * 2**20 < big["peak_rss_bytes"] - base["peak_rss_bytes"] < 400 * 2**20
    failed = measure.run_child(["-c", "raise SystemExit(3)"], timeout=60)
    assert failed["error"] == "exit status 3"


def _synthetic_results() -> dict:
    mib = 2**20
    infer = lambda recipe, dtype, mem, dec: {  # noqa: E731
        "variant": f"{recipe} {dtype}", "recipe": recipe, "dtype": dtype, "memory_bytes": mem, "disk_bytes": mem,
        "eager_b1": {"prefill_tokens_per_second": 100.0, "decode_tokens_per_second": dec},
        "compiled_b1": {"prefill_tokens_per_second": 200.0, "decode_tokens_per_second": 2 * dec,
                        "dynamo": {"unique_graphs": 2}}}
    return {
        "timestamp": "T", "settings": {"mode": "quick", "inference": {"batches": [1], "compile_batches": [1]},
                                       "train": {}},
        "machine": {"versions": {}}, "matmul_flops": {"fp32": 1e9, "bf16": 2e9},
        "qat_recipes": ["QAT8da4w"], "int4_weight_recipes": ["QAT8da4w"],
        "framework": [
            {"tool": "HF Trainer", "precision": "fp32", "step_seconds": 1.0, "tokens_per_second": 100.0, "flops_per_token": 1e6},
            {"tool": "lit-qft fit", "precision": "fp32", "step_seconds": 0.8, "tokens_per_second": 130.0, "flops_per_token": 1e6},
            {"tool": "lit-qft fit", "precision": "bf16", "step_seconds": 0.6, "tokens_per_second": 170.0, "flops_per_token": 1e6},
        ],
        "train": [
            {"recipe": "NoQuantization", "precision": "32-true", "step_seconds": 1.0, "tokens_per_second": 750.0,
             "flops_per_token": 1e6, "speed_vs_float": 1.0, "step_time_vs_float": 1.0},
            {"recipe": "QAT8da4w", "precision": "32-true", "step_seconds": 1.2, "tokens_per_second": 625.0,
             "flops_per_token": 1e6, "speed_vs_float": 1 / 1.2, "step_time_vs_float": 1.2},
        ],
        "inference": [infer("float", "fp32", 100 * mib, 10.0), infer("float", "bf16", 50 * mib, 20.0),
                      infer("PTQInt8WeightOnly", "bf16", 28 * mib, 35.0)],
        "accuracy": {"model": "m", "rows": [
            {"recipe": "float (fine-tuned)", "kind": "float", "ppl": 10.0, "memory_bytes": 100 * mib},
            {"recipe": "PTQInt8WeightOnly", "kind": "PTQ", "ppl": 10.1, "memory_bytes": 28 * mib},
            {"recipe": "QAT8da4w", "kind": "QAT", "ppl": 10.5, "ptq_same_target_ppl": 12.0, "recovered": 0.75,
             "degradation": 0.5, "ptq_degradation": 2.0, "memory_bytes": 40 * mib}]},
        "finetune": {"model": "m", "steps": 4, "tokens_per_step": 64, "precision": "32-true", "lora_rank": 8, "rows": [
            {"variant": "full-ft", "recipe": "PTQInt8WeightOnly", "trainable_params": 1000, "peak_rss_bytes": 900 * mib,
             "tokens_per_second": 100.0, "before_ppl": 20.0, "trained_ppl": 12.0, "final_ppl": 12.1},
            {"variant": "int8-lora", "recipe": "PTQInt8WeightOnly", "trainable_params": 20, "peak_rss_bytes": 500 * mib,
             "tokens_per_second": 150.0, "before_ppl": 20.2, "trained_ppl": 15.0, "final_ppl": 19.9,
             "adapter_bytes": 2 * mib},
            {"variant": "nf4-lora", "recipe": "PTQNF4WeightOnly", "error": "boom"}]},
        "tasks": [{"task": "sentiment", "model": "m", "steps": 4, "val_examples": 16, "metrics": ["acc", "f1"], "rows": [
            {"model": "float (fine-tuned)", "kind": "float", "acc": 0.8125, "f1": 0.8, "loss": 0.4, "memory_bytes": mib}]}],
    }


def test_report_targets_are_computed_from_the_numbers(tmp_path):
    res = _synthetic_results()
    t = {row["target"]: row for row in report.targets(res)}
    hf = t["default `lit-qft fit` (32-true here) vs HF Trainer script at its default fp32 (tokens/s)"]
    assert (hf["measured"], hf["met"]) == ("1.30x", True)
    # where bf16 is native, lit-qft's default is bf16-mixed and that is the row compared with HF's fp32
    bf16_default = {r["target"]: r for r in report.targets({**res, "fit_default_precision": "bf16-mixed"})}
    row = bf16_default["default `lit-qft fit` (bf16-mixed here) vs HF Trainer script at its default fp32 (tokens/s)"]
    assert (row["measured"], row["met"]) == ("1.70x", True)
    assert "`lit-qft fit` bf16-mixed vs HF Trainer default fp32" not in bf16_default
    mfu = t["float fp32 training step, share of measured fp32 matmul rate (MFU)"]
    assert (mfu["measured"], mfu["met"]) == ("75 %", True)
    qat = t["QAT8da4w step time vs float (32-true)"]
    assert (qat["measured"], qat["met"]) == ("1.20x", False)
    decode = t["quantized decode, batch 1, compiled: best variant vs fp32"]
    assert (decode["measured"], decode["met"]) == ("3.50x", True)
    assert t["quantized decode, batch 1, compiled: best variant vs bf16"]["measured"] == "1.75x"
    assert t["quantized weights, share of fp32 bytes (smallest variant)"]["measured"] == "28 %"
    recovered = "QAT8da4w: share of PTQ perplexity degradation QAT recovers (m)"
    assert (t[recovered]["measured"], t[recovered]["met"]) == ("75.0 %", None)  # quick mode: not a measurement
    assert "quick mode" in t[recovered]["note"]
    full = {**res, "settings": {**res["settings"], "mode": "full"}}
    assert {r["target"]: r for r in report.targets(full)}[recovered]["met"] is True
    tiny_gap = json.loads(json.dumps(full))
    tiny_gap["accuracy"]["rows"][2]["ptq_degradation"] = 0.01  # 0.1 % of the float perplexity: noise
    assert {r["target"]: r for r in report.targets(tiny_gap)}[recovered]["met"] is None

    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    md = report.write_report(path).read_text()
    assert "Quick mode" in md and "| PTQInt8WeightOnly bf16 | 28.0 | 28 % |" in md
    assert "| int8-lora | PTQInt8WeightOnly | 20 | 500.0 | — | 150 | 1.50x | 20.200 | 15.000 | 19.900 | — | 2.0 |" in md
    assert "| nf4-lora | PTQNF4WeightOnly | error: boom |" in md
    assert "## Task: sentiment" in md and "| float (fine-tuned) | float | 0.8125 | 0.8000 | 0.4000 | 1.0 |" in md
    for png in ("r_accuracy_vs_throughput.png", "r_size_vs_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_resume_adds_sections_to_an_earlier_run_of_the_same_mode(tmp_path):
    from benchmarks import run

    path = tmp_path / "full.json"
    path.write_text(json.dumps({"settings": {"mode": "full", "sections": ["train"], "command": "first"},
                                "machine": {}, "train": [{"recipe": "x"}]}))
    args = run.parse_args(["--resume", str(path), "--sections", "tasks,accuracy"])
    out, res = run.resume(args, {"tasks": ["spec"]}, "second", "T2", torch.device("cpu"))
    assert out == path and res["train"] == [{"recipe": "x"}]  # earlier sections kept
    assert res["settings"]["sections"] == ["train", "accuracy", "tasks"]  # in suite order
    assert res["settings"]["tasks"] == ["spec"] and res["resumed"][0]["sections"] == ["tasks", "accuracy"]
    with pytest.raises(SystemExit, match="full-mode run; add --quick"):
        run.resume(run.parse_args(["--quick", "--resume", str(path)]), {}, "c", "T3", torch.device("cpu"))
    with pytest.raises(SystemExit, match="no such result file"):
        run.resume(run.parse_args(["--resume", str(tmp_path / "nope.json")]), {}, "c", "T3", torch.device("cpu"))


def test_a_section_is_saved_row_by_row_and_a_stopped_one_is_marked(tmp_path):
    from benchmarks import run

    out = tmp_path / "r.json"
    results = {"settings": {"mode": "full"}, "machine": {}, "section_seconds": {}, "errors": {}}
    on_disk = []

    def stopped(progress):
        progress({"rows": [{"recipe": "float", "kind": "float", "ppl": 28.1}]})
        on_disk.append(json.loads(out.read_text()))  # what a kill at this moment would leave
        raise RuntimeError("killed")

    run.run_section(results, "accuracy", stopped, out, log=lambda m: None)
    assert on_disk[0]["accuracy"]["rows"][0]["ppl"] == 28.1 and on_disk[0]["incomplete"] == ["accuracy"]
    saved = json.loads(out.read_text())
    assert saved["accuracy"]["rows"] == [{"recipe": "float", "kind": "float", "ppl": 28.1}]
    assert saved["incomplete"] == ["accuracy"] and "RuntimeError: killed" in saved["errors"]["accuracy"]
    assert "Stopped inside section(s) accuracy" in report.markdown(saved, [])

    run.run_section(results, "accuracy", lambda progress: {"rows": [{"recipe": "float", "kind": "float", "ppl": 28.0}]}, out,
                    log=lambda m: None)  # redone (--resume): complete again
    saved = json.loads(out.read_text())
    assert saved["incomplete"] == [] and saved["errors"] == {} and saved["accuracy"]["rows"][0]["ppl"] == 28.0
    assert "Stopped inside" not in report.markdown(saved, [])


def test_auto_compile_picks_the_fastest_distinct_quantized_targets():
    from benchmarks.inference import compile_selection, variants
    from lit_qft import quantization as Q

    vl = variants([Q.NoQuantization(), Q.PTQInt8WeightOnly(), Q.PTQInt4WeightOnly(), Q.PTQNF4WeightOnly()],
                  dtypes=("fp32",))
    speed = {"PTQInt8WeightOnly": 6.1, "PTQInt4WeightOnly": 4.0, "PTQNF4WeightOnly": 1.3}
    # a head-policy twin is as fast as its default row: compiling it too would waste minutes on the same target
    rows = [{"variant": v.name, "eager_b1": {"decode_tokens_per_second": speed.get(type(v.recipe).__name__, 9.8)}}
            for v in vl]
    chosen = compile_selection(rows, vl, "auto", top=2, float_dtypes=("fp32",))
    assert [(type(v.recipe).__name__ if v.recipe else None, getattr(v.recipe, "embedding_policy", None))
            for v in chosen] == [(None, None), ("PTQInt8WeightOnly", "float"), ("PTQInt4WeightOnly", "float")]
    assert compile_selection(rows, vl, "none", 2) == [] and len(compile_selection(rows, vl, "all", 2)) == len(vl)


def test_finetune_reruns_only_the_named_variants_and_keeps_the_others(monkeypatch):
    from benchmarks import finetune
    from benchmarks.training import TrainSpec

    calls = []

    def fake_fit(spec, device, precision, recipe=None, lora=None, **kw):
        calls.append((type(recipe).__name__, lora is not None))
        return {"trainable_params": 10, "peak_rss_bytes": 2**30, "tokens_per_second": 50.0,
                "export": {"adapter_loss": 3.0, "base_loss": 4.0, "merged_loss": 3.1, "merged_through_float_layers": 8}}

    monkeypatch.setattr(finetune, "cli_fit", fake_fit)
    names = ["full-ft", "full-qat", "int8-lora", "nf4-lora", "qat-lora"]
    earlier = {"rows": [{"variant": n, "old": True} for n in names]}
    spec = TrainSpec(config_overrides=TINY)
    out = finetune.finetune_benchmark(spec, torch.device("cpu"), "32-true", 2, log=lambda m: None,
                                      only=["int8-lora"], earlier=earlier)
    assert calls == [("PTQInt8WeightOnly", True)]  # one fresh fit, for the named variant
    assert [r["variant"] for r in out["rows"]] == names  # suite order
    assert [r.get("old", False) for r in out["rows"]] == [True, True, False, True, True]
    new = out["rows"][2]
    assert new["final_loss"] == 3.1 and new["merged_through_float_layers"] == 8
    with pytest.raises(ValueError, match="--finetune-variants: unknown \\['int9-lora'\\]"):
        finetune.finetune_benchmark(spec, torch.device("cpu"), "32-true", 2, only=["int9-lora"])


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    """``python benchmarks/run.py --quick``: every section runs, nothing errors, the report and plots are written."""
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*-quick.json")
    res = json.loads(path.read_text())
    assert res["errors"] == {}
    assert {"NoQuantization", "QAT8da4w", "PTQInt8WeightOnly"} <= {r["name"] for r in res["recipes"]}
    for section in ("train", "framework", "memory"):
        assert res[section] and not [r for r in res[section] if "error" in r], section
    # a non-default head policy may not fit a recipe (NF4 blocks vs a 50257-row head): that is a finding, not a failure
    assert not [r for r in res["inference"] if "error" in r and r.get("embedding_policy") in (None, "float")]
    assert not [r for r in res["accuracy"]["rows"] if "error" in r]
    ft = {r["variant"]: r for r in res["finetune"]["rows"]}
    assert set(ft) == {"full-ft", "full-qat", "int8-lora", "nf4-lora", "qat-lora"}
    assert not [r for r in ft.values() if "error" in r], ft
    for name in ("int8-lora", "nf4-lora", "qat-lora"):  # adapters only, and the base's loss before training
        assert ft[name]["trainable_params"] < 0.2 * ft["full-ft"]["trainable_params"]
        assert ft[name]["before_loss"] is not None and ft[name]["adapter_bytes"] > 0
    assert all(r["final_loss"] is not None and r["peak_rss_bytes"] > 100 * 2**20 for r in ft.values())
    tasks = {t["task"]: t for t in res["tasks"]}
    assert set(tasks) == {"sentiment", "translation"}
    for t in tasks.values():
        kinds = [r["kind"] for r in t["rows"] if "error" not in r]
        assert kinds == ["float", "PTQ", "PTQ same target", "QAT trained", "QAT"], t["rows"]
        assert all(0 <= r[m] <= 100 for r in t["rows"] for m in t["metrics"])
    assert all(r["tokens_per_second"] > 0 for r in res["train"] + res["framework"])
    assert all(r["peak_rss_bytes"] > 100 * 2**20 for r in res["framework"] + res["memory"])
    eager = [r[k] for r in res["inference"] if "error" not in r for k in r if k.startswith("eager_b")]
    assert eager and all(e["peak_memory_bytes"] > 0 for e in eager)  # weights + cache + activations
    compiled = [r["compiled_b1"] for r in res["inference"] if "compiled_b1" in r]
    assert compiled and all(c["dynamo"]["unique_graphs"] >= 2 and "error" not in c for c in compiled)
    md = path.with_suffix(".md").read_text()
    assert "## Targets" in md and "HF Trainer" in md
    assert (tmp_path / f"{path.stem}_size_vs_accuracy.png").is_file()
