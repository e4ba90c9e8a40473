"""The two backbones: ViLBERT (two streams + co-attention) and VL-BERT (single stream).

Both take the same inputs and return a `BackboneOutput`, so heads, trainer and tasks do not
care which one they hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ViLBertConfig
from .embeddings import ImageEmbeddings, TextEmbeddings, VLBertEmbeddings
from .layers import CoAttentionLayer, Pooler, TransformerLayer, key_padding_mask


@dataclass
class BackboneOutput:
    text: torch.Tensor  # (B, T, D) final text hidden states
    image: torch.Tensor  # (B, R, Dv) final visual hidden states, position 0 = [IMG]
    pooled_text: torch.Tensor  # (B, Dbi) h_CLS after the pooler
    pooled_image: torch.Tensor  # (B, Dbi) h_IMG after the pooler
    end: torch.Tensor | None = None  # (B, D) VL-BERT's END element; None for ViLBERT


def _text_layer(c: ViLBertConfig) -> TransformerLayer:
    return TransformerLayer(
        c.hidden_size, c.num_attention_heads, c.intermediate_size,
        c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.layer_norm_eps,
    )


def _visual_layer(c: ViLBertConfig) -> TransformerLayer:
    return TransformerLayer(
        c.v_hidden_size, c.v_num_attention_heads, c.v_intermediate_size,
        c.v_hidden_dropout_prob, c.v_attention_probs_dropout_prob, c.layer_norm_eps,
    )


def _default_inputs(input_ids, image_feat, token_type_ids, attention_mask, image_mask):
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if image_mask is None:
        image_mask = torch.ones(image_feat.shape[:2], dtype=torch.long, device=image_feat.device)
    return token_type_ids, attention_mask, image_mask


class ViLBertEncoder(nn.Module):
    """Text layers, visual layers and co-attention layers run in the official order: before
    co-attention layer k, the text stream runs up to layer t_biattention_id[k] and the visual
    stream up to layer v_biattention_id[k]; the remaining layers of each stream run at the end."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        c = config
        self.text_layers = nn.ModuleList(_text_layer(c) for _ in range(c.num_hidden_layers))
        self.visual_layers = nn.ModuleList(_visual_layer(c) for _ in range(c.v_num_hidden_layers))
        self.co_layers = nn.ModuleList(CoAttentionLayer(c) for _ in range(len(c.v_biattention_id)))
        self.schedule = list(zip(c.t_biattention_id, c.v_biattention_id))
        self.with_coattention = c.with_coattention

    @property
    def _first(self) -> tuple[int, int]:
        """(text, visual) layers that run before the first co-attention layer."""
        return self.schedule[0] if self.schedule else (0, 0)

    def text_prefix(self, text, text_mask):
        """The text layers before the first co-attention layer (they never see the image)."""
        for layer in self.text_layers[: self._first[0]]:
            text = layer(text, text_mask)
        return text

    def image_prefix(self, image, image_mask):
        """The visual layers before the first co-attention layer (they never see the text)."""
        for layer in self.visual_layers[: self._first[1]]:
            image = layer(image, image_mask)
        return image

    def joint(self, text, text_mask, image, image_mask):
        """Everything from the first co-attention layer on, given the two prefixes' outputs."""
        t_start, v_start = self._first
        for co_layer, (t_end, v_end) in zip(self.co_layers, self.schedule):
            for layer in self.text_layers[t_start:t_end]:
                text = layer(text, text_mask)
            for layer in self.visual_layers[v_start:v_end]:
                image = layer(image, image_mask)
            if self.with_coattention:
                image, text = co_layer(image, image_mask, text, text_mask)
            t_start, v_start = t_end, v_end
        for layer in self.visual_layers[v_start:]:
            image = layer(image, image_mask)
        for layer in self.text_layers[t_start:]:
            text = layer(text, text_mask)
        return text, image

    def forward(self, text, text_mask, image, image_mask):
        return self.joint(self.text_prefix(text, text_mask), text_mask,
                          self.image_prefix(image, image_mask), image_mask)


class ViLBertModel(nn.Module):
    """ViLBERT backbone: text BERT stream, visual stream, co-attention, two poolers."""

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.image_embeddings = ImageEmbeddings(config, config.v_hidden_size)
        self.encoder = ViLBertEncoder(config)
        self.text_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.image_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        image_feat: torch.Tensor,  # (B, R, F)
        image_loc: torch.Tensor,  # (B, R, 5)
        token_type_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = token
        image_mask: torch.Tensor | None = None,  # (B, R) 1 = region
        task_ids: torch.Tensor | None = None,  # (B, 1), only with task-specific tokens
    ) -> BackboneOutput:
        token_type_ids, attention_mask, image_mask = _default_inputs(
            input_ids, image_feat, token_type_ids, attention_mask, image_mask
        )
        text, attention_mask = self.embed_text(input_ids, token_type_ids, attention_mask, task_ids)  # (B, T, D)
        image = self.image_embeddings(image_feat, image_loc)  # (B, R, Dv)
        text, image = self.encoder(text, key_padding_mask(attention_mask), image, key_padding_mask(image_mask))
        return self.pool(text, image)

    def embed_text(self, input_ids, token_type_ids, attention_mask, task_ids=None):
        """-> text embeddings (B, T', D) and their mask (B, T'); T' = T + 1 with a task token."""
        if self.embeddings.task_embeddings is not None:
            attention_mask = torch.cat([attention_mask[:, :1], attention_mask], dim=1)  # task token is real
        return self.embeddings(input_ids, token_type_ids, task_ids), attention_mask

    def pool(self, text, image) -> BackboneOutput:
        return BackboneOutput(text, image, self.text_pooler(text), self.image_pooler(image))


class VLBertModel(nn.Module):
    """VL-BERT (Su et al., ICLR 2020): one BERT stream over [CLS] text [SEP], the visual elements
    (element 0 = the whole image) and an END token; embeddings in `VLBertEmbeddings`.

    Outputs: text and visual hidden states, `pooled_text` = VL-BERT's pooler (BERT's, tanh) on [CLS],
    `pooled_image` = the same pooler on the whole-image element (for the fused task heads; VL-BERT
    itself pools only [CLS]), `end` = the END element's hidden state.
    `text_visual_index` (B, T): the visual element whose feature each word carries (default 0, the
    whole image; VL-BERT's VCR gives a word naming an object that object's element).
    """

    def __init__(self, config: ViLBertConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embeddings = VLBertEmbeddings(config)
        self.layers = nn.ModuleList(_text_layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(D, D, activation="tanh")

    def post_init(self) -> None:
        """Called after the generic weight initialisation."""
        self.embeddings.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) [CLS] text [SEP], padding at the end
        image_feat: torch.Tensor,  # (B, R, F), element 0 = the whole image
        image_loc: torch.Tensor,  # (B, R, 5)
        token_type_ids: torch.Tensor | None = None,  # (B, T) text segments (0 = A, 1 = B)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        image_mask: torch.Tensor | None = None,  # (B, R)
        task_ids: torch.Tensor | None = None,  # VL-BERT has no task tokens: must be None
        masked_regions: torch.Tensor | None = None,  # (B, R) bool, regions whose appearance is masked
        text_only: torch.Tensor | None = None,  # (B,) bool, rows without an image
        text_visual_index: torch.Tensor | None = None,  # (B, T) long, the visual element each word carries
    ) -> BackboneOutput:
        if task_ids is not None:
            raise ValueError("VL-BERT has no task-specific tokens: task_ids must be None")
        token_type_ids, attention_mask, image_mask = _default_inputs(
            input_ids, image_feat, token_type_ids, attention_mask, image_mask
        )
        text_mask, image_mask = attention_mask.bool(), image_mask.bool()
        if text_only is not None:
            image_mask = image_mask & ~text_only[:, None]
        x, mask = self.embeddings(input_ids, token_type_ids, text_mask, image_feat, image_loc, image_mask,
                                  masked_regions, text_only, text_visual_index)  # (B, T+R+1, D)
        mask = key_padding_mask(mask)
        for layer in self.layers:
            x = layer(x, mask)
        T, R = input_ids.shape[1], image_feat.shape[1]
        text, image = x[:, :T], x[:, T:T + R]  # (B, T, D), (B, R, D)
        return BackboneOutput(text, image, self.pooler(text), self.pooler(image), end=x[:, -1])


def build_backbone(config: ViLBertConfig) -> nn.Module:
    return {"vilbert": ViLBertModel, "vlbert": VLBertModel}[config.arch](config)
