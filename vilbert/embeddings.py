"""Input embeddings for the text and visual streams."""
from __future__ import annotations

import torch
from torch import nn


class TextEmbeddings(nn.Module):
    """word + position + token type, LayerNorm, dropout (BERT). With `task_specific_tokens`
    (vilbert-multi-task) a task embedding is inserted right after [CLS]."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.task_embeddings = nn.Embedding(c.num_task_tokens, c.hidden_size) if c.task_specific_tokens else None
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        token_type_ids: torch.Tensor,  # (B, T)
        task_ids: torch.Tensor | None = None,  # (B, 1)
        extra: torch.Tensor | None = None,  # (B, T, D) or (B, 1, D), added before the LayerNorm
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        if extra is not None:
            x = x + extra
        if self.task_embeddings is not None:
            if task_ids is None:
                raise ValueError("this model has task-specific tokens: pass task_ids of shape (B, 1)")
            x = torch.cat([x[:, :1], self.task_embeddings(task_ids), x[:, 1:]], dim=1)  # (B, T+1, D)
        return self.dropout(self.norm(x))


class ImageEmbeddings(nn.Module):
    """Linear(region feature) + Linear(5-d location), LayerNorm, dropout.

    Position 0 of the visual sequence is the [IMG] token (mean region feature, location
    [0, 0, 1, 1, 1]); the data pipeline builds it, as the official ViLBERT code does.
    """

    def __init__(self, config, out_dim: int, with_norm: bool = True):
        super().__init__()
        self.feature_projection = nn.Linear(config.v_feature_size, out_dim)
        self.location_projection = nn.Linear(5, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=config.layer_norm_eps) if with_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # the official code uses the text rate

    def project(self, image_feat: torch.Tensor, image_loc: torch.Tensor) -> torch.Tensor:
        return self.feature_projection(image_feat) + self.location_projection(image_loc)  # (B, R, D)

    def forward(self, image_feat: torch.Tensor, image_loc: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.project(image_feat, image_loc)))
