"""Text models: next-token classifiers on sequences of token ids.

Inputs are ``[B, L]`` token ids. The data pool stores every feature as float32, so the ids
arrive as exact float values (int32 is accepted too) and are rounded to int32 in the model;
ids outside ``[0, vocab_size)`` are clipped to it. The output is one row of logits per
sequence, for the token after it, so the engine's loss (softmax cross-entropy on one integer
label per example) applies unchanged. No Python-side state: the recurrence is a
``flax.linen.RNN`` scan, which traces once and vmaps over clients like any other module.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fedrnd.models._core import _positive, _widths, register_model

__all__ = ["CharRNN"]

_CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class CharRNN(nn.Module):
    """Embedding -> stacked recurrent layers -> dense on the last step (LEAF's Shakespeare
    model: embedding 8, two LSTM layers of 256, a dense layer to the vocabulary)."""

    num_classes: int
    vocab_size: int
    embed: int = 8
    hidden: Sequence[int] = (256, 256)
    cell: str = "lstm"

    @nn.compact
    def __call__(self, x):
        if x.ndim != 2:
            raise ValueError(f"char_lstm takes sequences of token ids [B, L], got inputs of "
                             f"shape {tuple(x.shape)} (feature shape {tuple(x.shape[1:])}); "
                             "use a text data set such as shakespeare")
        tokens = jnp.clip(jnp.round(x).astype(jnp.int32), 0, self.vocab_size - 1)
        h = nn.Embed(self.vocab_size, self.embed)(tokens)
        for width in self.hidden:
            h = nn.RNN(_CELLS[self.cell](width))(h)
        return nn.Dense(self.num_classes)(h[:, -1])


def _char_lstm(num_classes: int, embed: int = 8, hidden: int | Sequence[int] = (256, 256),
               cell: str = "lstm", vocab_size: int | None = None) -> nn.Module:
    """Character model for next-token prediction on token ids ``[B, L]`` (e.g. LEAF
    Shakespeare): an embedding of width ``embed``, one recurrent layer per entry of
    ``hidden`` (``cell``: ``"lstm"`` or ``"gru"``), a dense layer on the last step.
    ``vocab_size``: number of input ids (default ``num_classes``: inputs and targets share a
    vocabulary). Defaults as in LEAF's Shakespeare baseline (8, two LSTM layers of 256)."""
    widths = _widths("hidden", hidden)
    if not widths:
        raise ValueError("hidden must list at least one recurrent layer width, got []")
    if cell not in _CELLS:
        raise ValueError(f"cell must be one of {', '.join(map(repr, _CELLS))}, got {cell!r}")
    vocab = num_classes if vocab_size is None else _positive("vocab_size", vocab_size)
    return CharRNN(num_classes, vocab, _positive("embed", embed), widths, cell)


register_model("char_lstm", _char_lstm)
