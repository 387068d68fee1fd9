"""Looking at the attention: `LM.attention_maps` and `jaxlm attention`.

The kernels that train and decode (jaxlm/attention.py) keep no probabilities, so the maps come
from the reference path, run on demand beside the model's own forward, layer by layer
(model.Decoder.attention_maps): float32 [layers, heads, L, S] for one sequence, each query's
softmax over the keys it may see and exact zeros above the diagonal. Every query head has its
own map (with grouped-query attention several heads share keys, not maps), as transformers'
`output_attentions=True` gives them (with eager attention).

`jaxlm attention` draws them: one labelled heatmap (`--layer` and `--head`), or a grid of every
head of the chosen layers, with the token pieces on both axes (readable to about MAX_DRAWN
tokens; a longer text is cropped to its first MAX_DRAWN, with a note), and prints the mean
entropy (nats) of each head's query distributions, a table of layers x heads.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from jaxlm import sharding

MAX_DRAWN = 64


class MapsError(ValueError):
    """A request the maps cannot answer. One line naming the value."""


@functools.partial(jax.jit, static_argnums=0)
def _maps(graphdef, params, tokens_BL):
    return nnx.merge(graphdef, params).attention_maps(tokens_BL)


def _select(value, count: int, what: str) -> list[int]:
    chosen = list(range(count)) if value is None else [value] if isinstance(value, int) else list(value)
    bad = [i for i in chosen if not 0 <= int(i) < count]
    if bad or not chosen:
        raise MapsError(f"{what} {bad[0] if bad else chosen!r} is out of range: the model has "
                        f"{count} ({what}s 0..{count - 1})")
    return [int(i) for i in chosen]


def attention_maps(lm, tokens_or_text, layers=None, heads=None) -> np.ndarray:
    """float32 [layers, heads, L, S] for one sequence: a string (tokenized with BOS, as in
    training) or a list of token ids; `layers` / `heads`: an index or a list (default all)."""
    ids = lm.encode(tokens_or_text) if isinstance(tokens_or_text, str) else list(tokens_or_text)
    ids = lm._check_ids(ids, "the sequence")
    cfg = lm.config.model
    if not ids:
        raise MapsError("the sequence is empty")
    if len(ids) > cfg.max_seq_len:
        raise MapsError(f"the sequence has {len(ids)} tokens, more than model.max_seq_len "
                        f"({cfg.max_seq_len})")
    layer_ids = _select(layers, cfg.num_layers, "layer")
    head_ids = _select(heads, cfg.num_heads, "head")
    with jax.set_mesh(lm.mesh), sharding.logical_rules(lm.rules):
        maps = _maps(lm.graphdef, lm.params, np.asarray([ids], np.int32))
    return np.asarray(maps)[layer_ids][:, 0][:, head_ids]


def entropy(maps: np.ndarray) -> np.ndarray:
    """Mean entropy (nats) of each map's rows: [..., L, S] -> [...]."""
    p = np.asarray(maps, np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1).mean(-1)


def pieces(lm, ids: list[int]) -> list[str]:
    """Readable labels of the tokens: sentencepiece pieces (spaces as the piece's marker)."""
    tok = lm.tokenizer
    if tok is None:
        return [str(i) for i in ids]
    return [tok.sp.id_to_piece(int(i)).replace("\n", "\\n") for i in ids]


def draw(maps: np.ndarray, labels: list[str], layer_ids: list[int], head_ids: list[int],
         out: str, note: str = "") -> tuple[int, int]:
    """Write the heatmaps as a PNG: one map when one layer and head are given, else a grid of
    layers (rows) x heads (columns). Returns the image's (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = maps.shape[:2]
    single = n_rows == n_cols == 1
    size = 8.0 if single else 2.2
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols + 1, size * n_rows + 1),
                             squeeze=False)
    n = maps.shape[-1]
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            image = ax.imshow(maps[r, c], cmap="viridis", vmin=0.0, vmax=1.0,
                              interpolation="nearest")
            ax.set_title(f"layer {layer_ids[r]} head {head_ids[c]}", fontsize=9 if single else 7)
            if single:
                ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
                ax.set_yticks(range(n), labels, fontsize=7)
                ax.set_xlabel("key")
                ax.set_ylabel("query")
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    if single:
        fig.colorbar(image, ax=axes[0][0], fraction=0.046, pad=0.04)
    if note:
        fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    dpi = 100
    fig.savefig(out, dpi=dpi)
    width, height = (int(round(v * dpi)) for v in fig.get_size_inches())
    plt.close(fig)
    return width, height


def command(lm, text, layer: int | None, head: int | None, out: str | None) -> dict:
    """What `jaxlm attention` does for `text` (a string, or token ids): the maps, the entropy
    table's numbers, and the PNG when `out`."""
    if head is not None and layer is None:
        raise MapsError("--head needs --layer")
    ids = lm.encode(text) if isinstance(text, str) else list(text)
    layer_ids = _select(layer, lm.config.model.num_layers, "layer")
    head_ids = _select(None if layer is None else head, lm.config.model.num_heads, "head")
    maps = attention_maps(lm, ids, layer_ids, head_ids)
    result = {"tokens": ids, "pieces": pieces(lm, ids), "layers": layer_ids, "heads": head_ids,
              "entropy": entropy(maps).round(4).tolist()}
    if out:
        note = ""
        drawn = maps
        if len(ids) > MAX_DRAWN:
            drawn = maps[..., :MAX_DRAWN, :MAX_DRAWN]
            note = f"first {MAX_DRAWN} of {len(ids)} tokens"
        size = draw(drawn, result["pieces"][:MAX_DRAWN], layer_ids, head_ids, out, note)
        result |= {"out": out, "image_size": list(size), "cropped": bool(note)}
    result["maps"] = maps
    return result


def entropy_table(result: dict) -> str:
    """The entropy table as text: one row per layer, one column per head."""
    head = "layer " + " ".join(f"h{h:<5d}" for h in result["heads"])
    rows = [f"{layer:<5d} " + " ".join(f"{v:6.3f}" for v in values)
            for layer, values in zip(result["layers"], result["entropy"], strict=True)]
    return "mean attention entropy (nats) per head\n" + "\n".join([head, *rows])
