"""The official VQA accuracy and the released answer preprocessing (pipelines/tasks/vqa_eval.py):
one hand-made case per rule, each worked out by hand from the official code's rules."""
import pytest

from pipelines.tasks.vqa_eval import (
    CONTRACTIONS,
    answer_score,
    normalize_answer,
    preprocess_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


def test_leave_one_annotator_out():
    # 3 of 10 say "2": each of those 3 sees 2 others -> 2/3; each of the 7 sees 3 -> 1: (3 * 2/3 + 7) / 10
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("3", ["2"] * 3 + ["3"] * 7) == 1.0
    assert vqa_accuracy("4", ["2"] * 3 + ["3"] * 7) == 0.0
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)  # (1 * 0 + 9 * 1/3) / 10
    with pytest.raises(ValueError, match="without human answers"):
        vqa_accuracy("yes", [])


def test_identical_answers_are_not_normalised():
    # all ten say "Two": nothing is normalised, so "2" (and "two") do not match
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy("Two", ["Two"] * 10) == 1.0
    assert vqa_accuracy(" Two\n", ["Two"] * 10) == 1.0  # whitespace is cleaned always
    # one differs: every answer and the prediction are normalised: all "2"
    assert vqa_accuracy("2", ["Two"] * 9 + ["2"]) == 1.0


def test_none_is_zero_and_number_words_are_digits():
    assert normalize_answer("none") == "0" and normalize_answer("Ten") == "10"
    assert vqa_accuracy("0", ["none"] * 5 + ["zero"] * 5) == 1.0
    assert normalize_answer("eleven") == "eleven"  # only zero to ten


def test_commas_inside_numbers_delete_all_punctuation():
    assert process_punctuation("1,000") == "1000"
    assert vqa_accuracy("1,000", ["1,000"] * 4 + ["1000"] * 6) == 1.0
    assert process_punctuation("1,2/3") == "123"  # a digit-comma-digit anywhere: every mark is deleted
    assert process_punctuation("red,blue") == "red blue"  # otherwise a mark inside a word becomes a space
    assert process_punctuation("red, blue") == "red blue"  # and one touching a space is deleted
    assert process_punctuation("t-shirt") == "t shirt" and process_punctuation("yes!") == "yes "
    assert normalize_answer("yes!") == "yes"  # the space goes with the word split


@pytest.mark.parametrize("kept", ["$", ":", "#", "&", "'", "%", "*"])
def test_characters_the_evaluator_keeps(kept):
    assert process_punctuation(f"5{kept}") == f"5{kept}"
    # 8 say "5<mark>", 2 say "5": for "5", each "5" annotator sees 1 match (1/3), each other one 2 (2/3)
    assert vqa_accuracy("5", [f"5{kept}"] * 8 + ["5"] * 2) == pytest.approx(0.6)


def test_periods():
    assert process_punctuation(".5") == ".5"  # a period before a digit stays, leading or not
    assert process_punctuation("1.5") == "1.5" and process_punctuation("3.") == "3"
    assert process_punctuation("yes.") == "yes" and process_punctuation("a.m.") == "am"
    assert vqa_accuracy(".5", [".5"] * 8 + ["5"] * 2) == 1.0
    assert vqa_accuracy("5", [".5"] * 8 + ["5"] * 2) == pytest.approx(0.6)
    # the official call passes re.UNICODE (32) as the count: only the first 32 periods go
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8


def test_articles_case_and_contractions():
    assert process_digit_article("The Dog") == "dog" and process_digit_article("a an the") == ""
    assert normalize_answer("dont") == "don't" and normalize_answer("oclock") == "o'clock"
    assert normalize_answer("Im") == "im"  # the table's capitalised keys never match lower-cased words
    assert normalize_answer("somebody'd") == "somebodyd"  # the official table's reversed entry
    assert CONTRACTIONS["yall'd've"] == "y'all'd've" and len(CONTRACTIONS) == 120
    assert vqa_accuracy("don't", ["dont"] * 3 + ["do not"] * 7) == pytest.approx(0.9)


def test_released_preprocessing_and_soft_scores():
    assert preprocess_answer("Two") == "2" and preprocess_answer("1,000") == "1000"
    assert preprocess_answer("red, blue") == "red blue" and preprocess_answer("the dog.") == "dog"
    assert preprocess_answer("1,2 or 3,4") == "12 or 34" and preprocess_answer("red,blue") == "red blue"
    assert [answer_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
