"""ViLBERT / VL-BERT model library: configs, backbones, heads, losses, checkpoint loading.

No data loading or training here; see `pipelines/` for those.
"""
from .checkpoint import LoadReport, load_bert_weights, load_pretrained, save_pretrained
from .config import ViLBertConfig, load_preset, preset_names
from .model import BackboneOutput, ViLBertModel, VLBertModel, build_backbone
from .official import load_official_checkpoint
from .official_vlbert import load_official_vlbert_checkpoint
from .pretraining import IGNORE_INDEX, PretrainingOutput, ViLBert

__all__ = [
    "BackboneOutput", "IGNORE_INDEX", "LoadReport", "PretrainingOutput", "ViLBert", "ViLBertConfig",
    "ViLBertModel", "VLBertModel", "build_backbone", "load_bert_weights", "load_official_checkpoint",
    "load_official_vlbert_checkpoint", "load_preset", "load_pretrained", "preset_names", "save_pretrained",
]
