"""Tiny downstream datasets in the real file formats, for the task tests.

Scenes come from `pipelines.synthetic.scenes.SyntheticTask`: each image holds objects with a colour and a
shape; a region's feature is colour vector + shape vector + noise. Features are written to shards
with the extractor's `ShardWriter`, keyed like COCO file stems (`COCO_val2014_000000000042`).
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import torch

from common.shard_writer import ShardWriter
from pipelines.synthetic.scenes import COLOURS, SHAPES, SyntheticTask
from vilbert import ViLBert, load_preset, save_pretrained

WORDS = ["the", "a", "what", "colour", "is", "shape", "of", "picture", "with", "and", "yes", "no"] + COLOURS + SHAPES
SIZE = 100  # image width and height in pixels
CELLS = [(0, 0), (50, 0), (0, 50), (50, 50)]


def write_vocab(folder: Path, extra: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(extra)) + "\n")
    return path


def vocab_size(extra: list[str] = ()) -> int:
    return 5 + len(WORDS) + len(extra)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_shards(folder: Path, samples: dict, mode: str = "detected", shard_size: int = 16) -> Path:
    """samples: key -> (features (N, F), boxes (N, 4) pixels)."""
    writer = ShardWriter(str(folder), "feat", shard_size)
    for key, (feats, boxes) in samples.items():
        info = {"image_id": key, "width": SIZE, "height": SIZE, "num_boxes": len(boxes), "source": f"{key}.jpg",
                "detector": "synthetic", "weights_hash": "none", "mode": mode}
        writer.write(key, {"json": json.dumps(info).encode(), "features.npy": npy(feats.astype(np.float16)),
                           "boxes.npy": npy(boxes.astype(np.float32)),
                           "cls_prob.npy": npy(np.full((len(boxes), 5), 0.2, np.float16))})
    writer.close()
    return folder


def scene(task: SyntheticTask, rng, n_objects: int = 4):
    """-> objects (n, 2) colour/shape, gt boxes (n, 4) pixels (one per grid cell, never overlapping)."""
    objects = task.scene(rng)[:n_objects]
    boxes = []
    for (cx, cy) in CELLS[:len(objects)]:
        w, h = rng.uniform(28, 46, size=2)
        x, y = cx + rng.uniform(0, 50 - w), cy + rng.uniform(0, 50 - h)
        boxes.append([x, y, x + w, y + h])
    return objects, np.array(boxes, np.float32)


def region_features(task: SyntheticTask, objects, rng) -> np.ndarray:
    f = task.colour_vecs[objects[:, 0]] + task.shape_vecs[objects[:, 1]]
    return (f + task.noise * rng.normal(size=f.shape)).astype(np.float32)


def task_folder(root: Path, name: str, num_objects: int, feature_size: int, seed: int):
    """The synthetic scenes of one dataset, its generator and its new annotation folder root/name."""
    task = SyntheticTask(feature_size=feature_size, num_objects=num_objects, noise=0.3, seed=seed)
    data = root / name
    data.mkdir(parents=True)
    return task, np.random.default_rng(seed), data


def make_refer(root: Path, n_images=(60, 10, 8, 8), n_objects: int = 4, feature_size: int = 32, seed: int = 0,
               name: str = "refcoco+", refs_file: str = "refs(unc).p", splits=("train", "val", "testA", "testB")):
    """NAME/refs(unc).p (protocol 2; refcocog: refs(umd).p), NAME/instances.json, detected and gt-box shards.
    Detected regions: each object's box jittered by a few pixels (IoU >= 0.5), then one large
    background box that overlaps no object by IoU >= 0.5."""
    task, rng, data = task_folder(root, name, n_objects, feature_size, seed)
    refs, images, anns, det, gt = [], [], [], {}, {}
    image_id, ann_id, sent_id = 1, 1, 1
    for split, count in zip(splits, n_images):
        for _ in range(count):
            objects, boxes = scene(task, rng, n_objects)
            key = f"COCO_train2014_{image_id:012d}"
            images.append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": key + ".jpg"})
            feats = region_features(task, objects, rng)
            jitter = boxes + rng.uniform(-2, 2, size=boxes.shape).astype(np.float32)
            background = rng.normal(size=(1, feature_size)).astype(np.float32)
            det[key] = (np.concatenate([feats, background]), np.concatenate([jitter, [[0, 0, SIZE, SIZE]]]))
            gt[key] = (feats, boxes)
            for k, (c, s) in enumerate(objects):
                x1, y1, x2, y2 = boxes[k].tolist()
                anns.append({"id": ann_id, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "category_id": int(s) + 1, "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                raw = f"the {COLOURS[c]} {SHAPES[s]}"
                refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                             "category_id": int(s) + 1, "file_name": key + f"_{ann_id}.jpg",
                             "sent_ids": [sent_id],
                             "sentences": [{"raw": raw, "sent": raw, "sent_id": sent_id, "tokens": raw.split()}]})
                ann_id, sent_id = ann_id + 1, sent_id + 1
            image_id += 1
    (data / refs_file).write_bytes(pickle.dumps(refs, protocol=2))
    (data / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                     "categories": [{"id": i + 1, "name": s}
                                                                    for i, s in enumerate(SHAPES)]}))
    write_shards(root / "features", det)
    write_shards(root / "gt_features", gt, mode="gt-boxes")
    return data


# The refer toolkit's data folder (lichengunc/refer, README "Download" and "How to use"): one folder
# per dataset holding its instances.json and one refs(SPLITBY).p per split provider, each pickle the
# same refs with that provider's split names (RefCOCOg's Google split has no test; UMD's is the one
# vilbert-multi-task uses).
REFER_SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
# images per split of each pickle; the Google splits differ from the others' in size (and in which images)
REFER_PICKLES = {"refcoco": {"unc": (60, 8, 6, 6), "google": (62, 10, 8)},
                 "refcocog": {"umd": (60, 10, 10), "google": (68, 12)}}
# sentences of a ref (the real ones have 2 to 3), RefCOCOg's longer, in a different word order
REFER_EXPRESSIONS = {"refcoco": ("the {colour} {shape}", "{colour} {shape}"),
                     "refcoco+": ("the {colour} {shape}", "{colour} {shape}"),
                     "refcocog": ("the {shape} with the {colour} colour", "a picture of the {colour} {shape}")}


def make_refer_datasets(root: Path, pickles: dict | None = None, n_images: int = 80, n_objects: int = 4,
                        feature_size: int = 32, seed: int = 7, sentences_per_ref: int = 2) -> dict[str, Path]:
    """The refer toolkit's layout over one pool of COCO images, as the real datasets share COCO train2014:
    root/refer/NAME/refs(SPLITBY).p (protocol 2) + root/refer/NAME/instances.json for each NAME in
    `pickles` ({NAME: {SPLITBY: images per split}}, split names from REFER_SPLITS, default
    REFER_PICKLES: refcoco with refs(unc).p and refs(google).p, refcocog with refs(umd).p and
    refs(google).p), and the pool's detected and gt-box shards in root/features and root/gt_features
    (scenes, boxes and regions as make_refer's). -> {NAME: folder}.

    A dataset refers to every object of every pool image (ann_id: the COCO annotation's, shared by the
    datasets; ref_id and sent_id its own), with `sentences_per_ref` sentences from REFER_EXPRESSIONS;
    each of its pickles holds the refs of the images it puts in a split, images drawn per pickle
    without overlap between its splits, so one image can be train in one pickle and test in another."""
    pickles = REFER_PICKLES if pickles is None else pickles
    task, rng, data = task_folder(root, "refer", n_objects, feature_size, seed)
    images, anns, det, gt, objects_of = [], [], {}, {}, {}
    for image_id in range(1, n_images + 1):
        objects, boxes = scene(task, rng, n_objects)
        key = f"COCO_train2014_{image_id:012d}"
        images.append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": key + ".jpg"})
        feats = region_features(task, objects, rng)
        jitter = boxes + rng.uniform(-2, 2, size=boxes.shape).astype(np.float32)
        background = rng.normal(size=(1, feature_size)).astype(np.float32)
        det[key] = (np.concatenate([feats, background]), np.concatenate([jitter, [[0, 0, SIZE, SIZE]]]))
        gt[key] = (feats, boxes)
        objects_of[image_id] = []
        for k, (c, s) in enumerate(objects):
            x1, y1, x2, y2 = boxes[k].tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "category_id": int(s) + 1, "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            objects_of[image_id].append((len(anns), int(c), int(s)))
    folders = {}
    for d, (name, splits_by) in enumerate(pickles.items()):
        folder = data / name
        folder.mkdir()
        templates = REFER_EXPRESSIONS.get(name, REFER_EXPRESSIONS["refcoco"])
        refs_of, ref_id, sent_id = {}, 1, 1  # image id -> its refs, without a split
        for image in images:
            refs_of[image["id"]] = []
            for ann_id, c, s in objects_of[image["id"]]:
                sentences = []
                for k in range(sentences_per_ref):
                    raw = templates[k % len(templates)].format(colour=COLOURS[c], shape=SHAPES[s])
                    sentences.append({"raw": raw, "sent": raw, "sent_id": sent_id, "tokens": raw.split()})
                    sent_id += 1
                stem = image["file_name"].rsplit(".", 1)[0]
                refs_of[image["id"]].append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image["id"],
                                             "category_id": s + 1, "file_name": f"{stem}_{ann_id}.jpg",
                                             "sent_ids": [x["sent_id"] for x in sentences], "sentences": sentences})
                ref_id += 1
        for p, (split_by, counts) in enumerate(splits_by.items()):
            names = REFER_SPLITS[(name, split_by)]
            if len(counts) != len(names) or sum(counts) > n_images:
                raise ValueError(f"{name} {split_by}: {counts} images for splits {names} of {n_images}")
            order = np.random.default_rng([seed, d, p]).permutation(n_images) + 1
            refs, start = [], 0
            for split, count in zip(names, counts):
                for image_id in sorted(order[start:start + count].tolist()):
                    refs += [{**ref, "split": split} for ref in refs_of[image_id]]
                start += count
            (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
        (folder / "instances.json").write_text(json.dumps({
            "images": images, "annotations": anns,
            "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]}))
        folders[name] = folder
    write_shards(root / "features", det)
    write_shards(root / "gt_features", gt, mode="gt-boxes")
    return folders


def make_retrieval(root: Path, n_train: int = 24, n_test: int = 8, feature_size: int = 32, seed: int = 1):
    """Flickr-style train.jsonl / test.jsonl ({"img_path", "sentences"}) + shards keyed by file stem."""
    task, rng, data = task_folder(root, "flickr30k", 2, feature_size, seed)
    samples, n = {}, 1000092795
    for split, count in (("train", n_train), ("test", n_test)):
        lines = []
        for _ in range(count):
            objects, boxes = scene(task, rng, 2)
            samples[str(n)] = (region_features(task, objects, rng), boxes)
            caps = [f"a {COLOURS[c]} {SHAPES[s]}" for c, s in objects]
            caps.append(" and ".join(caps))
            lines.append(json.dumps({"img_path": f"{n}.jpg", "sentences": caps}))
            n += 1
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(root / "features", samples)
    return data


def make_vqa(root: Path, n_train: int = 40, n_val: int = 12, feature_size: int = 32, seed: int = 2):
    """VQA v2 questions/annotations JSON ("what colour is the circle") + COCO-keyed shards."""
    task, rng, data = task_folder(root, "vqa", 3, feature_size, seed)
    samples, image_id, qid = {}, 42, 1
    for split, count in (("train", n_train), ("val", n_val)):
        qs, anns = [], []
        for _ in range(count):
            objects, boxes = scene(task, rng, 3)
            samples[f"COCO_{split}2014_{image_id:012d}"] = (region_features(task, objects, rng), boxes)
            for c, s in objects[:2]:
                qs.append({"image_id": image_id, "question": f"what colour is the {SHAPES[s]}?", "question_id": qid})
                answers = [COLOURS[c]] * 8 + [COLOURS[(c + 1) % 4]] * 2
                anns.append({"question_id": qid, "image_id": image_id, "question_type": "what color is the",
                             "answer_type": "other", "multiple_choice_answer": COLOURS[c],
                             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                         for i, a in enumerate(answers)]})
                qid += 1
            image_id += 1
        (data / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": qs}))
        (data / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    write_shards(root / "features", samples)
    return data


def make_snli_ve(root: Path, n_images=(400, 40, 40), feature_size: int = 32, seed: int = 3):
    """snli_ve_{train,dev,test}.jsonl as released ("Flikr30kID", "sentence2", "gold_label") + shards
    keyed by Flickr30k stem. The hypothesis names a colour and a shape: entailment when the image has
    that object, contradiction when its shape is there in another colour, neutral when the shape is
    absent; the colours are uniform, so the words alone never tell."""
    task, rng, data = task_folder(root, "snli_ve", 2, feature_size, seed)
    samples, image = {}, 3000000
    for split, count in zip(("train", "dev", "test"), n_images):
        lines = []
        for _ in range(count):
            objects, boxes = scene(task, rng, 2)
            samples[str(image)] = (region_features(task, objects, rng), boxes)
            (c, s) = objects[rng.integers(2)]
            absent = [k for k in range(len(SHAPES)) if k not in objects[:, 1]]
            hypotheses = [(COLOURS[c], SHAPES[s], "entailment"),
                          (COLOURS[(c + rng.integers(1, 4)) % 4], SHAPES[s], "contradiction"),
                          (COLOURS[rng.integers(4)], SHAPES[absent[rng.integers(len(absent))]], "neutral")]
            for colour, shape, gold in hypotheses:
                lines.append(json.dumps({"Flikr30kID": f"{image}.jpg", "sentence1": "a picture",
                                         "sentence2": f"a {colour} {shape}", "gold_label": gold,
                                         "pairID": f"{image}.jpg#0r{len(lines)}"}))
            image += 1
        (data / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(root / "features", samples)
    return data


def make_nlvr2(root: Path, n_pairs=(600, 40, 40), feature_size: int = 32, seed: int = 4):
    """{train,dev,test1}.json as released ("identifier", "sentence", "label": "True"/"False") + shards
    keyed by the image stems SPLIT-SET-PAIR-img0/1. The sentence names a colour and a shape; it is
    True when both images hold that object, so each image and the words are needed."""
    task, rng, data = task_folder(root, "nlvr2", 2, feature_size, seed)
    samples = {}
    for split, count in zip(("train", "dev", "test1"), n_pairs):
        lines = []
        for pair in range(count):
            left, right = (scene(task, rng, 2) for _ in range(2))
            (c, s) = left[0][rng.integers(2)]
            truth = rng.random() < 0.5
            if truth:  # give the right image the object too, in place of one of its own
                right[0][rng.integers(2)] = (c, s)
            stem = f"{split}-{pair}-0"
            for side, (objects, boxes) in (("img0", left), ("img1", right)):
                samples[f"{stem}-{side}"] = (region_features(task, objects, rng), boxes)
            label = all(any(tuple(o) == (c, s) for o in objects) for objects, _ in (left, right))
            lines.append(json.dumps({"identifier": f"{stem}-0", "sentence": f"a {COLOURS[c]} {SHAPES[s]}",
                                     "label": str(bool(label)), "synset": "x", "query": "y"}))
        (data / f"{split}.json").write_text("\n".join(lines) + "\n")
    write_shards(root / "features", samples)
    return data


def make_gqa(root: Path, n_images=(400, 40, 40), feature_size: int = 32, seed: int = 5):
    """{train,val,testdev}_balanced_questions.json as released ({question id: {"imageId", "question",
    "answer", ...}}) + shards keyed by image id: "what colour is the SHAPE?" (a colour) and "is there
    a COLOUR SHAPE?" (yes / no, half of them true)."""
    task, rng, data = task_folder(root, "gqa", 3, feature_size, seed)
    samples, image, qid = {}, 2350000, 1
    for split, count in zip(("train", "val", "testdev"), n_images):
        questions = {}
        for _ in range(count):
            objects, boxes = scene(task, rng, 3)
            samples[str(image)] = (region_features(task, objects, rng), boxes)
            c, s = objects[rng.integers(3)]
            asked = [(f"what colour is the {SHAPES[s]}?", COLOURS[c])]
            yes = rng.random() < 0.5
            colour = c if yes else (c + rng.integers(1, 4)) % 4
            asked.append((f"is there a {COLOURS[colour]} {SHAPES[s]}?", "yes" if yes else "no"))
            for question, answer in asked:
                questions[f"{qid:08d}"] = {"imageId": str(image), "question": question, "answer": answer,
                                           "fullAnswer": answer, "isBalanced": True, "types": {}}
                qid += 1
            image += 1
        (data / f"{split}_balanced_questions.json").write_text(json.dumps(questions))
    write_shards(root / "features", samples)
    return data


# VCR: the words of its synthetic questions beyond WORDS, and the people's names of its names table
VCR_WORDS = ["?", ".", "it", "looks", "at", "person", "casey", "riley", "jessie", "##s"]
VCR_NAMES = ["Casey", "Riley", "Jessie"]


def write_names_table(data: Path, names: list[str]) -> Path:
    """unisex_names_table.csv as vilbert-multi-task ships it (fivethirtyeight's columns)."""
    rows = [",name,total,male_share,female_share,gap"]
    rows += [f"{k + 1},{name},{1000.0 - k},0.5,0.5,0.0" for k, name in enumerate(names)]
    (data / "unisex_names_table.csv").write_text("\n".join(rows) + "\n")
    return data / "unisex_names_table.csv"


def vcr_key(img_fn: str) -> str:
    """The key vilbert-extract gives an image at img_fn under its IMAGES folder."""
    from extractor.sources import safe_key

    return safe_key(str(Path(img_fn).with_suffix("")))


def make_vcr(root: Path, n_questions=(500, 80), feature_size: int = 32, seed: int = 6, name: str = "vcr",
             splits=("train", "val")):
    """NAME/{train,val}.jsonl in VCR's release format, NAME/unisex_names_table.csv, each image's
    metadata NAME/vcr1images/MOVIE/IMAGE.json (boxes with scores, names) and detected + gt-box shards
    keyed as vilbert-extract keys img_fn. An image holds two shapes and a person (objects: the
    shape names and "person", shuffled, in the order of the metadata boxes). The question asks the
    colour of one shape ("What colour is the [k] ?"), the answers are the four colours ("It is red
    ."), the rationales give the other shape each colour ("[j] is blue ."): the words alone never
    tell (colours are uniform); the answer needs the referenced object's region, the rationale the
    colours among the regions."""
    task, rng, data = task_folder(root, name, 3, feature_size, seed)  # 3 cells: two shapes and the person
    write_names_table(data, VCR_NAMES)
    person = np.random.default_rng(seed + 1).normal(size=feature_size).astype(np.float32)
    det, gt = {}, {}
    for split, count in zip(splits, n_questions):
        lines = []
        for q in range(count):
            shapes, boxes = scene(task, rng, 3)
            shapes = shapes[:2]
            feats = np.concatenate([region_features(task, shapes, rng), person[None] + 0.3 * rng.normal(
                size=(1, feature_size)).astype(np.float32)])
            order = rng.permutation(3)  # the objects (and their boxes) in a random order
            names = ([SHAPES[s] for _, s in shapes] + ["person"])
            objects, boxes, feats = [names[i] for i in order], boxes[order], feats[order]
            p = objects.index("person")
            k, j = rng.permutation([i for i in range(3) if i != p])
            colour = {i: int(shapes[order[i]][0]) for i in range(3) if i != p}
            answers, rationales = rng.permutation(4), rng.permutation(4)
            movie = f"lsmdc_{3001 + q % 7}_SYNTH_{split.upper()}"
            stem = f"{movie[6:]}_00.{q // 60:02d}.{q % 60:02d}.164-00.{q // 60:02d}.{q % 60:02d}.667@{q % 3}"
            img_fn, metadata_fn = f"{movie}/{stem}.jpg", f"{movie}/{stem}.json"
            meta = {"boxes": [[*map(float, b), 0.99] for b in boxes], "segms": [], "names": objects,
                    "width": SIZE, "height": SIZE}
            (data / "vcr1images" / movie).mkdir(parents=True, exist_ok=True)
            (data / "vcr1images" / metadata_fn).write_text(json.dumps(meta))
            jitter = boxes + rng.uniform(-2, 2, size=boxes.shape).astype(np.float32)
            background = rng.normal(size=(1, feature_size)).astype(np.float32)
            det[vcr_key(img_fn)] = (np.concatenate([feats, background]), np.concatenate([jitter, [[0, 0, SIZE, SIZE]]]))
            gt[vcr_key(img_fn)] = (feats, boxes)
            row = {"movie": movie, "objects": objects, "interesting_scores": [0], "answer_likelihood": "likely",
                   "img_fn": img_fn, "metadata_fn": metadata_fn,
                   "answer_orig": "", "question_orig": "", "rationale_orig": "",
                   "question": ["What", "colour", "is", "the", [int(k)], "?"],
                   "answer_match_iter": [0, 1, 2], "answer_sources": [0, 1, 2, 3],
                   "answer_choices": [["It", "is", COLOURS[c], "."] for c in answers],
                   "answer_label": int(np.flatnonzero(answers == colour[k])[0]),
                   "rationale_choices": [[[int(j)], "is", COLOURS[c], "."] for c in rationales],
                   "rationale_sources": [0, 1, 2, 3], "rationale_match_iter": [0, 1, 2],
                   "rationale_label": int(np.flatnonzero(rationales == colour[j])[0]),
                   "img_id": f"{split}-{q}", "question_number": 0, "annot_id": f"{split}-{q}",
                   "match_fold": f"{split}-0", "match_index": q}
            lines.append(json.dumps(row))
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(root / "features", det)
    write_shards(root / "gt_features", gt, mode="gt-boxes")
    return data


def tiny_config(feature_size: int = 32, **overrides):
    settings = dict(vocab_size=vocab_size(), v_feature_size=feature_size, v_target_size=5, max_position_embeddings=32,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)
    return load_preset("vilbert-tiny", **{**settings, **overrides})


def tiny_checkpoint(folder: Path, feature_size: int = 32, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    return save_pretrained(ViLBert(tiny_config(feature_size, **overrides)), folder, {"note": "tiny test model"})


def exit_status(main, argv: list) -> int:
    """A CLI's `main(argv)` as the shell sees it: its exit status, and click's one-line message
    (usage errors included) on stderr."""
    import click

    try:
        result = main(argv)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return result if isinstance(result, int) else 0  # --help returns 0, a run its results dict


def run_cli(task: str, d: dict, out: Path, *extra) -> int:
    """vilbert-eval on a dataset dict (root, data, vocab) -> exit status. Batches are built in a
    thread (--workers 0: on a small CPU, worker processes cost more than these tiny batches), unless
    `extra` says otherwise (the last --workers counts)."""
    from pipelines.eval_cli import main

    args = ["--task", task, "--data", str(d["data"]), "--features", str(d["root"] / "features"),
            "--out", str(out), "--tokenizer", str(d["vocab"]), "--device", "cpu", "--workers", "0", *extra]
    return exit_status(main, args)


def one_line_err(capsys) -> str:
    """What a command wrote to stderr, asserted to be one line and no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# every task's dataset at its smallest, for the input checks: name -> maker(root) -> data folder
SMALL_MAKERS = {
    "vqa": lambda root: make_vqa(root, n_train=8, n_val=4),
    "gqa": lambda root: make_gqa(root, n_images=(8, 4, 4)),
    "nlvr2": lambda root: make_nlvr2(root, n_pairs=(8, 4, 4)),
    "snli-ve": lambda root: make_snli_ve(root, n_images=(6, 3, 3)),
    "refcoco+": lambda root: make_refer(root, n_images=(4, 3, 2, 2)),
    "retrieval": lambda root: make_retrieval(root, n_train=4, n_test=3),
    "vcr": lambda root: make_vcr(root, n_questions=(6, 4)),
}


def small_datasets(tmp_path_factory, names=tuple(SMALL_MAKERS)) -> dict:
    """{name: {root, data, vocab}} of SMALL_MAKERS' datasets (VCR's vocabulary holds its words)."""
    out = {}
    for name in names:
        root = tmp_path_factory.mktemp(name.replace("+", "p"))
        extra = VCR_WORDS if name == "vcr" else []
        out[name] = {"root": root, "data": SMALL_MAKERS[name](root), "vocab": write_vocab(root, extra)}
    return out
