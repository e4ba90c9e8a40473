"""Scoring many (caption, image) pairs with ViLBERT.

Co-attention mixes the streams, so each pair needs its own joint forward pass. What happens before
the first co-attention layer depends on one stream only: the text embeddings and the text layers
before co-attention layer 0, and the visual embeddings and visual layers before it. `PairScorer`
runs those once per caption and once per image, caches them, and runs only the joint part per
pair. VL-BERT (single stream) has nothing to cache and runs the full model per pair.
"""
from __future__ import annotations

import torch

from vilbert.layers import key_padding_mask


def _chunks(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


class PairScorer:
    """score = alignment logit[0] - logit[1] ("alignment"), or the `retrieval` head ("retrieval")."""

    def __init__(self, model, head: str = "alignment", task_ids_fn=None):
        self.model, self.head = model, head
        self.task_ids_fn = task_ids_fn or (lambda n, device: None)
        bb = model.backbone
        self.cacheable = model.config.arch == "vilbert" and hasattr(bb, "encoder")
        if head == "retrieval" and "retrieval" not in model.task_heads.spec:
            raise ValueError("the model has no 'retrieval' head; score with the alignment head instead")

    def score_outputs(self, out, image_mask) -> torch.Tensor:
        """BackboneOutput -> (P,) scores, higher = better match."""
        if self.head == "retrieval":
            return self.model.task_logits("retrieval", out, image_mask)[:, 0]
        logits = self.model.alignment_head(out.pooled_text, out.pooled_image)  # (P, 2)
        return logits[:, 0] - logits[:, 1]

    # -- stream prefixes (cacheable) -------------------------------------------------------------
    def text_prefix(self, input_ids, token_type_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """-> hidden (C, T', D) after the text layers before co-attention 0, mask (C, T')."""
        bb = self.model.backbone
        task_ids = self.task_ids_fn(input_ids.shape[0], input_ids.device)
        h, attention_mask = bb.embed_text(input_ids, token_type_ids, attention_mask, task_ids)  # (C, T', D)
        return bb.encoder.text_prefix(h, key_padding_mask(attention_mask)), attention_mask

    def image_prefix(self, image_feat, image_loc, image_mask) -> torch.Tensor:
        """-> hidden (I, R, Dv) after the visual layers before co-attention 0."""
        bb = self.model.backbone
        return bb.encoder.image_prefix(bb.image_embeddings(image_feat, image_loc), key_padding_mask(image_mask))

    def joint(self, text, text_mask, image, image_mask) -> torch.Tensor:
        """Cached prefixes of P pairs -> (P,) scores: the encoder from co-attention layer 0 on."""
        bb = self.model.backbone
        text, image = bb.encoder.joint(text, key_padding_mask(text_mask), image, key_padding_mask(image_mask))
        return self.score_outputs(bb.pool(text, image), image_mask)

    # -- all pairs -----------------------------------------------------------------------------
    @staticmethod
    def captions_per_pass(images: int, pair_batch: int) -> int:
        """Captions scored together against the images (the rows of one group of passes)."""
        return max(1, pair_batch // max(1, images)) if images <= pair_batch else 1

    @torch.no_grad()
    def score_matrix(self, text: dict, images: dict, pair_batch: int = 256, rows: tuple[int, int] | None = None
                     ) -> torch.Tensor:
        """text: input_ids/token_type_ids/attention_mask (C, T); images: image_feat (I, R, F),
        image_loc (I, R, 5), image_mask (I, R) -> scores (C, I), or of the captions rows = (lo, hi)
        only, (hi - lo, I): with lo (and hi, unless it is C) a multiple of `captions_per_pass`, every
        pass is the one of the whole matrix, so the rows are exactly its rows."""
        C, I = text["input_ids"].shape[0], images["image_feat"].shape[0]
        lo, hi = rows or (0, C)
        scores = torch.empty(hi - lo, I)
        if hi <= lo:
            return scores
        if self.cacheable:  # per caption and per image, in chunks of pair_batch
            kept = [s for s in _chunks(C, pair_batch) if s.start < hi and s.stop > lo]  # those holding the rows
            parts = [self.text_prefix(text["input_ids"][s], text["token_type_ids"][s], text["attention_mask"][s])
                     for s in kept]
            first = kept[0].start
            th, tmask = torch.cat([h for h, _ in parts]), torch.cat([m for _, m in parts])  # (C', T', D), (C', T')
            ih = torch.cat([self.image_prefix(images["image_feat"][s], images["image_loc"][s], images["image_mask"][s])
                            for s in _chunks(I, pair_batch)])  # (I, R, Dv)
        per = self.captions_per_pass(I, pair_batch)
        for c0 in range(lo, hi, per):
            cs = torch.arange(c0, min(hi, c0 + per))
            for i0 in range(0, I, pair_batch):
                iis = torch.arange(i0, min(I, i0 + pair_batch))
                ci = cs.repeat_interleave(len(iis))  # (P,) caption of each pair
                ii = iis.repeat(len(cs))  # (P,) image of each pair
                if self.cacheable:
                    s = self.joint(th[ci - first], tmask[ci - first], ih[ii], images["image_mask"][ii])
                else:
                    out = self.model.backbone(
                        text["input_ids"][ci], images["image_feat"][ii], images["image_loc"][ii],
                        text["token_type_ids"][ci], text["attention_mask"][ci], images["image_mask"][ii],
                        self.task_ids_fn(len(ci), text["input_ids"].device))
                    s = self.score_outputs(out, images["image_mask"][ii])
                scores[ci - lo, ii] = s.float().cpu()
        return scores
