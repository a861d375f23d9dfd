"""A byte-level causal transformer LM, small enough to train for a few steps on a CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLM", "lm_loss"]

VOCAB = 256  # bytes


class TinyLM(nn.Module):
    """Pre-norm transformer encoder layers under a causal mask, over byte tokens.

    Args:
        context: longest sequence (learned positions are kept for this many tokens).
        width: model width; ``layers`` transformer layers with ``heads`` attention heads and a
            ``4 * width`` MLP.
    """

    def __init__(self, context: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n, 256]`` for the next byte after each of ``tokens [batch, n]``."""
        n = tokens.shape[1]
        x = self.embed(tokens) + self.position[:n]
        x = self.blocks(x, mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``model`` on inputs ``x`` and targets ``y``."""
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
