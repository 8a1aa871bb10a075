"""Generations: greedy continuations of one prompt by the base model and the chosen methods, side by side; for a
test question, the run's own scored answers (lm-eval truthfulqa_gen) beside its true and false references."""

import pandas as pd
import streamlit as st
import workbench as wb

from hpr import measurements
from hpr.data.schema import MCQuestion


@st.cache_data(show_spinner=False, max_entries=64)
def generate(
    folder: str,
    stamp: float,
    device: str,
    prompt: str,
    methods: tuple[str, ...],
    max_new_tokens: int,
    stop_at_newline: bool,
):
    run = wb.with_model(wb.read_run(folder))
    editors = run.editors(list(methods))
    with wb.MODEL_LOCK:  # the shared model: no other session's edit may overlap this one
        return measurements.generations(run.model, [prompt], editors, max_new_tokens, stop_at_newline)


st.title("Generations")
run = wb.current_run()
source = st.radio("Prompt", ["a test question", "typed"], horizontal=True)
if source == "typed":
    text = st.text_input("Your text", "Q: pet and city of Bakbreel?" if run.config["dataset"] == "toy" else "")
    as_question = st.checkbox("Ask it as a question (the run's primer, then `Q: ...` / `A:`)", value=True)
    question = text.removeprefix("Q:").strip()
    prompt = run.fmt.context(MCQuestion("typed", question, (), ())) if as_question else text
else:
    questions = []
    with wb.shows_errors("Cannot read the test split"):
        questions = run.questions("test")
    if not questions:
        st.stop()
    picked = st.selectbox("Test question", range(len(questions)), format_func=lambda i: questions[i].question)
    prompt = run.fmt.context(questions[picked])
    from hpr import gen_scoring

    true_refs, false_refs = gen_scoring.references(*questions[picked].generation_answers())
    st.caption("True references: " + " · ".join(true_refs) + "  \nFalse references: " + " · ".join(false_refs))
    scored = run.folder / "answers.parquet"
    if scored.exists():
        with wb.shows_errors("Cannot read the run's answers"):
            answers = pd.read_parquet(scored)
            mine = answers[answers["question_id"] == questions[picked].id].copy()
            mine["verdict"] = [
                "non-answer" if n else ("true" if a else "false")
                for n, a in zip(mine["non_answer"], mine["bleu_acc"], strict=True)
            ]
            st.markdown(
                "**The run's answers** (greedy, scored as lm-eval's `truthfulqa_gen`: *true* when the best "
                "BLEU to a true reference beats the best to a false one)"
            )
            cols = ["method", "completion", "verdict", "bleu_max", "bleu_diff", "rougeL_max", "rougeL_diff"]
            st.dataframe(mine[cols], hide_index=True)
edited = [m for m in run.methods if m != "base"]
methods = st.multiselect("Methods beside base", edited, default=[m for m in ("hpr", "iti15") if m in edited])
c1, c2 = st.columns(2)
max_new = c1.slider("Max new tokens (greedy decoding)", 1, 128, 16)
stop = c2.checkbox("Stop at the first newline", value=True)

if not prompt.strip():
    st.warning("Type a prompt.")
    st.stop()
with st.expander("The full prompt"):
    st.code(prompt[-2000:], language=None)
with wb.shows_errors("Generation failed"), st.spinner("Generating..."):
    df = generate(str(run.folder), wb.stamp(run), wb.device(), prompt, ("base", *methods), max_new, stop)
    for col, row in zip(st.columns(len(df)), df.itertuples(), strict=True):
        col.markdown(f"**{row.method}**")
        col.code(row.text or "(nothing)", language=None, wrap_lines=True)
    table = df[["method", "text"]]
    wb.table_download(table, "generations")
    wb.remember("tables", "generations", table)
