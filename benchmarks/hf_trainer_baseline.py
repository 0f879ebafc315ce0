"""The plain Hugging Face training script lit-qft is compared against: AutoModelForCausalLM + TrainingArguments + Trainer.

This is the standard causal-LM recipe (as in transformers' ``run_clm.py``): tokenize a text file with
``datasets``, concatenate and cut into ``block_size`` blocks (``group_texts``), labels = inputs,
``Trainer`` with its defaults (fused AdamW, gradient clipping at 1.0), the same cosine schedule as lit-qft,
``bf16=True`` for mixed precision. Nothing is tuned: no allocator settings, no compile. Two things
differ from a hub run only because this machine is offline: the tokenizer and the text come from
lit-qft's offline assets (the real GPT-2 BPE, the World English Bible).

Run alone::

    python benchmarks/hf_trainer_baseline.py --config-overrides '{"n_layer": 2, "n_embd": 128, "n_head": 4}' \
        --max-steps 20 --bf16

It prints the median step time and tokens/s (and, for ``benchmarks/run.py``, one result line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``lit_qft`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import allocator_peak, emit, flops_per_token, median, sync  # noqa: E402


def load_blocks(text_path: str, tokenizer, block_size: int, max_documents: int | None, seed: int = 42):
    """run_clm.py's data pipeline: non-empty lines, shuffled, tokenized, concatenated, cut into blocks."""
    raw = load_dataset("text", data_files=text_path, split="train")
    raw = raw.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True).shuffle(seed=seed)
    if max_documents:
        raw = raw.select(range(min(max_documents, len(raw))))
    eos = tokenizer.eos_token_id
    tokenized = raw.map(lambda b: {"input_ids": [ids + [eos] for ids in tokenizer(b["text"])["input_ids"]]},
                        batched=True, remove_columns=["text"])

    def group_texts(examples):
        ids = list(chain(*examples["input_ids"]))
        total = (len(ids) // block_size) * block_size
        blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [b[:] for b in blocks]}

    return tokenized.map(group_texts, batched=True, batch_size=1000)


class StepTimes(TrainerCallback):
    """Wall time between consecutive optimizer steps (device synchronized), as lit-qft's StepTimer."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.model = model
        sync(self.device)
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kw):
        sync(self.device)
        self.stamps.append(time.perf_counter())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--architecture", default="gpt2", help="model type built from config")
    p.add_argument("--config-overrides", default="{}", help="JSON dict of config fields (n_layer, n_embd, ...)")
    p.add_argument("--pretrained", default=None, help="folder or lit-qft built-in name (smollm2-135m) instead of a config")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--source", default="web-english", help="built-in corpus name or .txt file")
    p.add_argument("--max-documents", type=int, default=4000)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--timing-warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): mixed precision")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)

    from lit_qft.assets import load_tokenizer
    from lit_qft.data.language_modeling import resolve_text_source
    from lit_qft.models import resolve_pretrained

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tokenizer = load_tokenizer(a.tokenizer)
    if a.pretrained:
        model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(a.pretrained), dtype=torch.float32)
    else:
        config = AutoConfig.for_model(a.architecture, vocab_size=len(tokenizer), **json.loads(a.config_overrides))
        torch.manual_seed(a.seed)
        model = AutoModelForCausalLM.from_config(config)
    train = load_blocks(str(resolve_text_source(a.source)), tokenizer, a.block_size, a.max_documents)

    timer = StepTimes(device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.max_steps,
            learning_rate=a.learning_rate, weight_decay=a.weight_decay, lr_scheduler_type="cosine",
            warmup_steps=0.05, bf16=a.bf16, use_cpu=device == "cpu", seed=a.seed, report_to="none",
            save_strategy="no", logging_steps=50, disable_tqdm=True,
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                callbacks=[timer]).train()
    steps = [b - a_ for a_, b in zip(timer.stamps, timer.stamps[1:])]
    step = median(steps[a.timing_warmup:] or steps)
    tokens = a.batch_size * a.block_size
    result = {
        "step_seconds": step, "step_seconds_all": [round(s, 4) for s in steps], "tokens_per_step": tokens,
        "tokens_per_second": tokens / step, "flops_per_token": flops_per_token(model, a.block_size),
        "allocator_peak_bytes": allocator_peak(device), "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    print(f"HF Trainer: {result['tokens_per_second']:.0f} tokens/s, {step * 1000:.0f} ms/step "
          f"(median of {len(steps[a.timing_warmup:])} steps)")
    emit(result)
    return result


if __name__ == "__main__":
    main()
