"""A byte-level causal transformer LM, small enough to train for a few steps on a CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLM", "lm_loss", "lm_losses"]

VOCAB = 256  # bytes


class Layer(nn.Module):
    """A pre-norm transformer layer. Every matrix is an ``nn.Linear`` called as a module (unlike
    ``nn.MultiheadAttention``, which calls its weights functionally), so module hooks see every
    matrix product — per-example gradient norms (:mod:`sparse_grad.data`) rely on that."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.attn_qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, width = x.shape
        q, k, v = self.attn_qkv(self.attn_norm(x)).view(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, n, width))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


class TinyLM(nn.Module):
    """Pre-norm causal transformer over byte tokens.

    Args:
        context: longest sequence (learned positions are kept for this many tokens).
        width: model width; ``layers`` transformer layers with ``heads`` attention heads and a
            ``4 * width`` MLP.
    """

    def __init__(self, context: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.layers = nn.ModuleList(Layer(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n, 256]`` for the next byte after each of ``tokens [batch, n]``."""
        n = tokens.shape[1]
        if n > self.context:
            raise ValueError(f"tokens has {n} positions, more than the model's context ({self.context})")
        x = self.embed(tokens) + self.position[:n]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``model`` on inputs ``x`` and targets ``y``."""
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def lm_losses(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-example losses ``[batch]``: each window's mean next-byte cross-entropy (the form
    :mod:`sparse_grad.data` scores examples by)."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
