"""MC1/MC2 metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hpr.metrics import flip_rates, question_scores, summarize


def _rows(method: str, qid: str, task: str, lls: list[float], true_idx: set[int]) -> list[dict]:
    return [
        {"method": method, "question_id": qid, "task": task, "choice": i, "is_true": i in true_idx, "loglik": ll}
        for i, ll in enumerate(lls)
    ]


def _frame(*groups: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for g in groups for r in g])


@pytest.fixture
def two_questions() -> pd.DataFrame:
    """Two questions, methods "base" and "edit".

    base q1: mc1 ll [-1, -2, -3] true=0      -> argmax 0 (true)  -> mc1 = 1
             mc2 ll [ln .2, ln .3, ln .5] true={0,1} -> mc2 = (.2+.3)/1.0 = 0.5
    base q2: mc1 ll [-3, -1] true=0          -> argmax 1 (false) -> mc1 = 0
             mc2 ll [ln 1, ln 3] true={0}    -> mc2 = 1/4 = 0.25
    edit q1: mc1 ll [-5, -1, -2] true=0      -> mc1 = 0;  mc2 ll [0, 0, 0] true={0} -> 1/3
    edit q2: mc1 ll [-1, -2] true=0          -> mc1 = 1;  mc2 ll [ln 3, ln 1] true={0} -> 3/4
    """
    ln = math.log
    return _frame(
        _rows("base", "q1", "mc1", [-1, -2, -3], {0}),
        _rows("base", "q1", "mc2", [ln(0.2), ln(0.3), ln(0.5)], {0, 1}),
        _rows("base", "q2", "mc1", [-3, -1], {0}),
        _rows("base", "q2", "mc2", [ln(1), ln(3)], {0}),
        _rows("edit", "q1", "mc1", [-5, -1, -2], {0}),
        _rows("edit", "q1", "mc2", [0, 0, 0], {0}),
        _rows("edit", "q2", "mc1", [-1, -2], {0}),
        _rows("edit", "q2", "mc2", [ln(3), ln(1)], {0}),
    )


def test_question_scores_by_hand(two_questions):
    s = question_scores(two_questions)
    assert list(s.columns) == ["method", "question_id", "mc1", "mc2"]
    got = {(r.method, r.question_id): (r.mc1, r.mc2) for r in s.itertuples()}
    assert got[("base", "q1")] == pytest.approx((1.0, 0.5))
    assert got[("base", "q2")] == pytest.approx((0.0, 0.25))
    assert got[("edit", "q1")] == pytest.approx((0.0, 1 / 3))
    assert got[("edit", "q2")] == pytest.approx((1.0, 0.75))
    assert s["mc1"].dtype == float


def test_summarize_by_hand(two_questions):
    out = summarize(question_scores(two_questions))
    # base: mc1 [1, 0] -> mean .5, sample std sqrt(.5), stderr sqrt(.5)/sqrt(2) = .5
    #       mc2 [.5, .25] -> mean .375, sample std .25/sqrt(2), stderr (.25/sqrt(2))/sqrt(2) = .125
    assert out["base"] == pytest.approx({"mc1": 0.5, "mc1_stderr": 0.5, "mc2": 0.375, "mc2_stderr": 0.125, "n": 2})
    # edit: mc1 [0, 1] -> .5, stderr .5; mc2 [1/3, 3/4] -> mean 13/24, stderr |3/4 - 1/3| / 2 = 5/24
    assert out["edit"] == pytest.approx({"mc1": 0.5, "mc1_stderr": 0.5, "mc2": 13 / 24, "mc2_stderr": 5 / 24, "n": 2})


def test_flip_rates_by_hand(two_questions):
    # base mc1 (q1, q2) = (1, 0); edit = (0, 1): q1 true->false, q2 false->true.
    out = flip_rates(question_scores(two_questions))
    assert out == {
        "edit": pytest.approx({"false_to_true": 0.5, "true_to_false": 0.5, "remains_true": 0.0, "remains_false": 0.0})
    }


def test_flip_rates_needs_same_questions(two_questions):
    scores = question_scores(two_questions)
    with pytest.raises(ValueError, match="cover different questions"):
        flip_rates(scores[~((scores["method"] == "edit") & (scores["question_id"] == "q2"))])
    with pytest.raises(ValueError, match="base method 'orig' not in scores"):
        flip_rates(scores, base="orig")


def test_mc1_ties_go_to_first_choice():
    # A tie between the true choice (index 0, lm-eval order) and a false one counts as correct ...
    df = _frame(_rows("m", "q", "mc1", [-2.0, -2.0, -5.0], {0}), _rows("m", "q", "mc2", [-1.0, -1.0], {0}))
    assert question_scores(df)["mc1"].item() == 1.0
    # ... and a tie where a false choice comes first counts as wrong, like numpy.argmax.
    df = _frame(_rows("m", "q", "mc1", [-2.0, -2.0], {1}), _rows("m", "q", "mc2", [-1.0, -1.0], {0}))
    assert question_scores(df)["mc1"].item() == 0.0


def test_integer_choice_index_orders_rows_before_ties():
    df = _frame(_rows("m", "q", "mc1", [-2.0, -2.0], {0}), _rows("m", "q", "mc2", [-1.0, -1.0], {0}))
    shuffled = df.iloc[::-1].reset_index(drop=True)  # false choice row now comes first
    assert question_scores(shuffled)["mc1"].item() == 1.0


def test_mc2_is_stable_for_very_negative_logliks():
    # exp(-1000) underflows to 0 in float64; the shifted form must still give 1/(1+e^-2) and 1/2.
    df = _frame(
        _rows("m", "q", "mc1", [-1000.0, -1002.0], {0}),
        _rows("m", "q", "mc2", [-1000.0, -1002.0], {0}),
        _rows("m", "r", "mc1", [-1200.0, -1200.0], {0}),
        _rows("m", "r", "mc2", [-1200.0, -1200.0, -np.inf], {0, 2}),
    )
    s = question_scores(df).set_index("question_id")
    assert s.loc["q", "mc2"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert s.loc["r", "mc2"] == pytest.approx(0.5)
    assert s.loc["q", "mc1"] == 1.0


def test_text_choices_keep_frame_order():
    df = _frame(_rows("m", "q", "mc1", [-1.0, -1.0], {0}), _rows("m", "q", "mc2", [-1.0, -3.0], {1}))
    df["choice"] = df["choice"].map({0: "b", 1: "a"})  # text labels: no sorting, frame order rules
    s = question_scores(df)
    assert s["mc1"].item() == 1.0
    assert s["mc2"].item() == pytest.approx(math.exp(-3) / (math.exp(-1) + math.exp(-3)))


def test_summarize_single_question_has_nan_stderr():
    df = _frame(_rows("m", "q", "mc1", [-1.0, -2.0], {0}), _rows("m", "q", "mc2", [-1.0, -2.0], {0}))
    out = summarize(question_scores(df))["m"]
    assert out["n"] == 1 and out["mc1"] == 1.0 and math.isnan(out["mc1_stderr"])


def test_malformed_predictions():
    good = _frame(_rows("m", "q", "mc1", [-1.0, -2.0], {0}), _rows("m", "q", "mc2", [-1.0, -2.0], {0}))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['loglik'\]"):
        question_scores(good.drop(columns="loglik"))
    with pytest.raises(ValueError, match="task 'mc2' has no true choice"):
        question_scores(good.assign(is_true=good["is_true"] & (good["task"] == "mc1")))
    with pytest.raises(ValueError, match="task 'mc1' has no true choice"):
        question_scores(good.assign(is_true=good["is_true"] & (good["task"] == "mc2")))
    with pytest.raises(ValueError, match="2 true choices; MC1 needs exactly one"):
        question_scores(good.assign(is_true=True))
    with pytest.raises(ValueError, match="no 'mc2' rows"):
        question_scores(good[good["task"] == "mc1"])
    with pytest.raises(ValueError, match="unknown task"):
        question_scores(good.assign(task="mc3"))
    with pytest.raises(ValueError, match="loglik is nan"):
        question_scores(good.assign(loglik=[-1.0, np.nan, -1.0, -2.0]))
    with pytest.raises(ValueError, match="appears twice"):
        question_scores(pd.concat([good, good.iloc[:1]]))
    with pytest.raises(ValueError, match="missing column"):
        summarize(pd.DataFrame({"method": ["m"], "question_id": ["q"], "mc1": [1.0]}))


def test_differences_from_base_are_paired_over_questions_and_marked_within_one_stderr():
    import pandas as pd

    from hpr.measurements import against_base

    rows = []
    # 4 questions, two choices each in mc1 and mc2: "up" wins every question base loses; "same" is base
    for method, wins in (("base", [1, 0, 1, 0]), ("up", [1, 1, 1, 1]), ("same", [1, 0, 1, 0])):
        for q, win in enumerate(wins):
            for task in ("mc1", "mc2"):
                rows.append((method, f"q{q}", task, "t", True, 0.0 if win else -2.0))
                rows.append((method, f"q{q}", task, "f", False, -1.0))
    preds = pd.DataFrame(rows, columns=["method", "question_id", "task", "choice", "is_true", "loglik"])
    diff = against_base(preds).set_index("method")
    assert list(diff.index) == ["up", "same"]
    assert diff.loc["up", "mc1_diff"] == 0.5 and diff.loc["same", "mc1_diff"] == 0.0
    # per-question differences 0, 1, 0, 1: std 0.577 / sqrt(4) = 0.289, so +0.5 is outside one s.e.
    assert abs(diff.loc["up", "mc1_diff_stderr"] - 0.2887) < 1e-3 and not diff.loc["up", "mc1_within_se"]
    assert diff.loc["same", "mc1_within_se"] and diff.loc["up", "n"] == 4
    assert against_base(preds[preds["method"] != "base"]).empty
