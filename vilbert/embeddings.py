"""Input embeddings: ViLBERT's text and visual streams, VL-BERT's single sequence."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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

    def __init__(self, config, out_dim: int):
        super().__init__()
        self.feature_projection = nn.Linear(config.v_feature_size, out_dim)
        self.location_projection = nn.Linear(5, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)  # the official code uses the text rate

    def forward(self, image_feat: torch.Tensor, image_loc: torch.Tensor) -> torch.Tensor:
        x = self.feature_projection(image_feat) + self.location_projection(image_loc)  # (B, R, D)
        return self.dropout(self.norm(x))


# ---- VL-BERT ------------------------------------------------------------------------------------

def box_geometry_embedding(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """VL-BERT's geometry embedding: boxes (..., 4) as x1, y1, x2, y2 in fractions of the image ->
    (..., 4 * 2 * dim). Centre x, centre y, width and height in percent of the image, each through
    sin and cos at `dim` wavelengths 1000^(k/dim); per coordinate its sines, then its cosines."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    geometry = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) * 100  # (..., 4)
    wavelengths = 1000 ** (torch.arange(dim, dtype=boxes.dtype, device=boxes.device) / dim)  # (dim,)
    angles = geometry[..., None] / wavelengths  # (..., 4, dim)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., 8 * dim)


class RegionEmbedding(nn.Module):
    """A region's visual feature embedding: [geometry embedding ; appearance feature] -> dropout ->
    Linear -> ReLU (VL-BERT's projection of precomputed detector features)."""

    def __init__(self, feature_size: int, geometry_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.geometry_dim = geometry_dim
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(4 * 2 * geometry_dim + feature_size, out_dim)

    def forward(self, image_feat: torch.Tensor, image_loc: torch.Tensor) -> torch.Tensor:
        geometry = box_geometry_embedding(image_loc[..., :4], self.geometry_dim)  # (B, R, 8 * geometry_dim)
        x = torch.cat([geometry, image_feat], dim=-1)  # (B, R, 8 * geometry_dim + F)
        return F.relu(self.dense(self.dropout(x)))  # (B, R, D)


class VLBertEmbeddings(nn.Module):
    """VL-BERT's input: [text T][visual elements R][END], each element the sum of a token, a visual
    feature, a segment and a sequence-position embedding, then LayerNorm and dropout.

    * text: word embedding + a visual element's visual feature through the gated LayerNorm
      `text_visual_norm`: the whole image's (element 0), or with `text_visual_index` the element each
      word refers to (VL-BERT's VCR: `_collect_obj_reps` of the words' object tags); segment = its
      token type; position = its index.
    * visual element: the [IMG] token (or, for a masked region, the mask token) + its visual feature
      through `object_visual_norm`; segment = the visual type (the row after the text types); every
      visual element has the same position, the number of real words.
    * END: a learned token, visual segment, position = number of words + 1.
    A masked region's appearance feature is replaced by `mask_feature` before the projection (its box
    is kept). A text-only row (`text_only`) gives its words `text_only_visual` instead of an image.
    Padding (text at the end of the row, regions anywhere) is left to the attention mask.
    """

    def __init__(self, config):
        super().__init__()
        c, D = config, config.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, D)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size + 1, D)  # the last row: visual
        self.region_embedding = RegionEmbedding(c.v_feature_size, c.v_geometry_dim, D, c.hidden_dropout_prob)
        self.text_visual_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.object_visual_norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.img_token = nn.Parameter(torch.zeros(D))
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.end_token = nn.Parameter(torch.zeros(D))
        self.mask_feature = nn.Parameter(torch.zeros(c.v_feature_size))
        self.text_only_visual = nn.Parameter(torch.zeros(D))
        self.norm = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.visual_type = c.type_vocab_size
        self.config = c

    def post_init(self) -> None:
        """After the BERT initialisation: VL-BERT's own initial values."""
        c = self.config
        for token in (self.img_token, self.mask_token, self.end_token, self.text_only_visual):
            nn.init.normal_(token, std=c.initializer_range)
        nn.init.zeros_(self.mask_feature)
        self.region_embedding.dense.reset_parameters()  # PyTorch's default, not BERT's, as VL-BERT
        nn.init.constant_(self.text_visual_norm.weight, c.visual_scale_text_init)
        nn.init.constant_(self.object_visual_norm.weight, c.visual_scale_object_init)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        token_type_ids: torch.Tensor,  # (B, T)
        text_mask: torch.Tensor,  # (B, T) bool, real words first
        image_feat: torch.Tensor,  # (B, R, F), element 0 = the whole image
        image_loc: torch.Tensor,  # (B, R, 5)
        image_mask: torch.Tensor,  # (B, R) bool
        masked_regions: torch.Tensor | None = None,  # (B, R) bool: appearance replaced by mask_feature
        text_only: torch.Tensor | None = None,  # (B,) bool: words see text_only_visual, not the image
        text_visual_index: torch.Tensor | None = None,  # (B, T) long: the element each word carries; None = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (B, T), R = input_ids.shape, image_feat.shape[1]
        if T + 2 > self.position_embeddings.num_embeddings:
            raise ValueError(f"VL-BERT needs T + 2 <= max_position_embeddings positions "
                             f"({self.position_embeddings.num_embeddings}); got T = {T}")
        token = self.img_token.expand(B, R, -1)  # (B, R, D)
        if masked_regions is not None:
            image_feat = torch.where(masked_regions[..., None], self.mask_feature.to(image_feat.dtype), image_feat)
            token = torch.where(masked_regions[..., None], self.mask_token, token)
        visual = self.region_embedding(image_feat, image_loc)  # (B, R, D)
        if text_visual_index is None:
            word_visual = visual[:, :1]  # (B, 1, D) the whole image, for every word
        else:
            word_visual = visual.gather(1, text_visual_index[..., None].expand(-1, -1, visual.shape[-1]))  # (B, T, D)
        if text_only is not None:
            word_visual = torch.where(text_only[:, None, None], self.text_only_visual, word_visual)
        words = self.word_embeddings(input_ids) + self.text_visual_norm(word_visual)  # (B, T, D)
        objects = token + self.object_visual_norm(visual)  # (B, R, D)
        end = self.end_token.expand(B, 1, -1)  # (B, 1, D)

        n_words = text_mask.sum(1, keepdim=True)  # (B, 1)
        positions = torch.cat([torch.arange(T, device=input_ids.device).expand(B, T),
                               n_words.expand(B, R), n_words + 1], dim=1)  # (B, T+R+1)
        types = torch.cat([token_type_ids, token_type_ids.new_full((B, R + 1), self.visual_type)], dim=1)
        x = torch.cat([words, objects, end], dim=1) + self.position_embeddings(positions) \
            + self.token_type_embeddings(types)  # (B, T+R+1, D)
        mask = torch.cat([text_mask, image_mask, text_mask.new_ones(B, 1)], dim=1)  # (B, T+R+1)
        return self.dropout(self.norm(x)), mask
