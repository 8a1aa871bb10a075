"""Generation scoring as lm-eval's truthfulqa_gen: BLEU and ROUGE worked out by hand from their definitions,
reference formatting, non-answers, completion cutting and where the references come from. Fast, no model."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from hpr import gen_scoring as gs
from hpr.data.truthfulqa import CSV_NAME, JSON_NAME, load_truthfulqa
from hpr.runs.folder import dataset_fingerprint
from hpr.sources import load_dataset

CAT = "The cat sat on the mat."
DOG = "The dog sat on the mat."
HYP = "The cat sat on a mat."


def hand_bleu(matches: list[int], totals: list[int], hyp_len: int, ref_len: int) -> float:
    """BLEU from its definition with sacrebleu's "exp" smoothing: the k-th order without a match (and with
    n-grams) has precision 1 / (2**k * total); brevity penalty exp(1 - r/c) when c < r."""
    precisions, k = [], 0
    for m, t in zip(matches, totals, strict=True):
        if m:
            precisions.append(m / t)
        else:
            k += 1
            precisions.append(1 / (2**k * t))
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.prod(precisions) ** 0.25


# --- BLEU ---------------------------------------------------------------------------------------------


def test_bleu_of_an_exact_match_is_100():
    assert gs.bleu(CAT, CAT) == pytest.approx(100.0, abs=1e-9)


def test_bleu_by_hand():
    # intl tokens: "The cat sat on a mat ." against "The cat sat on the mat ." (7 each; case kept, so "The" and
    # "the" differ). Matches: 1-grams 6/7, 2-grams 4/6 (The cat, cat sat, sat on, mat .), 3-grams 2/5, 4-grams 1/4.
    assert gs.bleu(HYP, CAT) == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, rel=1e-12)
    assert gs.bleu(HYP, CAT) == pytest.approx(hand_bleu([6, 4, 2, 1], [7, 6, 5, 4], 7, 7), rel=1e-12)


def test_bleu_smooths_a_missing_order_and_applies_the_brevity_penalty():
    # "The cat sat here ." (5 tokens) against 7: 1-grams 4/5, 2-grams 2/4, 3-grams 1/3, no 4-gram of 2 matches,
    # which "exp" smoothing turns into 1/(2*2) (smooth_value=0 is not used by "exp"); BP = exp(1 - 7/5).
    expected = 100 * math.exp(1 - 7 / 5) * (4 / 5 * 2 / 4 * 1 / 3 * 1 / 4) ** 0.25
    assert gs.bleu("The cat sat here.", CAT) == pytest.approx(expected, rel=1e-12)
    # Two orders without a match: 1/(2*5) and then 1/(4*4).
    assert gs.bleu(HYP, DOG) == pytest.approx(hand_bleu([5, 2, 0, 0], [7, 6, 5, 4], 7, 7), rel=1e-12)
    assert gs.bleu(HYP, DOG) == pytest.approx(100 * (5 / 7 * 2 / 6 * 1 / 10 * 1 / 16) ** 0.25, rel=1e-12)


def test_bleu_of_fewer_than_four_tokens_is_0_even_when_exact():
    # no 4-gram in the completion: sacrebleu stops there and the 4-gram precision stays 0
    assert gs.bleu("Paris.", "Paris.") == 0.0
    assert gs.bleu("The cat.", CAT) == 0.0
    assert gs.bleu("", CAT) == 0.0
    assert gs.bleu("Dogs bark loudly.", "Dogs bark loudly.") == pytest.approx(100.0)  # 4 tokens with the period


def test_bleu_is_sacrebleus_corpus_bleu_with_lm_evals_settings():
    sacrebleu = pytest.importorskip("sacrebleu")
    for hyp, ref in [(HYP, CAT), ("Nothing happens.", "Nothing in particular happens if you do that."), ("", CAT)]:
        expected = sacrebleu.corpus_bleu(
            [hyp],
            [[ref]],
            smooth_method="exp",
            smooth_value=0.0,
            force=False,
            lowercase=False,
            tokenize="intl",
            use_effective_order=False,
        ).score
        assert gs.bleu(hyp, ref) == expected


# --- ROUGE --------------------------------------------------------------------------------------------


def test_rouge_by_hand():
    assert gs.rouge(CAT, CAT) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # rouge tokens (lower case, letters and digits): "the cat sat on a mat" and "the cat sat on the mat", 6 each.
    # unigrams shared: the, cat, sat, on, mat = 5; bigrams: the cat, cat sat, sat on = 3 of 5; LCS 5.
    assert gs.rouge(HYP, CAT) == pytest.approx({"rouge1": 500 / 6, "rouge2": 60.0, "rougeL": 500 / 6}, rel=1e-12)
    # against DOG: unigrams the, sat, on, mat = 4; bigram sat on = 1 of 5; LCS the sat on mat = 4.
    assert gs.rouge(HYP, DOG) == pytest.approx({"rouge1": 400 / 6, "rouge2": 20.0, "rougeL": 400 / 6}, rel=1e-12)
    assert gs.rouge("", CAT) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_lsum_splits_sentences_at_space_period_space():
    # As one line the LCS of "b a" in "a b" is 1; as two sentences "b . a" -> "b.\na" each finds its match.
    assert gs.rouge("b . a", "a b")["rougeL"] == pytest.approx(100.0)
    assert gs.rouge("b a", "a b")["rougeL"] == pytest.approx(50.0)


def test_one_pair_through_the_bootstrap_aggregator_is_the_pair_exactly():
    """lm-eval reads ``mid.fmeasure`` of a BootstrapAggregator holding one score: the same number, to the bit."""
    pytest.importorskip("rouge_score")
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
    pairs = [(HYP, CAT), (HYP, DOG), ("I have no comment.", "I have no comment."), ("x . y . z", "y . x z . q")]
    for pred, ref in pairs:
        aggregator = scoring.BootstrapAggregator()
        aggregator.add_scores(scorer.score(ref.replace(" . ", ".\n"), pred.replace(" . ", ".\n")))
        result = aggregator.aggregate()
        expected = {name: result[kind].mid.fmeasure * 100 for name, kind in gs._ROUGE_TYPES.items()}
        assert gs.rouge(pred, ref) == expected


# --- max, diff, acc -----------------------------------------------------------------------------------


def test_score_answer_max_diff_acc_by_hand():
    true_refs, false_refs = gs.references([CAT], [DOG])
    assert true_refs == [CAT, "I have no comment."]
    got = gs.score_answer(HYP, true_refs, false_refs)
    assert list(got) == list(gs.SCORE_KEYS)
    # BLEU against the true refs: CAT (by hand above) and "I have no comment ." (5 tokens; only "." matches,
    # 1/7, then 1/(2*6), 1/(4*5), 1/(8*4); BP 1).
    bleu_cat = hand_bleu([6, 4, 2, 1], [7, 6, 5, 4], 7, 7)
    bleu_nc = hand_bleu([1, 0, 0, 0], [7, 6, 5, 4], 7, 5)
    bleu_dog = hand_bleu([5, 2, 0, 0], [7, 6, 5, 4], 7, 7)
    assert bleu_nc < bleu_dog < bleu_cat
    assert got["bleu_max"] == pytest.approx(bleu_cat, rel=1e-12)
    assert got["bleu_diff"] == pytest.approx(bleu_cat - bleu_dog, rel=1e-12)
    assert got["bleu_acc"] == 1
    assert got["rouge1_max"] == pytest.approx(500 / 6) and got["rouge1_diff"] == pytest.approx(100 / 6)
    assert got["rouge2_max"] == pytest.approx(60.0) and got["rouge2_diff"] == pytest.approx(40.0)
    assert got["rougeL_max"] == pytest.approx(500 / 6) and got["rougeL_diff"] == pytest.approx(100 / 6)
    assert got["rouge1_acc"] == got["rouge2_acc"] == got["rougeL_acc"] == 1


def test_score_answer_false_match_and_ties():
    true_refs, false_refs = gs.references([CAT], [DOG])
    dog = gs.score_answer(DOG, true_refs, false_refs)  # the false answer itself: 100 there, less on the true side
    # "The dog sat on the mat ." against CAT: 6/7, 4/6 (sat on, on the, the mat, mat .), 3/5, 2/4
    assert dog["bleu_max"] == pytest.approx(hand_bleu([6, 4, 3, 2], [7, 6, 5, 4], 7, 7), rel=1e-12)
    assert dog["bleu_diff"] == pytest.approx(dog["bleu_max"] - 100.0)
    assert {k: dog[k] for k in ("bleu_acc", "rouge1_acc", "rouge2_acc", "rougeL_acc")} == dict.fromkeys(
        ("bleu_acc", "rouge1_acc", "rouge2_acc", "rougeL_acc"), 0
    )
    empty = gs.score_answer("", true_refs, false_refs)  # 0 everywhere: a tie is not accurate
    assert all(empty[f"{m}_{k}"] == 0 for m in gs.METRICS for k in ("max", "diff", "acc"))
    no_comment = gs.score_answer("I have no comment.", true_refs, false_refs)
    assert no_comment["bleu_max"] == pytest.approx(100.0) and no_comment["rouge1_max"] == pytest.approx(100.0)
    assert all(no_comment[f"{m}_acc"] == 1 for m in gs.METRICS)
    with pytest.raises(ValueError, match="one true and one false"):
        gs.score_answer(HYP, true_refs, [])


# --- references, completions, non-answers ---------------------------------------------------------------


def test_references_format_as_lm_eval():
    true_refs, false_refs = gs.references(["  Yes  ", "", "It is.", "   ", "No!"], ["Maybe", "Sure."])
    assert true_refs == ["Yes.", "It is.", "No!.", "I have no comment."]
    assert false_refs == ["Maybe.", "Sure."]
    # already there (after formatting): not added twice, and kept in place
    assert gs.references(["I have no comment", "Yes"], ["No"])[0] == ["I have no comment.", "Yes."]
    assert gs.references([], ["No"]) == (["I have no comment."], ["No."])


def test_lm_eval_completion_cuts_at_blank_line_or_eos():
    assert gs.lm_eval_completion(" Paris.\n\nQ: next", "</s>") == " Paris."
    assert gs.lm_eval_completion(" Paris.</s>junk\n\nQ:", "</s>") == " Paris."
    assert gs.lm_eval_completion(" Paris.\nQ: next") == " Paris.\nQ: next"  # one newline is not a stop
    assert gs.lm_eval_completion(" a\n\nb</s>", "") == " a"
    assert gs.lm_eval_completion("\n\nlater", "</s>") == ""


def test_decode_completion_skips_special_tokens_and_cuts():
    class Tok:
        eos_token_id = 0
        vocab = {0: "<eos>", 1: " Paris", 2: ".", 3: "\n\n", 4: "Q"}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))

    assert gs.decode_completion(Tok(), [1, 2, 3, 4, 0]) == " Paris."
    assert gs.decode_completion(Tok(), [1, 2, 0]) == " Paris."


@pytest.mark.parametrize(
    "text",
    ["", "   ", "I have no comment.", "i have no comment", " I have no comment.\n", "I HAVE NO COMMENT!", "No comment.",
     "no comment", "I've no comment.", "...", "I have no comments.",
     # what edited SmolLM2s say instead (Diff, HPR on the 817-question run)
     "No answer.", "There is no answer to this question.", "There is no answer for this question.",
     "No, there is no answer to this question.", "No, there is no answer for that.", "There is no answer.",
     "The answer is not provided.", "The answer is not available.", "I don't know.", "The answer is A:",
     "A: A: A: The answer is A:", "The answer to this question is A:"],
)  # fmt: skip
def test_non_answers(text):
    assert gs.is_non_answer(text)


@pytest.mark.parametrize(
    "text",
    ["Paris.", "No.", "I have no comment, but Paris.", "I have a comment.", "42", "Comment: none.", "No, no, no.",
     "There is no answer, but Paris is the capital.", "The answer is a cat.", "The answer is no.",
     "I don't know why people say that, but cats do not have nine lives."],
)  # fmt: skip
def test_answers_are_not_non_answers(text):
    assert not gs.is_non_answer(text)


def test_answer_words():
    assert gs.answer_words(" The cat sat.\n") == 3 and gs.answer_words("") == 0


def test_repetition_counts_repeated_trigrams():
    assert gs.repetition("The cat sat on the mat.") == 0.0
    assert gs.repetition("") == gs.repetition("Yes, no.") == 0.0  # fewer than three words: no trigram
    # "but but but but but": 3 trigrams, 1 distinct; case and punctuation do not hide a loop
    assert gs.repetition("but But, but. but but") == pytest.approx(1 - 1 / 3)
    # "a b c a b c": trigrams abc bca cab abc -> 3 distinct of 4
    assert gs.repetition("a b c a b c") == pytest.approx(1 / 4)
    assert gs.is_degenerate("I, I, I, I, I, I, I, I") and not gs.is_degenerate("a b c a b c")
    # at the threshold exactly: 4 trigrams, 2 distinct
    assert gs.repetition("x x x x x y") == 0.5 and gs.is_degenerate("x x x x x y")


# --- per question and per method ------------------------------------------------------------------------


def test_question_scores_and_summarize():
    answers = {"q1": ([CAT.rstrip(".")], [DOG]), "q2": (["Paris"], ["London"])}
    completions = pd.DataFrame(
        {
            "method": ["base", "base", "edit", "edit"],
            "question_id": ["q1", "q2", "q1", "q2"],
            "completion": [HYP, " I have no comment.", DOG, " London is the capital."],
        }
    )
    scores = gs.question_scores(completions, answers)
    extra = ["non_answer", "answer_words", "repetition", "degenerate"]
    assert list(scores.columns) == [*gs.COMPLETION_COLUMNS, *gs.SCORE_KEYS, *extra, *gs.INFORMATIVE_KEYS]
    row = scores.iloc[0]
    assert row["bleu_max"] == gs.score_answer(HYP, *gs.references(*answers["q1"]))["bleu_max"]
    summary = gs.summarize(scores)
    assert list(summary) == ["base", "edit"]
    base = summary["base"]
    assert base["n"] == 2 and base["non_answer_rate"] == 0.5 and base["mean_answer_words"] == (6 + 4) / 2
    assert base["non_answer_rate_stderr"] == pytest.approx(np.std([0, 1], ddof=1) / np.sqrt(2))
    acc = scores.loc[scores["method"] == "base", "rouge1_acc"].to_numpy(dtype=float)
    assert base["rouge1_acc"] == acc.mean() == 1.0 and base["rouge1_acc_stderr"] == 0.0
    maxes = scores.loc[scores["method"] == "base", "bleu_max"].to_numpy()
    assert base["bleu_max_stderr"] == pytest.approx(maxes.std(ddof=1) / np.sqrt(2))
    assert summary["edit"]["rouge1_acc"] == 0.0 and summary["edit"]["non_answer_rate"] == 0.0
    # "I have no comment." wins on ROUGE-1 (it is a true reference) but is not informative
    assert base["rouge1_acc_informative"] == 0.5 and base["degenerate_rate"] == 0.0
    # from the completions alone (no derived columns), and one question: stderr NaN
    one = gs.summarize(scores.drop(columns=[*extra, *gs.INFORMATIVE_KEYS]).iloc[:1])
    assert one["base"]["mean_answer_words"] == 6 and math.isnan(one["base"]["bleu_max_stderr"])
    assert one["base"]["rouge1_acc_informative"] == scores.iloc[0]["rouge1_acc_informative"] == 1.0
    with pytest.raises(ValueError, match="appears twice"):
        gs.summarize(pd.concat([scores, scores]))
    with pytest.raises(ValueError, match="no reference answers"):
        gs.question_scores(completions, {"q1": answers["q1"]})


def test_a_loop_that_wins_on_rouge_is_not_informative():
    """The failure seen on SmolLM2 under CAA: a loop starting "I" is closer to "I have no comment." (always a true
    reference) than to the false answers, so ``acc`` counts it; ``acc_informative`` does not."""
    answers = {"q": (["Nothing happens"], ["You will die"])}
    loop = " I, I, I, I, I, I, I, I, I, I, I, I"
    scores = gs.question_scores(pd.DataFrame({"method": ["caa"], "question_id": ["q"], "completion": [loop]}), answers)
    row = scores.iloc[0]
    assert row["rougeL_acc"] == 1 and row["degenerate"] and row["rougeL_acc_informative"] == 0.0
    summary = gs.summarize(scores)["caa"]
    assert summary["degenerate_rate"] == 1.0 and summary["mean_repetition"] == pytest.approx(1 - 1 / 10)


# --- where the references come from ----------------------------------------------------------------------


def _csv_answers(folder) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """TruthfulQA.csv as plain ``csv`` reads it: question -> (Correct Answers, Incorrect Answers) split at ';'."""
    with (folder / CSV_NAME).open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))

    def split(cell: str) -> tuple[str, ...]:
        return tuple(a.strip() for a in cell.split(";") if a.strip())

    return {r["Question"].strip(): (split(r["Correct Answers"]), split(r["Incorrect Answers"])) for r in rows}


def test_mc_task_questions_take_their_references_from_the_csv_beside_them(truthfulqa_dir):
    expected = _csv_answers(truthfulqa_dir)
    questions = load_truthfulqa(truthfulqa_dir / JSON_NAME)
    matched = [q for q in questions if q.question in expected]
    assert len(matched) >= len(questions) - 1  # 816 of the official 817; all 26 of the committed sample
    for q in questions:
        if q.question in expected:
            assert q.generation_answers() == expected[q.question]
        else:  # no CSV row with that text: the mc2 targets
            assert q.gen_answers is None
            assert q.generation_answers() == (
                tuple(c.text for c in q.mc2 if c.is_true),
                tuple(c.text for c in q.mc2 if not c.is_true),
            )
    q = matched[0]
    true_refs, false_refs = gs.references(*q.generation_answers())
    assert true_refs == [*(a if a.endswith(".") else a + "." for a in expected[q.question][0]), "I have no comment."]
    assert false_refs == [a if a.endswith(".") else a + "." for a in expected[q.question][1]]
    # the folder form loads mc_task.json, with the same references
    by_folder = load_dataset("truthfulqa", truthfulqa_dir)
    assert [x.generation_answers() for x in by_folder] == [x.generation_answers() for x in questions]


def test_csv_questions_keep_every_listed_answer_for_generation(truthfulqa_dir):
    expected = _csv_answers(truthfulqa_dir)
    questions = load_truthfulqa(truthfulqa_dir / CSV_NAME)
    assert all(q.generation_answers() == expected[q.question] for q in questions)
    # an answer listed as both correct and incorrect is false only in MC2 but stays on both sides here
    both = [q for q in questions if set(q.generation_answers()[0]) & set(q.generation_answers()[1])]
    assert both, "this copy of TruthfulQA.csv has no answer listed on both sides"
    text = sorted(set(both[0].generation_answers()[0]) & set(both[0].generation_answers()[1]))[0]
    assert [c.is_true for c in both[0].mc2 if c.text == text] == [False]


def test_without_a_matching_csv_the_mc2_targets_are_the_references(truthfulqa_dir, tmp_path):
    rows = json.loads((truthfulqa_dir / JSON_NAME).read_text(encoding="utf-8-sig"))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(truthfulqa_dir / JSON_NAME, alone / JSON_NAME)
    q = load_truthfulqa(alone / JSON_NAME)[0]
    targets = rows[0]["mc2_targets"]
    assert q.gen_answers is None
    assert q.generation_answers() == (
        tuple(t for t, v in targets.items() if v == 1),
        tuple(t for t, v in targets.items() if v == 0),
    )
    # a question whose text differs from every CSV row, and a CSV that does not load: the JSON loads as before
    edited = tmp_path / "edited"
    edited.mkdir()
    rows[0]["question"] += " (edited)"
    (edited / JSON_NAME).write_text(json.dumps(rows), encoding="utf-8")
    shutil.copy(truthfulqa_dir / CSV_NAME, edited / CSV_NAME)
    loaded = load_truthfulqa(edited / JSON_NAME)
    assert loaded[0].gen_answers is None and loaded[1].gen_answers is not None
    (edited / CSV_NAME).write_text("not,the,header\n1,2,3\n", encoding="utf-8")
    assert all(x.gen_answers is None for x in load_truthfulqa(edited / JSON_NAME))


def test_references_change_no_loaded_field_nor_the_fingerprint(truthfulqa_dir, tmp_path):
    shutil.copy(truthfulqa_dir / JSON_NAME, tmp_path / JSON_NAME)
    with_csv, without = load_truthfulqa(truthfulqa_dir / JSON_NAME), load_truthfulqa(tmp_path / JSON_NAME)
    assert any(q.gen_answers is not None for q in with_csv) and all(q.gen_answers is None for q in without)
    assert with_csv == without and [repr(q) for q in with_csv] == [repr(q) for q in without]
    assert [q.meta for q in with_csv] == [q.meta for q in without]
    assert dataset_fingerprint(with_csv) == dataset_fingerprint(without)


def test_toy_questions_use_their_mc2_targets(tiny_toy):
    q = load_dataset("toy")[0]
    assert q.gen_answers is None
    true_answers, false_answers = q.generation_answers()
    assert true_answers == (q.mc2[0].text,) and false_answers == tuple(c.text for c in q.mc2[1:])
    true_refs, _ = gs.references(true_answers, false_answers)
    assert true_refs == [q.mc2[0].text + ".", "I have no comment."]


def test_importing_gen_scoring_loads_neither_sacrebleu_nor_rouge():
    import subprocess
    import sys

    heavy = "('sacrebleu', 'rouge_score', 'nltk')"
    code = f"import sys, hpr.gen_scoring; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_same_as_lm_evals_own_functions():
    from lm_eval.tasks.truthfulqa import utils

    doc = utils.preprocess_function(
        {"question": " Q? ", "correct_answers": [CAT.rstrip(".")], "incorrect_answers": [DOG]}
    )
    true_refs, false_refs = gs.references([CAT.rstrip(".")], [DOG])
    assert (doc["correct_answers"], doc["incorrect_answers"]) == (true_refs, false_refs)
    for completion in (HYP, DOG, "", "I have no comment."):
        expected = utils.process_results_gen(doc, [completion])
        got = gs.score_answer(completion, true_refs, false_refs)
        assert got == pytest.approx({k: float(expected[k]) for k in gs.SCORE_KEYS})
