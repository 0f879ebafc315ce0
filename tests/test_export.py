"""Every recipe on both model families: prepare, train a few steps, convert, save, reload in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import TINY_GPT2, TINY_LLAMA
from lit_qft import quantization as Q
from lit_qft.assets import load_tokenizer
from lit_qft.export import RECIPE_FILE, WEIGHTS_FILE, load_quantized, save_quantized

RECIPES = {
    "QAT8da4w": Q.QAT8da4w(group_size=32),
    "QATInt4WeightOnly": Q.QATInt4WeightOnly(group_size=16),
    "QATInt8WeightOnly": Q.QATInt8WeightOnly(),
    "QATIntxWeightOnly-3bit-channel": Q.QATIntxWeightOnly(bits=3),
    "QATIntxWeightOnly-2bit-g32-learned": Q.QATIntxWeightOnly(bits=2, group_size=32, range_learning=True),
    "PTQInt8WeightOnly": Q.PTQInt8WeightOnly(),
    "PTQInt8DynamicActivationInt8Weight": Q.PTQInt8DynamicActivationInt8Weight(),
    "PTQInt4WeightOnly": Q.PTQInt4WeightOnly(group_size=32),
    "PTQIntxWeightOnly-5bit": Q.PTQIntxWeightOnly(bits=5, group_size=16),
    "QAT8da4w-quantize_embedding": Q.QAT8da4w(embedding_policy="quantize_embedding"),
    "PTQInt8WeightOnly-quantize_embedding": Q.PTQInt8WeightOnly(embedding_policy="quantize_embedding"),
    "QATInt8WeightOnly-untie_head": Q.QATInt8WeightOnly(embedding_policy="untie_head"),
}
FAMILIES = ("gpt2", "llama")
GPT2_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_LINEARS = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


def build(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=512, **TINY_GPT2))
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, tie_word_embeddings=True, **TINY_LLAMA))


def expected_quantized(family: str, recipe: Q.Recipe) -> list[str]:
    if family == "gpt2":
        names = [f"transformer.h.{i}.{p}" for i in range(2) for p in GPT2_LINEARS]
        embedding = "transformer.wte"
    else:
        names = [f"model.layers.{i}.{p}" for i in range(2) for p in LLAMA_LINEARS]
        embedding = "model.embed_tokens"
    if recipe.embedding_policy != "float":
        names.append("lm_head")
    if recipe.embedding_policy == "quantize_embedding":
        names.append(embedding)
    return sorted(names)


def train_a_few_steps(model, steps: int = 2) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 512, (2, 16), generator=gen)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


IDS = torch.arange(40).reshape(2, 20) * 7 % 512

RELOAD_SCRIPT = """
import json, sys, torch
from lit_qft.export import load_quantized
from lit_qft.quantization import quantized_modules
cases, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), {}
torch.set_num_threads(int(sys.argv[4]))  # same as the parent: bitwise-equal logits are expected
for name, folder in cases.items():
    model, _, recipe = load_quantized(folder)
    with torch.no_grad():
        out[name] = {"logits": model(ids).logits, "quantized": sorted(quantized_modules(model)),
                     "recipe": type(recipe).__name__,
                     "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight}
torch.save(out, sys.argv[3])
"""


#: The default run covers each recipe kind and embedding policy on one family; ``-m slow`` runs all pairs.
FAST = (("gpt2", "QAT8da4w-quantize_embedding"), ("llama", "QATIntxWeightOnly-2bit-g32-learned"),
        ("gpt2", "PTQInt4WeightOnly"), ("llama", "PTQInt8DynamicActivationInt8Weight"),
        ("llama", "QATInt8WeightOnly-untie_head"))
ALL = tuple((family, rname) for family in FAMILIES for rname in RECIPES)


def export_and_reload(root, pairs):
    """Each (family, recipe) trained, converted and saved; reloaded all at once in one fresh process."""
    tokenizer = load_tokenizer("gpt2")
    cases, expected = {}, {}
    for family, rname in pairs:
        recipe, name = RECIPES[rname], f"{family}-{rname}"
        model = build(family)
        Q.prepare(model, recipe)
        loss = train_a_few_steps(model)
        Q.convert(model, recipe)
        model.eval()
        with torch.no_grad():
            logits = model(IDS).logits
        folder = save_quantized(model, tokenizer, recipe, root / name)
        cases[name] = str(folder)
        expected[name] = {"loss": loss, "logits": logits, "quantized": sorted(Q.quantized_modules(model)),
                          "recipe": type(recipe).__name__, "weights_bytes": (folder / WEIGHTS_FILE).stat().st_size}
    out = root / "reloaded.pt"
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(cases), json.dumps(IDS.tolist()), str(out),
         str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return expected, torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def exported_fast(tmp_path_factory):
    return export_and_reload(tmp_path_factory.mktemp("export"), FAST)


@pytest.fixture(scope="module")
def exported_all(tmp_path_factory):
    return export_and_reload(tmp_path_factory.mktemp("export_all"), ALL)


def check_round_trip(exported, family: str, rname: str) -> None:
    expected, reloaded = exported
    name, recipe = f"{family}-{rname}", RECIPES[rname]
    mine, theirs = expected[name], reloaded[name]
    assert torch.isfinite(torch.tensor(mine["loss"]))
    assert mine["quantized"] == expected_quantized(family, recipe)  # every target layer, nothing else
    assert theirs["quantized"] == mine["quantized"]
    assert theirs["recipe"] == mine["recipe"]
    torch.testing.assert_close(theirs["logits"], mine["logits"], rtol=0, atol=0)
    assert torch.isfinite(theirs["logits"]).all()
    # a tied head stays tied (float or sharing the quantized table); untie_head really unties it
    assert theirs["tied"] == (recipe.embedding_policy != "untie_head")


@pytest.mark.parametrize("family,rname", FAST, ids=lambda x: x)
def test_recipe_trains_converts_and_reloads_in_a_fresh_process(exported_fast, family, rname):
    check_round_trip(exported_fast, family, rname)


@pytest.mark.slow
@pytest.mark.parametrize("family,rname", ALL, ids=lambda x: x)
def test_every_recipe_and_family_round_trips(exported_all, family, rname):
    check_round_trip(exported_all, family, rname)


def test_quantized_embedding_is_small_on_disk(tmp_path):
    """Quantizing the embedding once and sharing it with the head: weights file ~30% of fp32 on disk."""
    for family in FAMILIES:
        sizes = {}
        for policy in ("float", "untie_head", "quantize_embedding"):
            recipe = Q.PTQInt8WeightOnly(embedding_policy=policy)
            model = Q.convert(Q.prepare(build(family), recipe), recipe)
            torch.save(model.state_dict(), tmp_path / "q.pt")
            sizes[policy] = (tmp_path / "q.pt").stat().st_size
        torch.save(build(family).state_dict(), tmp_path / "f.pt")
        float_bytes = (tmp_path / "f.pt").stat().st_size
        assert sizes["quantize_embedding"] < 0.36 * float_bytes, (family, sizes, float_bytes)
        assert sizes["quantize_embedding"] < sizes["float"] < float_bytes
        assert sizes["untie_head"] > sizes["float"]  # the untied head adds an int8 copy next to the float table


def _storage_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__"):
        return sum(_storage_bytes(getattr(t, a)) for a in t.__tensor_flatten__()[0])
    return t.untyped_storage().nbytes()


def test_shared_table_is_counted_once(tiny_gpt2):
    recipe = Q.PTQInt8WeightOnly(embedding_policy="quantize_embedding")
    Q.prepare(tiny_gpt2, recipe)
    Q.convert(tiny_gpt2, recipe)
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    every_name = [p for _, p in tiny_gpt2.named_parameters(remove_duplicate=False)] + list(tiny_gpt2.buffers())
    naive = sum(_storage_bytes(t) for t in every_name)  # counts the shared table twice
    assert Q.model_size_bytes(tiny_gpt2) == naive - _storage_bytes(tiny_gpt2.transformer.wte.weight)


def test_load_rejects_a_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lit_qft_quantization.json"):
        load_quantized(tmp_path)


# ------------------------------------------------------------------ recipe file vs weights
@pytest.fixture
def int8_folder(tmp_path, tiny_gpt2):
    recipe = Q.PTQInt8WeightOnly()
    Q.convert(Q.prepare(tiny_gpt2, recipe), recipe)
    with torch.no_grad():
        logits = tiny_gpt2(IDS).logits
    return save_quantized(tiny_gpt2, load_tokenizer("gpt2"), recipe, tmp_path / "int8"), logits


def _load_logits(folder):
    model, _, recipe = load_quantized(folder)
    with torch.no_grad():
        return model(IDS).logits, recipe


@pytest.mark.parametrize("class_path", ["lit_qft.quantization.PTQInt8WeightOnly", "lit_qft.PTQInt8WeightOnly",
                                        "lit_qft.quantization.recipes.PTQInt8WeightOnly"])
def test_recipe_file_loads_under_every_class_path_of_the_recipe(int8_folder, class_path):
    folder, logits = int8_folder
    spec = json.loads((folder / RECIPE_FILE).read_text())
    assert spec["class_path"] == "lit_qft.quantization.PTQInt8WeightOnly"  # what files written so far say
    (folder / RECIPE_FILE).write_text(json.dumps({**spec, "class_path": class_path}))
    loaded, recipe = _load_logits(folder)
    assert type(recipe) is Q.PTQInt8WeightOnly
    torch.testing.assert_close(loaded, logits, rtol=0, atol=0)


@pytest.mark.parametrize("tampered, found, wanted", [
    ({"class_path": "lit_qft.quantization.NoQuantization"}, "is Int8Tensor", "makes plain tensor"),
    ({"class_path": "lit_qft.PTQIntxWeightOnly", "init_args": {"bits": 8}}, "is Int8Tensor", "makes IntxUnpackedToInt8Tensor"),
    ({"class_path": "lit_qft.PTQInt8DynamicActivationInt8Weight"}, "act_quant_kwargs=None", "act_quant_kwargs=QuantizeTensorToInt8Kwargs"),
    ({"class_path": "lit_qft.PTQInt8WeightOnly", "init_args": {"skip": [r"h\.0\."]}}, "h.0.attn.c_attn.weight is Int8Tensor", "makes plain tensor"),
])
def test_recipe_file_that_does_not_match_the_weights_is_a_one_line_error(int8_folder, tampered, found, wanted):
    folder, logits = int8_folder
    original = (folder / RECIPE_FILE).read_text()
    (folder / RECIPE_FILE).write_text(json.dumps(tampered))
    with pytest.raises(ValueError) as e:
        load_quantized(folder)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{folder}: {RECIPE_FILE} names ")
    assert found in message and wanted in message and "lit-qft convert" in message
    (folder / RECIPE_FILE).write_text(original)  # put back: loads again, bit-identical
    torch.testing.assert_close(_load_logits(folder)[0], logits, rtol=0, atol=0)


def test_float_weights_under_a_quantized_recipe_file_are_refused(tmp_path, tiny_gpt2):
    Q.prepare(tiny_gpt2, Q.NoQuantization())  # Conv1D -> Linear, as an export does
    folder = save_quantized(tiny_gpt2, load_tokenizer("gpt2"), Q.NoQuantization(), tmp_path / "float")
    (folder / RECIPE_FILE).write_text(json.dumps({"class_path": "lit_qft.quantization.PTQInt8WeightOnly"}))
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.weight is plain tensor where the recipe makes Int8Tensor"):
        load_quantized(folder)
