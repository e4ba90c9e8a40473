"""VQA accuracy as the official evaluator computes it, and answers as the released preprocessing
normalises them.

The rules, read from GT-Vision-Lab/VQA `vqaEval.py` (`VQAEval.evaluate`, `processPunctuation`,
`processDigitArticle`) and from bottom-up-attention-vqa `tools/compute_softscore.py` (whose
3,129-answer vocabulary and soft scores vilbert-multi-task trains on):

- Every answer and the prediction: newlines and tabs become spaces, then outer spaces are stripped.
- Only when the human answers are not all identical (after that cleaning) are the answers and the
  prediction normalised further, punctuation first, then digits and articles:
  - punctuation: each of `PUNCTUATION` is deleted when it touches a space in the text, or when the
    text has a comma between two digits anywhere ("1,000" -> "1000"); otherwise it becomes a
    space. Apostrophes, `$`, `:`, `#`, `&`, `%`, `*` are kept. Then every period that is not
    followed by a digit is deleted (at most 32 of them: the official call passes `re.UNICODE` as
    the count), so "1.5" keeps its period and ".5" too;
  - digits and articles: lower case, split on whitespace, number words (and "none") become digits,
    `a`, `an`, `the` are dropped, `CONTRACTIONS` restores apostrophes ("dont" -> "don't").
- Accuracy of one question: for each human answer, min(1, matches among the *other* answers / 3),
  averaged over the answers (the official code leaves one answer dict out at a time; here one
  position). The reported accuracy is the mean over questions (the official summary rounds
  100 x that to two decimals).
- The released vocabulary and targets (`preprocess_answer`, `answer_score`): a training answer is
  normalised as above (always) and its commas removed; the vocabulary is the normalised
  `multiple_choice_answer`s given by at least 9 questions; a target counts each *raw* human answer
  string that is in the vocabulary, scored 0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / >= 4 annotators.
"""
from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as the official pattern reads: a period not followed by a digit
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")

# the official form of a contraction -> the spellings the evaluator maps to it. Keys with capitals
# (I'm, I've, I'd've) never match: the evaluator lower-cases the words before it looks them up.
_CONTRACTED = {
    "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve", "couldn't": "couldnt",
    "couldn't've": "couldn'tve couldnt've", "didn't": "didnt", "doesn't": "doesnt", "don't": "dont",
    "hadn't": "hadnt", "hadn't've": "hadn'tve hadnt've", "hasn't": "hasnt", "haven't": "havent", "he'd": "hed",
    "he'd've": "he'dve hed've", "he's": "hes", "how'd": "howd", "how'll": "howll", "how's": "hows",
    "I'd've": "I'dve Id've", "I'm": "Im", "I've": "Ive", "isn't": "isnt", "it'd": "itd",
    "it'd've": "it'dve itd've", "it'll": "itll", "let's": "let's", "ma'am": "maam", "might've": "mightve",
    "mightn't": "mightnt", "mightn't've": "mightn'tve mightnt've", "must've": "mustve", "mustn't": "mustnt",
    "needn't": "neednt", "not've": "notve", "o'clock": "oclock", "oughtn't": "oughtnt",
    "'ow's'at": "'ow'sat 'ows'at ow's'at", "shan't": "shant", "she'd've": "she'dve shed've", "she's": "she's",
    "should've": "shouldve", "shouldn't": "shouldnt", "shouldn't've": "shouldn'tve shouldnt've",
    "somebody'd've": "somebody'dve somebodyd've", "somebody'll": "somebodyll", "somebody's": "somebodys",
    "somebodyd": "somebody'd",  # sic: the official table maps this one the other way round
    "someone'd": "someoned", "someone'd've": "someone'dve someoned've", "someone'll": "someonell",
    "someone's": "someones", "something'd": "somethingd", "something'd've": "something'dve somethingd've",
    "something'll": "somethingll", "that's": "thats", "there'd": "thered", "there'd've": "there'dve thered've",
    "there're": "therere", "there's": "theres", "they'd": "theyd", "they'd've": "they'dve theyd've",
    "they'll": "theyll", "they're": "theyre", "they've": "theyve", "'twas": "twas", "wasn't": "wasnt",
    "we'd've": "we'dve wed've", "we've": "weve", "weren't": "werent", "what'll": "whatll", "what're": "whatre",
    "what's": "whats", "what've": "whatve", "when's": "whens", "where'd": "whered", "where's": "wheres",
    "where've": "whereve", "who'd": "whod", "who'd've": "who'dve whod've", "who'll": "wholl", "who's": "whos",
    "who've": "whove", "why'll": "whyll", "why're": "whyre", "why's": "whys", "won't": "wont",
    "would've": "wouldve", "wouldn't": "wouldnt", "wouldn't've": "wouldn'tve wouldnt've", "y'all": "yall",
    "y'all'd've": "y'all'dve y'alld've yall'd've", "y'all'll": "y'allll yall'll", "you'd": "youd",
    "you'd've": "you'dve youd've", "you'll": "youll", "you're": "youre", "you've": "youve",
}
CONTRACTIONS = {spelling: official for official, spellings in _CONTRACTED.items() for spelling in spellings.split()}


def clean(answer: str) -> str:
    """Newlines and tabs to spaces, outer whitespace stripped (every answer, always)."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    out = text
    delete = _COMMA_IN_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The evaluator's full normalisation of one answer (punctuation, then digits and articles)."""
    return process_digit_article(process_punctuation(clean(answer)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy of one predicted answer against the human answers, as `VQAEval.evaluate`."""
    if not answers:
        raise ValueError("a question without human answers cannot be scored")
    answers = [clean(a) for a in answers]
    prediction = clean(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    match = [a == prediction for a in answers]
    total = sum(match)
    return sum(min(1.0, (total - m) / 3.0) for m in match) / len(match)


def preprocess_answer(answer: str) -> str:
    """A training answer as the released preprocessing normalises it (vocabulary entries)."""
    return process_digit_article(process_punctuation(answer)).replace(",", "")


def answer_score(annotators: int) -> float:
    """The released soft score of an answer given by this many of the (ten) annotators."""
    return (0.0, 0.3, 0.6, 0.9)[annotators] if annotators < 4 else 1.0
