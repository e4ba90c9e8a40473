"""Numerical parity with the official VL-BERT code (jackroos/VL-BERT), on shared random weights.

    git clone https://github.com/jackroos/VL-BERT /tmp/official/VL-BERT    # any local work tree
    pip install jsonlines                                                  # the official dataset reads it
    python benchmarks/vlbert_parity.py --official /tmp/official/VL-BERT

Nothing of the official code is part of this project or downloaded by this script. A second Python
process (this file with `--official-side`; the official top-level packages `common` and `external`
would shadow ours in one process) builds, from the official work tree:

* the pretraining model of `cfgs/pretrain/base_prec_4x16G_fp32.yaml` at a small size,
  `ResNetVLBERTForPretrainingMultitask` (precomputed features, MLM and MVRC heads, text-only corpus),
  once as configured (`with_pooler: false`, `WITH_REL_LOSS: false`) and once with the pooler and the
  relationship head;
* the VQA model of `cfgs/vqa/base_4x16G_fp32.yaml` (`ResNetVLBERT`, `CLASSIFIER_TYPE: mlm`: its answer head
  `final_mlp` starts from a BERT MLM transform, read from a generated `pytorch_model.bin`);

on random weights (every weight, bias and LayerNorm perturbed, the visual LayerNorm gains, zero at
the official init, drawn around 1, the mask feature drawn too), and its inputs with the official
input path: `ConceptualCaptionsDataset.__getitem__` on generated precomputed-feature files (boxes
sorted by confidence, the whole image as box 0 with the mean feature of the unmasked regions, region
and whole-word masking, resizing and flipping), `GeneralCorpus` for the text-only rows, and the
official `BatchCollator`; the models' own forward passes then build text, boxes and masks (VQA: the
question + [MASK] layout of `prepare_text_from_qa`). It saves weights, inputs and outputs (hidden
states captured from the encoder, the pooler, the MLM / MVRC / relationship logits, the VQA answer
logits) to a file of tensors, once in float64 and once in float32.

This process converts the weights with `vilbert.official_vlbert`, maps the official batch onto our
batch contract (boxes in pixels / the resized image size -> `image_loc`; `mvrc_ops == 1` ->
`masked_regions`; the corpus rows -> `text_only`), and compares every output at every real position.
It also checks that the official state dicts have exactly the keys and shapes that the suite's
hand-written fixture (tests/official_state.py) gives. Prints max |difference| per output and writes
JSON to benchmarks/results/vlbert_parity.json; exit status 1 unless float64 <= 1e-5 and float32 <= 1e-4.

Stand-ins: the official side puts minimal modules into sys.modules for imports that the compared
path never executes: `boto3`, `botocore.exceptions`, `requests` (vendored pytorch_pretrained_bert's
downloads), `pycocotools.coco` (the COCO captions dataset, imported by the datasets package) and
`common.lib.roi_pooling.C_ROIPooling` (the compiled ROI ops of the end-to-end models). apex is absent,
so the vendored BERT uses its own LayerNorm. For the VQA model, `VisualLinguisticBert.load_language_pretrained_model`
is skipped (the generated `pytorch_model.bin` holds only the MLM transform its head reads; every weight is
randomised afterwards anyway).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(hidden=32, layers=2, heads=4, intermediate=48, positions=80, classes=11, answers=5)
WORDS = ("a the man woman dog cat red blue green small big on in with near street table car tree "
         "sits runs holds looks at of and two three people ball park white black house water grass").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
RUNS = {"pretrain": dict(pooler=False, relationship=False), "pretrain+pooler+rel": dict(pooler=True, relationship=True)}


# ---- the official side (a separate process) ------------------------------------------------------

def namespace(d: dict):
    return types.SimpleNamespace(**{k: namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


def install_stand_ins() -> None:
    boto3, botocore, exceptions = (types.ModuleType(n) for n in ("boto3", "botocore", "botocore.exceptions"))
    exceptions.ClientError = type("ClientError", (Exception,), {})
    coco = types.ModuleType("pycocotools.coco")
    coco.COCO = type("COCO", (), {})
    sys.modules.update({"boto3": boto3, "botocore": botocore, "botocore.exceptions": exceptions,
                        "requests": types.ModuleType("requests"), "pycocotools": types.ModuleType("pycocotools"),
                        "pycocotools.coco": coco,
                        "common.lib.roi_pooling.C_ROIPooling": types.ModuleType("C_ROIPooling")})


def official_config(vocab_dir: Path, pooler: bool, relationship: bool, vqa: bool = False):
    """The NETWORK options of cfgs/pretrain/base_prec_4x16G_fp32.yaml (cfgs/vqa/base_4x16G_fp32.yaml), small."""
    s = SIZES
    vlbert = dict(from_scratch=True, input_size=1280, input_transform_type=1, word_embedding_frozen=False,
                  pos_embedding_frozen=False, obj_pos_id_relative=True, hidden_size=s["hidden"],
                  visual_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  intermediate_size=s["intermediate"], hidden_act="gelu", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, max_position_embeddings=s["positions"], type_vocab_size=3,
                  vocab_size=len(VOCAB), initializer_range=0.02, visual_scale_text_init=0.0,
                  visual_scale_object_init=0.0, visual_ln=True, object_word_embed_mode=2, with_pooler=pooler or vqa,
                  visual_region_classes=s["classes"], position_padding_idx=-1)
    network = dict(IMAGE_FEAT_PRECOMPUTED=True, IMAGE_SEMANTIC=False, IMAGE_FINAL_DIM=s["hidden"],
                   IMAGE_FROZEN_BN=True, MASK_RAW_PIXELS=True, BERT_MODEL_NAME=str(vocab_dir), BERT_PRETRAINED="",
                   BERT_PRETRAINED_EPOCH=0, WITH_REL_LOSS=relationship, WITH_MLM_LOSS=True, WITH_MVRC_LOSS=True,
                   MLM_LOSS_NORM_IN_BATCH_FIRST=False, MVRC_LOSS_NORM_IN_BATCH_FIRST=False, ENABLE_CNN_REG_LOSS=False,
                   BLIND=False, NO_GROUNDING=False, CLASSIFIER_TYPE="mlm", CLASSIFIER_DROPOUT=0.1,
                   CLASSIFIER_HIDDEN_SIZE=24, PIXEL_MEANS=[102.9801, 115.9465, 122.7717], PIXEL_STDS=[1.0, 1.0, 1.0],
                   VLBERT=vlbert)
    return namespace(dict(NETWORK=network, DATASET=dict(ANSWER_VOCAB_SIZE=s["answers"]), SCALES=(600, 1000),
                          TRAIN=dict(FLIP_PROB=0.5)))


def write_data(folder: Path, n_images: int = 4) -> None:
    """Captions with precomputed bottom-up features in the official layout (train_frcnn.json lines and one
    frcnn json per image: base64 float32 boxes, class scores and 2048-d features), a vocabulary, a corpus."""
    import base64

    import numpy as np

    g = np.random.default_rng(0)
    (folder / "frcnn").mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "corpus.txt").write_text("\n".join(" ".join(g.choice(WORDS, 12)) for _ in range(8)) + "\n")
    lines = []
    for i in range(n_images):
        w, h, n = int(g.integers(300, 800)), int(g.integers(300, 800)), int(g.integers(8, 16))
        xy = g.uniform(0, 0.6, (n, 2)) * [w, h]
        boxes = np.concatenate([xy, xy + g.uniform(0.1, 0.4, (n, 2)) * [w, h]], 1).astype(np.float32)
        scores = g.random((n, SIZES["classes"])) ** 4
        scores = (scores / scores.sum(1, keepdims=True)).astype(np.float32)
        feats = np.maximum(g.normal(0, 1, (n, 2048)), 0).astype(np.float32)
        enc = {k: base64.encodebytes(v.tobytes()).decode() for k, v in
               (("boxes", boxes), ("classes", scores), ("features", feats))}
        (folder / "frcnn" / f"img{'abcdefgh'[i]}.json").write_text(
            json.dumps({"image_w": w, "image_h": h, "num_boxes": n, **enc}))
        lines.append(json.dumps({"caption": list(g.choice(WORDS, int(g.integers(4, 12)))),
                                 "image": f"img{'abcdefgh'[i]}.jpg", "frcnn": f"frcnn/img{'abcdefgh'[i]}.json"}))
    (folder / "train_frcnn.json").write_text("\n".join(lines) + "\n")


def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # each tensor once (the MLM decoder is tied)
            if "visual_ln_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))  # zero at the official init
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))  # biases, LayerNorms, the mask feature too


def official_side(repo: Path, out: Path) -> None:
    import random

    install_stand_ins()
    sys.path.insert(0, str(repo))
    from external.pytorch_pretrained_bert import BertTokenizer
    from pretrain.data.collate_batch import BatchCollator
    from pretrain.data.datasets.conceptual_captions import ConceptualCaptionsDataset
    from pretrain.data.datasets.general_corpus import GeneralCorpus
    from pretrain.data.transforms.build import build_transforms
    from pretrain.modules.resnet_vlbert_for_pretraining_multitask import ResNetVLBERTForPretrainingMultitask
    from vqa.modules.resnet_vlbert_for_vqa import ResNetVLBERT

    data = Path(tempfile.mkdtemp())
    write_data(data)
    tokenizer = BertTokenizer(str(data / "vocab.txt"))
    dump = {}
    for run, flags in RUNS.items():
        cfg = official_config(data, **flags)
        random.seed(1)
        captions = ConceptualCaptionsDataset(None, "train", str(data), str(data), seq_len=64,
                                             with_precomputed_visual_feat=True, with_rel_task=flags["relationship"],
                                             transform=build_transforms(cfg, "train"), tokenizer=tokenizer,
                                             add_image_as_a_box=True)
        corpus = GeneralCorpus(str(data / "corpus.txt"), None, tokenizer=tokenizer, seq_len=64, min_seq_len=64)
        batch = BatchCollator(captions)([captions[i] for i in range(4)])
        aux = BatchCollator(corpus)([corpus[i] for i in range(2)])
        torch.manual_seed(2)
        model = ResNetVLBERTForPretrainingMultitask(cfg)
        randomise(model, 3)
        for dtype in (torch.float64, torch.float32):
            model.to(dtype).eval()
            _, boxes, im_info, text, rel, mlm, ops, mvrc = (x.to(dtype) if x is not None and x.is_floating_point()
                                                            else x for x in batch)
            seen, (outputs, _) = run_recorded(model, None, boxes.clone(), im_info, text, rel, mlm, ops, mvrc, *aux)
            keep = ["mlm_logits_wvc", "mlm_logits_aux", "mvrc_logits", "mlm_loss_wvc", "mlm_loss_aux", "mvrc_loss"]
            dump[f"{run}/{dtype}"] = dict(
                inputs=dict(boxes=boxes, im_info=im_info, text=text, mvrc_ops=ops, aux_text=aux[0],
                            mlm_labels=mlm, aux_mlm_labels=aux[1], mvrc_labels=mvrc),
                outputs={**seen, **{k: outputs[k] for k in keep},
                         **({"relationship_logits": outputs["relationship_logits"]} if flags["relationship"] else {})})
        dump[f"{run}/state_dict"] = {f"module.{k}": v for k, v in model.float().state_dict().items()}

    torch.manual_seed(4)
    h = SIZES["hidden"]  # the BERT weights its CLASSIFIER_TYPE mlm head starts from (only these are read)
    torch.save({"cls.predictions.transform.dense.weight": torch.randn(h, h), "cls.predictions.transform.dense.bias":
                torch.randn(h), "cls.predictions.transform.LayerNorm.weight": torch.ones(h),
                "cls.predictions.transform.LayerNorm.bias": torch.zeros(h)}, data / "pytorch_model.bin")
    from common.visual_linguistic_bert import VisualLinguisticBert

    # the file holds no BERT encoder: VisualLinguisticBert's BERT loader is skipped (`randomise` sets every weight)
    VisualLinguisticBert.load_language_pretrained_model = lambda self, path: None
    vqa = ResNetVLBERT(official_config(data, pooler=True, relationship=False, vqa=True))
    randomise(vqa, 5)
    question = torch.randint(5, len(VOCAB), (len(dump["pretrain/torch.float32"]["inputs"]["text"]), 7))
    question[1, 4:] = 0
    for dtype in (torch.float64, torch.float32):
        vqa.to(dtype).eval()
        inputs = dump[f"pretrain/{dtype}"]["inputs"]  # the same boxes and features
        seen, outputs = run_recorded(vqa, None, inputs["boxes"].clone(), inputs["im_info"], question)
        dump[f"vqa/{dtype}"] = dict(inputs=dict(boxes=inputs["boxes"], im_info=inputs["im_info"]),
                                    outputs={**seen, "answer_logits": outputs["label_logits"]})
    dump["vqa/state_dict"] = {f"module.{k}": v for k, v in vqa.float().state_dict().items()}
    torch.save(dump, out)


def run_recorded(model, *inputs) -> tuple[dict, object]:
    """model(*inputs), recording what VisualLinguisticBert receives, what its embedding packs (the
    masks of the seamless sequence) and what its encoder and pooler return."""
    vlbert, seen = model.vlbert, {}
    embedding, forward = vlbert.embedding, vlbert.forward

    def record_embedding(*args):
        emb, mask, text_mask, object_mask = embedding(*args)
        seen.update(packed_mask=mask.bool(), packed_text=text_mask, packed_objects=object_mask)
        return emb, mask, text_mask, object_mask

    def record_forward(text_ids, text_types, text_visual, text_mask, *args, **kwargs):
        seen.update(text_ids=text_ids, text_types=text_types, text_mask=text_mask.bool())
        return forward(text_ids, text_types, text_visual, text_mask, *args, **kwargs)

    vlbert.embedding, vlbert.forward = record_embedding, record_forward  # instance attributes, removed below
    hooks = [vlbert.encoder.register_forward_hook(lambda m, i, o: seen.update(hidden=o[-1]))]
    if vlbert.config.with_pooler:
        hooks.append(vlbert.pooler.register_forward_hook(lambda m, i, o: seen.update(pooled=o)))
    try:
        with torch.no_grad():
            result = model(*inputs)
    finally:
        del vlbert.embedding, vlbert.forward
        for h in hooks:
            h.remove()
    return seen, result


# ---- our side ------------------------------------------------------------------------------------------

def our_config():
    from vilbert import load_preset

    s = SIZES
    return load_preset("vlbert-base", vocab_size=len(VOCAB), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
                       max_position_embeddings=s["positions"], v_feature_size=2048, v_target_size=s["classes"],
                       v_hidden_size=s["hidden"], v_num_attention_heads=s["heads"], bi_hidden_size=s["hidden"],
                       bi_num_attention_heads=s["heads"], v_geometry_dim=256)


def batch_inputs(inputs: dict, text_ids, text_types=None, text_only_rows: int = 0, masked=True) -> dict:
    """The official batch in our contract: image_loc = boxes / the (resized) image size."""
    boxes, im_info = inputs["boxes"], inputs["im_info"]
    B, Bi = text_ids.shape[0], boxes.shape[0]
    size = im_info[:, None, :2].repeat(1, 1, 2)  # (Bi, 1, 4) w, h, w, h
    loc = boxes[..., :4] / size
    area = (loc[..., 2] - loc[..., 0]) * (loc[..., 3] - loc[..., 1])
    pad = B - Bi  # text-only rows carry no image
    grow = (lambda x: torch.cat([x, x.new_zeros(pad, *x.shape[1:])])) if pad else (lambda x: x)
    out = dict(input_ids=text_ids, attention_mask=(text_ids > 0).long(),
               token_type_ids=torch.zeros_like(text_ids) if text_types is None else text_types,
               image_feat=grow(boxes[..., 4:]), image_loc=grow(torch.cat([loc, area[..., None]], -1)),
               image_mask=grow((boxes[..., 0] > -1.5).long()))
    if masked:
        out["masked_regions"] = grow(inputs["mvrc_ops"] == 1)
    if text_only_rows:
        out["text_only"] = torch.arange(B) >= B - text_only_rows
    return out


def hidden_pairs(seen: dict, out, text_mask, image_mask) -> dict:
    end = seen["packed_mask"] & ~seen["packed_text"] & ~seen["packed_objects"]
    return {"hidden (text)": (seen["hidden"][seen["packed_text"]], out.text[text_mask]),
            "hidden (regions)": (seen["hidden"][seen["packed_objects"]], out.image[image_mask]),
            "hidden (END)": (seen["hidden"][end], out.end)}


def compare_pretraining(dump: dict, run: str, dtype: str, model) -> dict:
    d = dump[f"{run}/{dtype}"]
    inp, seen, official = d["inputs"], d["outputs"], d["outputs"]
    Bc, Ba = inp["text"].shape[0], inp["aux_text"].shape[0]
    T = max(inp["text"].shape[1], inp["aux_text"].shape[1])
    ids = torch.zeros(Bc + Ba, T, dtype=torch.long)
    ids[:Bc, :inp["text"].shape[1]], ids[Bc:, :inp["aux_text"].shape[1]] = inp["text"], inp["aux_text"]
    x = batch_inputs(inp, ids, text_only_rows=Ba)
    with torch.no_grad():
        out = model.backbone(**x)
        mlm, mvrc = model.mlm_head(out.text), model.region_head(out.image[:Bc])
        relationship = model.alignment_head(out.pooled_text[:Bc])[:, [1, 0]]  # official 1 = own caption, ours 0
    text_mask, image_mask = x["attention_mask"].bool(), x["image_mask"].bool()
    pairs = hidden_pairs(seen, out, text_mask, image_mask)
    pairs["MLM logits (captions)"] = (official["mlm_logits_wvc"][text_mask[:Bc]], mlm[:Bc][text_mask[:Bc]])
    pairs["MLM logits (text-only)"] = (official["mlm_logits_aux"][text_mask[Bc:]], mlm[Bc:][text_mask[Bc:]])
    real = image_mask[:Bc, :official["mvrc_logits"].shape[1]]
    pairs["MVRC logits"] = (official["mvrc_logits"][real], mvrc[image_mask[:Bc]])
    if "pooled" in seen:
        pairs["pooled"] = (seen["pooled"], out.pooled_text)
    if "relationship_logits" in official:
        pairs["relationship logits"] = (official["relationship_logits"], relationship)
    pairs.update(compare_losses(inp, official, mlm, mvrc, image_mask[:Bc], T))
    counts = {"captions": Bc, "text-only rows": Ba, "regions (incl. whole image)": int(image_mask.sum()),
              "masked regions": int(x["masked_regions"].sum()), "words": int(text_mask.sum()),
              "masked words": int((inp["mlm_labels"] >= 0).sum() + (inp["aux_mlm_labels"] >= 0).sum()),
              "MRC targets": int(((inp["mvrc_labels"].sum(-1) - 1).abs() < 0.1).sum())}
    return pairs, counts


def compare_losses(inp: dict, official: dict, mlm, mvrc, image_mask, T: int) -> dict:
    """Our VL-BERT losses on our logits at the official labels (-1 = not predicted; a masked region
    is one whose target row is a distribution)."""
    from vilbert import IGNORE_INDEX
    from vilbert.pretraining import vlbert_pretraining_losses

    Bc, Ba = inp["mlm_labels"].shape[0], inp["aux_mlm_labels"].shape[0]
    labels = torch.full((Bc + Ba, T), IGNORE_INDEX, dtype=torch.long)
    labels[:Bc, :inp["mlm_labels"].shape[1]] = inp["mlm_labels"]
    labels[Bc:, :inp["aux_mlm_labels"].shape[1]] = inp["aux_mlm_labels"]
    labels[labels == -1] = IGNORE_INDEX
    picked = labels != IGNORE_INDEX  # (B, T)
    rows_text_only = (torch.arange(Bc + Ba) >= Bc)[:, None].expand_as(picked)
    targets = inp["mvrc_labels"]  # (Bc, R, C), zero rows where not masked
    masked = ((targets.sum(-1) - 1).abs() < 0.1) & image_mask
    ours = vlbert_pretraining_losses(mlm[picked], labels[picked], rows_text_only[picked], mvrc[masked],
                                     targets[masked])
    return {"MLM loss (captions)": (official["mlm_loss_wvc"], ours.mlm_captions),
            "MLM loss (text-only)": (official["mlm_loss_aux"], ours.mlm_text_only),
            "MRC loss": (official["mvrc_loss"], ours.mrc)}


def compare_vqa(dump: dict, dtype: str, model) -> dict:
    d = dump[f"vqa/{dtype}"]
    seen = d["outputs"]
    x = batch_inputs(d["inputs"], seen["text_ids"].long(), seen["text_types"].long(), masked=False)
    x["attention_mask"] = seen["text_mask"].long()
    with torch.no_grad():
        out = model.backbone(**x)
    pairs = hidden_pairs(seen, out, x["attention_mask"].bool(), x["image_mask"].bool())
    pairs["pooled"] = (seen["pooled"], out.pooled_text)
    mask_position = (x["input_ids"] == VOCAB.index("[MASK]")).long().argmax(1)  # (B,) after each question
    with torch.no_grad():
        pairs["vqa answer logits"] = (seen["answer_logits"], model.task_logits("vqa", out, positions=mask_position))
    counts = {"questions": x["input_ids"].shape[0], "words (incl. [MASK])": int(x["attention_mask"].sum()),
              "segment-B words": int((x["token_type_ids"] == 1).sum()), "regions": int(x["image_mask"].sum())}
    return pairs, counts


def check_fixture(state: dict, kind: str, config, **flags) -> None:
    """The suite's hand-written official layout must be the official model's state dict."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("official_state", ROOT / "tests" / "official_state.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    want = {k: tuple(v.shape) for k, v in fixture.official_vlbert_state(config, kind, **flags).items()}
    got = {k.removeprefix("module."): tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise SystemExit(f"tests/official_state.py differs from the official {kind} state dict: "
                         f"{sorted(set(want.items()) ^ set(got.items()))[:10]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="a local work tree of jackroos/VL-BERT")
    p.add_argument("--out", type=Path, default=RESULTS / "vlbert_parity.json")
    p.add_argument("--official-side", type=Path, help=argparse.SUPPRESS)  # internal: write the dump here
    a = p.parse_args(argv)
    if a.official_side:
        official_side(a.official.resolve(), a.official_side)
        return 0
    if not (a.official / "common" / "visual_linguistic_bert.py").is_file():
        raise SystemExit(f"{a.official}: not a VL-BERT work tree (no common/visual_linguistic_bert.py)")
    from vilbert.official_vlbert import convert_official_vlbert_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "official.pt"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--official", str(a.official.resolve()),
                        "--official-side", str(path)], check=True, cwd=tmp)
        dump = torch.load(path, weights_only=True)
    config, rows, inputs = our_config(), {}, {}
    for kind in list(RUNS) + ["vqa"]:
        state = dump[f"{kind}/state_dict"]
        check_fixture(state, "vqa" if kind == "vqa" else "pretrain", config,
                      **RUNS.get(kind, {"answers": SIZES["answers"]}))
        model, report = convert_official_vlbert_state_dict({k.removeprefix("module."): v for k, v in state.items()},
                                                           config, source=kind)
        parts = sorted({re.sub(r"\.(weight|bias)$", "", k) for k in report.missing})
        print(f"{kind}: {report.summary()}; left at initialisation: {', '.join(parts)}")
        for dtype in ("torch.float64", "torch.float32"):
            model = model.to(getattr(torch, dtype.split(".")[1])).eval()
            pairs, counts = (compare_vqa(dump, dtype, model) if kind == "vqa"
                             else compare_pretraining(dump, kind, dtype, model))
            inputs[kind] = counts
            for name, (want, got) in pairs.items():
                assert want.shape == got.shape, (kind, name, want.shape, got.shape)
            rows[f"{kind} {dtype.split('.')[1]}"] = {n: float((w - g).abs().max()) for n, (w, g) in pairs.items()}
    names = sorted({n for r in rows.values() for n in r}, key=lambda n: (n.split()[0] != "hidden", n))
    for kind, counts in inputs.items():
        print(f"{kind} inputs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    print("output | " + " | ".join(rows))
    for n in names:
        print(f"{n} | " + " | ".join(f"{r[n]:.1e}" if n in r else "-" for r in rows.values()))
    worst = {dt: max(v for k, r in rows.items() if k.endswith(dt) for v in r.values()) for dt in ("float64", "float32")}
    print(f"max |difference|: float64 {worst['float64']:.1e} (<= 1e-5), float32 {worst['float32']:.1e} (<= 1e-4)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "command": "python benchmarks/vlbert_parity.py --official PATH",
                                 "max_abs_difference": worst, "results": rows, "inputs": inputs}, indent=2) + "\n")
    return 0 if worst["float64"] <= 1e-5 and worst["float32"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
