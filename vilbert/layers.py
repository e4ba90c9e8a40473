"""Transformer building blocks shared by both architectures.

Post-LayerNorm BERT blocks, attention through `F.scaled_dot_product_attention`. Masks are boolean
`(B, 1, 1, L_kv)` tensors, True where a key may be attended to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Queries from one sequence, keys and values from another (or the same: self-attention).

    Projects queries to `inner_dim` from `q_dim`, keys/values to `inner_dim` from `kv_dim`;
    returns the concatenated heads, (B, Lq, inner_dim), without an output projection.
    """

    def __init__(self, q_dim: int, kv_dim: int, inner_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(q_dim, inner_dim)
        self.key = nn.Linear(kv_dim, inner_dim)
        self.value = nn.Linear(kv_dim, inner_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, nh, L, hd)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x_q)), self._split(self.key(x_kv)), self._split(self.value(x_kv))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=kv_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, Lq, hd)
        B, nh, Lq, hd = out.shape
        return out.transpose(1, 2).reshape(B, Lq, nh * hd)


class ResidualProjection(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's `*Output` blocks."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.dense(x)) + residual)


class FeedForward(nn.Module):
    """intermediate (GELU) -> output projection with residual and LayerNorm."""

    def __init__(self, dim: int, inner_dim: int, dropout: float, eps: float):
        super().__init__()
        self.intermediate = nn.Linear(dim, inner_dim)
        self.output = ResidualProjection(inner_dim, dim, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(self.intermediate(x)), x)


class TransformerLayer(nn.Module):
    """A BERT encoder layer: self-attention + feed-forward, post-LayerNorm."""

    def __init__(self, dim: int, num_heads: int, inner_dim: int, dropout: float, attn_dropout: float, eps: float):
        super().__init__()
        self.attention = MultiHeadAttention(dim, dim, dim, num_heads, attn_dropout)
        self.attention_output = ResidualProjection(dim, dim, dropout, eps)
        self.ffn = FeedForward(dim, inner_dim, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention_output(self.attention(x, x, mask), x)  # (B, L, D)
        return self.ffn(x)


class CoAttentionLayer(nn.Module):
    """ViLBERT's co-attentional transformer layer.

    Two directions with separate weights: visual queries attend to text keys/values and text
    queries attend to visual keys/values, both in `bi_dim`; each result is projected back to its
    own stream's width with residual + LayerNorm, then each stream runs its own feed-forward.
    """

    def __init__(self, config):
        super().__init__()
        c, eps = config, config.layer_norm_eps
        # Dropout rates follow the official BertBiAttention (vision queries use the text rate).
        self.visual_attention = MultiHeadAttention(
            c.v_hidden_size, c.hidden_size, c.bi_hidden_size, c.bi_num_attention_heads, c.attention_probs_dropout_prob
        )
        self.text_attention = MultiHeadAttention(
            c.hidden_size, c.v_hidden_size, c.bi_hidden_size, c.bi_num_attention_heads, c.v_attention_probs_dropout_prob
        )
        self.visual_attention_output = ResidualProjection(
            c.bi_hidden_size, c.v_hidden_size, c.v_hidden_dropout_prob, eps
        )
        self.text_attention_output = ResidualProjection(c.bi_hidden_size, c.hidden_size, c.hidden_dropout_prob, eps)
        self.visual_ffn = FeedForward(c.v_hidden_size, c.v_intermediate_size, c.v_hidden_dropout_prob, eps)
        self.text_ffn = FeedForward(c.hidden_size, c.intermediate_size, c.hidden_dropout_prob, eps)

    def forward(
        self,
        image: torch.Tensor,  # (B, R, Dv)
        image_mask: torch.Tensor | None,  # (B, 1, 1, R)
        text: torch.Tensor,  # (B, T, Dt)
        text_mask: torch.Tensor | None,  # (B, 1, 1, T)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_ctx = self.visual_attention(image, text, text_mask)  # (B, R, Dbi)
        text_ctx = self.text_attention(text, image, image_mask)  # (B, T, Dbi)
        image = self.visual_attention_output(image_ctx, image)  # (B, R, Dv)
        text = self.text_attention_output(text_ctx, text)  # (B, T, Dt)
        return self.visual_ffn(image), self.text_ffn(text)


class Pooler(nn.Module):
    """First position -> Linear -> ReLU (the official ViLBERT poolers) or tanh (BERT's, VL-BERT's)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str = "relu"):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.activation = {"relu": F.relu, "tanh": torch.tanh}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x[:, 0]))  # (B, out_dim)


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) 1/0 or bool -> (B, 1, 1, L) bool for SDPA; None passes through."""
    if mask is None:
        return None
    return mask.bool()[:, None, None, :]
