"""VQA accuracy exactly as the official evaluation computes it (the VQA v2 / LAVIS `vqaEval` semantics), and
exact match for questions with too few annotator answers for it.

A predicted answer is normalised (punctuation, number words to digits, articles dropped, contractions
restored); each of the ten leave-one-out subsets of annotator answers scores min(#matches / 3, 1); the
question's accuracy is their mean. Annotator answers are normalised for punctuation only, and only when they
disagree, as the official code does. With one or two answers (GQA-style and most in-house sets) that formula
scores every prediction 0, since no other annotator is left to agree: such a question scores 1 when the
normalised prediction equals any normalised answer.
"""

from __future__ import annotations

import re

# The official table: apostrophe-less spellings -> the contraction (note the few odd entries, kept as they are).
_CONTRACTIONS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd
someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll
youre:you're youve:you've
"""
CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTIONS.split())
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, look-behind typo included
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # A mark next to a space (or any digit,digit in the answer) is deleted; elsewhere it becomes a space.
        if f"{mark} " in text or f" {mark}" in text or COMMA_STRIP.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    return process_digit_article(process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


MIN_ANNOTATORS = 3  # fewer answers than this: exact match
VQA_ACCURACY, EXACT_MATCH = "vqa_accuracy", "exact_match"


def scoring(annotator_answers: list[str]) -> str | None:
    """How a question is scored: the official formula, exact match, or None (no answers: it cannot be)."""
    if not annotator_answers:
        return None
    return VQA_ACCURACY if len(annotator_answers) >= MIN_ANNOTATORS else EXACT_MATCH


def exact_match(prediction: str, annotator_answers: list[str]) -> float:
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(answer) == predicted for answer in annotator_answers))


def question_score(prediction: str, annotator_answers: list[str]) -> float:
    """One question's score in [0, 1] by its `scoring`."""
    if scoring(annotator_answers) == VQA_ACCURACY:
        return vqa_accuracy(prediction, annotator_answers)
    return exact_match(prediction, annotator_answers)


def vqa_accuracy(prediction: str, annotator_answers: list[str]) -> float:
    """One question's accuracy in [0, 1] against its (usually ten) annotator answers."""
    predicted = normalize_answer(prediction)
    answers = list(annotator_answers)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    scores = []
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        scores.append(min(1.0, sum(a == predicted for a in others) / 3))
    return sum(scores) / len(scores)
