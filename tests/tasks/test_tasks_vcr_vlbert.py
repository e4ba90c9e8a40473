"""VCR on a VL-BERT as the official VL-BERT code prepares it (vcr/data/datasets/vcr.py: VCRDataset,
vcr/modules/resnet_vlbert_for_vcr.py: prepare_text_from_qa, _collect_obj_reps; cfgs/vcr/base_*): a
question with a two-object reference and people's names worked by hand (words, segments, tags, the
truncation), the regions (the whole image and the ground-truth boxes) and each word's visual element."""
import json

import numpy as np
import torch

from pipelines.tasks.base import TaskOptions
from pipelines.tasks.text import load_tokenizer
from pipelines.tasks.vcr import VCRTask, load_vcr_split
from pipelines.tasks.vcr_vlbert import GENDER_NEUTRAL_NAMES, WORD_BUDGET, person_names, vlbert_rows
from vilbert import ViLBert, load_preset

from tasks_data import VCR_WORDS, vcr_key, vocab_size, write_names_table, write_shards, write_vocab

ANSWERS = [["It", "is", "red", "."], ["It", "is", [0], "and", "it", "looks", "at", "the", [1], "."], ["stars", "."],
           [[2], "is", "blue", "."]]
QUESTION = ["[CLS]", "what", "colour", "is", "quinn", "and", "casey", "with", "the", "circle", "?", "[SEP]"]
Q_TAGS = [0, 0, 0, 0, 1, 0, 3, 0, 0, 2, 0, 0]  # object k -> k + 1 (0: the whole image); "and" names none
A1 = ["it", "is", "quinn", "and", "it", "looks", "at", "the", "circle", "."]
A1_TAGS = [0, 0, 1, 0, 0, 0, 0, 0, 2, 0]


def hand_item(tmp_path):
    """One VCR line (the release's fields): objects person, circle, person; "What colour is [0, 2] with
    the [1] ?"; right answer 1."""
    row = {"annot_id": "val-7", "img_fn": "lsmdc_0001_X/0001_X_00.01.02.003-00.01.04.005@1.jpg",
           "metadata_fn": "lsmdc_0001_X/0001_X_00.01.02.003-00.01.04.005@1.json",
           "objects": ["person", "circle", "person"],
           "question": ["What", "colour", "is", [0, 2], "with", "the", [1], "?"], "answer_choices": ANSWERS,
           "rationale_choices": [["It", "is", "."], [[1], "is", "red", "."], ["It", "looks", "at", [2], "."], ["?"]],
           "answer_label": 1, "rationale_label": 2}
    data = tmp_path / "hand"
    data.mkdir()
    write_names_table(data, ["Casey"])  # read by the task, used by ViLBERT only
    (data / "val.jsonl").write_text(json.dumps(row) + "\n")
    return data, load_vcr_split(data, "val")[0]


def test_vlbert_text_of_a_question_worked_by_hand(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path, VCR_WORDS + ["quinn"]))
    _, item = hand_item(tmp_path)
    names = person_names(item["objects"], 12)  # the people in turn from the 13th name: Quinn, then Casey again
    assert names == ["Quinn", "circle", "Casey"] and len(GENDER_NEUTRAL_NAMES) == 13

    def words(ids):
        return tok.convert_ids_to_tokens(ids)

    q2a = vlbert_rows(tok, item, "q2a", None, names, WORD_BUDGET)
    ids, segments, tags = q2a[1]
    assert words(ids) == QUESTION + A1 + ["[SEP]"]  # [0, 2] -> "quinn and casey"
    assert segments == [0] * 12 + [1] * 11  # segment 0 up to and with the first [SEP]
    assert tags == Q_TAGS + A1_TAGS + [0]
    assert words(q2a[2][0])[12:] == ["star", "##s", ".", "[SEP]"]  # one tokenization (ViLBERT's: star # # s)
    assert q2a[3][2][12:] == [3, 0, 0, 0, 0]  # [2] is blue .
    # QA->R: question and right answer one sentence (no [SEP] between them), then the rationale
    ids, segments, tags = vlbert_rows(tok, item, "qa2r", None, names, WORD_BUDGET)[2]  # "It looks at [2] ."
    assert words(ids) == QUESTION[:-1] + A1 + ["[SEP]", "it", "looks", "at", "casey", ".", "[SEP]"]
    assert segments == [0] * 22 + [1] * 6 and tags == Q_TAGS[:-1] + A1_TAGS + [0, 0, 0, 0, 3, 0, 0]

    # the official truncation, 12 words (--max-seq-length 15): for answer 0 the question (10) loses 2
    # pieces; for answer 1 (10) the longer of the two loses one in turn, down to 6 + 6. The question is
    # one list: answer 0's row has lost those pieces too
    q2a = vlbert_rows(tok, item, "q2a", None, names, 12)
    assert words(q2a[0][0]) == QUESTION[:7] + ["[SEP]", "it", "is", "red", ".", "[SEP]"]
    assert words(q2a[1][0]) == QUESTION[:7] + ["[SEP]"] + A1[:6] + ["[SEP]"]
    assert q2a[1][2] == Q_TAGS[:7] + [0] + A1_TAGS[:6] + [0]
    # QA->R (rationales of 3, 4, 5, 1 pieces): the rationale is cut while longer than question + answer,
    # else the question (down to one piece), else the answer: rationale 0 leaves 1 + 8, rationale 1
    # 1 + 7, rationale 2 1 + 6, shared by the 4 rows
    rows = vlbert_rows(tok, item, "qa2r", None, names, 12)
    assert [len(ids) - 3 for ids, _, _ in rows] == [1 + 6 + 3, 1 + 6 + 4, 1 + 6 + 5, 1 + 6 + 1]
    assert words(rows[2][0]) == ["[CLS]", "what"] + A1[:6] + ["[SEP]", "it", "looks", "at", "casey", ".", "[SEP]"]
    unlabelled = {**item, "answer_label": None, "rationale_label": None}  # the official test mode: no cut
    assert [len(ids) for ids, _, _ in vlbert_rows(tok, unlabelled, "qa2r", 1, names, 12)] == [26, 27, 28, 24]


def test_vlbert_regions_are_the_whole_image_and_the_objects_and_words_carry_their_object(tmp_path):
    data, item = hand_item(tmp_path)
    vocab = write_vocab(tmp_path, VCR_WORDS + ["quinn"])
    key = vcr_key(item["img_fn"])
    write_shards(tmp_path / "det", {key: (np.array([[1.0] * 4, [3.0] * 4]),
                                          np.array([[0, 0, 50, 50], [50, 50, 100, 100]], np.float32))})
    write_shards(tmp_path / "gt", {key: (np.array([[5.0] * 4, [7.0] * 4, [9.0] * 4]),  # objects 0, 1, 2
                                         np.array([[0, 0, 100, 50], [10, 10, 20, 20], [0, 50, 25, 100]], np.float32))},
                 mode="gt-boxes")
    opts = TaskOptions(data=data, features=tmp_path / "det", out=tmp_path, tokenizer=vocab,
                       extra={"gt_features": tmp_path / "gt"})
    torch.manual_seed(0)
    model = ViLBert(load_preset("vlbert-tiny", vocab_size=vocab_size(VCR_WORDS + ["quinn"]), v_feature_size=4,
                                v_target_size=5, max_position_embeddings=96)).eval()
    task = VCRTask(opts)
    task.prepare(model)
    assert task.head() == ("vcr", "cls_linear", 1)
    # the official VCR boxes: the whole image (our [IMG], the same mean as ViLBERT's), then every object's
    # ground-truth box in the order of `objects`; no detections
    feats, loc, first, n = task.regions_and_objects(key)
    assert np.allclose(feats[:, 0], [34 / 7, 5, 7, 9]) and (first, n) == (1, 3)
    assert np.allclose(loc[0], [0, 0, 1, 1, 1]) and np.allclose(loc[1], [0, 0, 1, 0.5, 0.5])

    seen = set()  # the names: the official 13, the people in turn from a first one drawn per question
    for seed in range(8):
        task.opts.seed = seed
        person, circle, other = task.names(item, "q2a")
        assert circle == "circle" and other == GENDER_NEUTRAL_NAMES[(GENDER_NEUTRAL_NAMES.index(person) + 1) % 13]
        assert task.names(item, "q2a") == [person, circle, other]  # the same in every epoch
        seen.add(person)
    assert len(seen) > 1

    batch = task.make_batch([(item, "q2a", None), (item, "qa2r", None)])
    visual = batch["text_visual_index"]  # (8, T)
    assert visual.shape == batch["input_ids"].shape and batch["image_feat"].shape == (8, 4, 4)
    assert visual[1, :23].tolist() == Q_TAGS + A1_TAGS + [0] and not visual[1, 23:].any()  # padding: 0
    assert visual[6, :28].tolist() == Q_TAGS[:-1] + A1_TAGS + [0, 0, 0, 0, 3, 0, 0]
    with torch.no_grad():
        model.backbone.embeddings.text_visual_norm.weight.fill_(1.0)  # (0 at init: words would see no image)
        grounded = task.scores(model, batch)
        whole = task.scores(model, {k: v for k, v in batch.items() if k != "text_visual_index"})
    assert grounded.shape == (2, 4) and not torch.allclose(grounded, whole)  # the index reaches the model

    opts.max_regions = 3  # object 2's region cut: its words carry the whole image
    task = VCRTask(opts)
    task.prepare(model)
    visual = task.make_batch([(item, "q2a", None)])["text_visual_index"]
    assert visual[1, :23].tolist() == [t if t <= 2 else 0 for t in Q_TAGS + A1_TAGS + [0]]
    opts.extra, opts.max_regions = {}, 101  # without --gt-boxes: the detections, every word the whole image
    task = VCRTask(opts)
    task.prepare(model)
    batch = task.make_batch([(item, "q2a", None)])
    assert batch["image_feat"].shape == (4, 3, 4) and not batch["text_visual_index"].any()
