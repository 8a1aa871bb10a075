"""Norms: per-layer resid_post norm boxes under each method (paper Fig. 4) and true vs false tokens (Fig. 3).

Computed by analyses/norms.py with the shared model (cached per run folder and methods).
"""

import streamlit as st
import workbench as wb

PAPER_METHODS = ("base", "iti15", "iti200", "hpr")

st.title("Norms")
run = wb.current_run()
methods = st.multiselect(
    "Methods",
    run.methods,
    default=[m for m in PAPER_METHODS if m in run.methods],
    help="the true answer's tokens of each test question (the tokens scored, and the ones every editor edits)",
)
if not methods:
    st.warning("Pick at least one method.")
    st.stop()

with wb.shows_errors("Cannot compute the norms"), st.spinner("Measuring norms on the test split..."):
    out = wb.run_script("norms", str(run.folder), wb.stamp(run), wb.device(), tuple(methods))
    st.plotly_chart(out["figures"]["norms_by_method"], key="norms_by_method")
    st.plotly_chart(out["figures"]["norms_true_vs_false"], key="norms_true_vs_false")
    st.subheader("Relative norm change vs base, per layer")
    change = out["tables"]["norm_change_vs_base"]
    change.columns = [str(c) for c in change.columns]
    st.dataframe(change, hide_index=True)
    wb.table_download(change, "norm_change_vs_base")
    with st.expander("Box statistics"):
        st.dataframe(out["tables"]["norms_by_method"], hide_index=True)
        wb.table_download(out["tables"]["norms_by_method"], "norms_by_method")
    for kind in ("figures", "tables"):
        for name, obj in out[kind].items():
            wb.remember(kind, name, obj)
