"""Attention maps: equal to transformers' output_attentions (eager) on an imported HF Llama,
rows that sum to 1 with exact zeros where a query may not look, the PNG and the bad input."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxlm
from jaxlm import attention_maps

VOCAB = 97


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random HF Llama with grouped-query attention (8 heads over 2 kv heads, head_dim 8 x 8
    != hidden 48), saved and loaded into jaxlm."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=40,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager")).eval()
    directory = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(directory)
    return hf, jaxlm.load(directory)


def test_maps_equal_transformers_output_attentions(imported):
    hf, lm = imported
    ids = np.random.RandomState(0).randint(0, VOCAB, 19).tolist()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids]), output_attentions=True).attentions
    theirs = np.stack([a[0].numpy() for a in theirs])  # [layers, heads, L, S]
    ours = lm.attention_maps(ids)
    assert ours.shape == theirs.shape == (2, 8, 19, 19) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-6)
    assert (ours[..., np.triu_indices(19, 1)[0], np.triu_indices(19, 1)[1]] == 0).all()
    # Selecting layers and heads picks those maps.
    np.testing.assert_array_equal(lm.attention_maps(ids, layers=1, heads=[2, 5]), ours[1:, [2, 5]])


def test_no_attention_across_segments(imported):
    _, lm = imported
    net = nnx.merge(lm.graphdef, lm.params)
    tokens = np.random.RandomState(1).randint(0, VOCAB, (1, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    positions = np.array([list(range(5)) + list(range(7))], np.int32)
    maps = np.asarray(net.attention_maps(tokens, segments, positions))[:, 0]
    assert (maps[..., 5:, :5] == 0).all() and (maps[..., :5, 5:] == 0).all()
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-6)
    # The second document's maps are those of that document alone.
    alone = np.asarray(net.attention_maps(tokens[:, 5:]))[:, 0]
    np.testing.assert_allclose(maps[..., 5:, 5:], alone, atol=1e-6)


def test_png_grid_entropy_and_bad_input(imported, tmp_path):
    import matplotlib.image

    _, lm = imported
    ids = list(range(4, 24))
    out = str(tmp_path / "one.png")
    result = attention_maps.command(lm, ids, 1, 3, out)
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (result["image_size"][1], result["image_size"][0])
    assert result["layers"] == [1] and result["heads"] == [3] and not result["cropped"]
    maps = lm.attention_maps(ids, layers=1, heads=3)
    p = maps.astype(np.float64)[0, 0]
    want = np.mean([-sum(x * np.log(x) for x in row if x > 0) for row in p])
    np.testing.assert_allclose(result["entropy"], [[want]], atol=1e-4)
    grid = attention_maps.command(lm, ids, None, None, str(tmp_path / "grid.png"))
    assert np.asarray(grid["entropy"]).shape == (2, 8) and grid["maps"].shape == (2, 8, 20, 20)
    table = attention_maps.entropy_table(grid).splitlines()
    assert len(table) == 2 + 2 and table[1].split()[1:] == [f"h{h}" for h in range(8)]

    with pytest.raises(attention_maps.MapsError, match="layer 2 is out of range: the model has 2"):
        lm.attention_maps(ids, layers=2)
    with pytest.raises(attention_maps.MapsError, match="41 tokens, more than model.max_seq_len"):
        lm.attention_maps(list(range(41)))
    with pytest.raises(attention_maps.MapsError, match="--head needs --layer"):
        attention_maps.command(lm, ids, None, 1, None)
