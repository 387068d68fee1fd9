"""The HF export of jaxlm's tokenizer, checked with transformers' own loaders: AutoTokenizer
gives sentencepiece's ids on mixed text and on real files (a wrong merge order fails there) and
decodes them back; a full `LM.save_hf` directory loads in AutoModelForCausalLM with jaxlm's
special ids and logits; `jaxlm export` writes it from the command line."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never ask the Hub

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

import jaxlm
from jaxlm import api, cli, config, datasets, hf_tokenizer, model, tokenizer

VOCAB = 4096  # large enough for long merge chains (runs of 16 spaces, "self", "return")

# Indentation, tabs, blank lines, runs of spaces, digits, characters sentencepiece has no piece
# for (byte fallback), a leading and trailing space, and control pieces' names as plain text.
MIXED = (
    "  def f(x):\n    if x > 10:\n\treturn x  # tab-indented\n"
    "    y = [1, 22, 333, 4444, 3.14e-10]   \n\n\n"
    "        s = 'café naïve Ærø, 日本語のテキスト, 🙂🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢'\n"
    "  two  spaces,\u00a0nbsp,\u3000ideographic space, \r\n\x0c\x00 trailing\t\t "
    "literal pieces: <s> </s> <pad> <unk> <0x41> end "
)
RUNS = "".join(c * n + "x" for n in range(1, 40) for c in " =#-\t\n")  # long merge chains


def stdlib_texts(files: list[str]) -> list[str]:
    root = datasets.stdlib_root()
    out = []
    for name in files:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return out


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    """A tokenizer trained as jaxlm trains them, on half of the stdlib's files."""
    files = datasets.stdlib_files(datasets.stdlib_root())[0::2][:200]
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    return tokenizer.train(stdlib_texts(files), VOCAB, path, sample_bytes=2_000_000)


@pytest.fixture(scope="module")
def tokenizers(sp_path, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf_tok"))
    hf_tokenizer.write(sp_path, directory, model_max_length=1 << 20)
    return tokenizer.Tokenizer(sp_path), transformers.AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("text", [MIXED, RUNS, "", " ", "x"], ids=["mixed", "runs", "empty",
                                                                   "space", "x"])
def test_ids_and_decoding_equal_sentencepiece(tokenizers, text):
    ours, hf = tokenizers
    ids = ours.encode(text).tolist()
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf(text)["input_ids"] == [2] + ids
    assert hf.decode(ids) == ours.decode(ids) == text
    assert hf.decode([2, *ids, 3], skip_special_tokens=True) == text
    if text == MIXED:  # the emoji, CJK and fraktur letters went through byte pieces
        assert sum(ours.sp.is_byte(i) for i in ids) > 20


def test_ids_equal_sentencepiece_on_stdlib_files(tokenizers):
    """Every id of 50 files, most not seen in training: one merge ranked wrongly shifts ids."""
    ours, hf = tokenizers
    files = datasets.stdlib_files(datasets.stdlib_root())
    files = files[1::len(files) // 50][:50]  # spread over the stdlib, whatever its size
    texts = stdlib_texts(files)
    assert len(texts) == 50
    got = hf(texts, add_special_tokens=False)["input_ids"]
    total = 0
    for name, text, ids in zip(files, texts, got, strict=True):
        want = ours.encode(text).tolist()
        assert ids == want, name
        total += len(want)
    assert total > 100_000
    assert hf.batch_decode(got) == texts


def test_special_tokens_and_loaded_as_written(tokenizers):
    _, hf = tokenizers
    assert type(hf).__name__ == "TokenizersBackend"
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert hf.convert_ids_to_tokens([0, 1, 2, 3, 4, 5]) == ["<pad>", "<unk>", "<s>", "</s>", "\n", "\t"]
    backend = json.loads(hf.backend_tokenizer.to_str())  # ours, not re-converted from tokenizer.model
    assert backend["normalizer"]["type"] == "Replace" and backend["pre_tokenizer"] is None
    assert backend["model"]["byte_fallback"] and backend["decoder"]["type"] == "Sequence"


def test_a_model_it_cannot_express_is_refused(sp_path, tmp_path):
    proto = sp_pb2.ModelProto()
    with open(sp_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.normalizer_spec.add_dummy_prefix = True
    path = tmp_path / "llama_style.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(tokenizer.TokenizerError, match="add_dummy_prefix=True") as e:
        hf_tokenizer.write(str(path), str(tmp_path / "out"))
    assert "\n" not in str(e.value)


def random_params(cfg, seed: int = 0) -> dict:
    """Random weights of the model's shapes, without compiling model.init (slow on a busy CPU)."""
    _, abstract = nnx.split(model.abstract(cfg.model), nnx.Param)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(x.dtype),
                        nnx.to_pure_dict(abstract))


@pytest.fixture(scope="module")
def saved(sp_path, tmp_path_factory):
    cfg = config.from_dict({
        "model": {"vocab_size": VOCAB, "d_model": 32, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": 64},
        "data": {"seq_len": 32},
    })
    lm = api.from_params(cfg, random_params(cfg), tokenizer_path=sp_path)
    directory = str(tmp_path_factory.mktemp("hf_lm"))
    lm.save_hf(directory)
    return lm, directory


@pytest.mark.slow
def test_save_hf_directory_loads_in_transformers(saved):
    lm, directory = saved
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= set(os.listdir(directory))
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    for ids in (hf.generation_config, hf.config,
                transformers.GenerationConfig.from_pretrained(directory)):
        assert (ids.bos_token_id, ids.eos_token_id, ids.pad_token_id) == (2, 3, 0)
    text = "def f(x):\n\treturn x + 1  # é\n"
    tokens = hf_tok(text, return_tensors="pt")["input_ids"]
    assert tokens[0].tolist() == lm.encode(text)
    with torch.no_grad():
        theirs = hf(tokens).logits.numpy()
    assert theirs.std() > 0.1  # weights large enough that a wrong id or layout shows
    np.testing.assert_allclose(theirs, np.asarray(lm.logits(tokens.numpy())), atol=1e-4, rtol=0)
    again = jaxlm.load(directory)  # and jaxlm reads its own export back, tokenizer included
    assert again.eos_ids == [3] and again.encode(text) == lm.encode(text)


def test_several_eos_ids_are_a_list(saved, tmp_path):
    lm, _ = saved
    api.from_params(lm.config, random_params(lm.config), tokenizer_path=lm.tokenizer_path,
                    eos_ids=[3, 4]).save_hf(str(tmp_path))
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert generation.eos_token_id == [3, 4] and jaxlm.load(str(tmp_path)).eos_ids == [3, 4]


@pytest.mark.slow
def test_cli_export(saved, tmp_path, capsys):
    lm, directory = saved
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "export", f"--model={directory}",
                           "--format=hf", f"--out={out}", "--dtype=bfloat16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["format"] == "hf" and result["out"] == str(out)
    assert result["files"] == sorted(os.listdir(out)) and "tokenizer.json" in result["files"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(MIXED, add_special_tokens=False)["input_ids"] == lm.tokenizer.encode(MIXED).tolist()

    code = cli.main(["jaxlm", "export", f"--model={directory}", "--format=gguf", f"--out={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["jaxlm: error: --format: unknown format 'gguf'; valid: hf, peft"]
    code = cli.main(["jaxlm", "export", f"--model={directory}", "--format=peft", f"--out={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["jaxlm: error: --format=peft exports a LoRA run: pass --workdir=DIR"]
