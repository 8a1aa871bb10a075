"""Export: any figure as PNG/SVG/PDF (or HTML without a browser), any table as CSV, markdown or LaTeX.

Offers the run's own figures and tables, and whatever the other pages computed in this session.
"""

import streamlit as st
import workbench as wb

from hpr import figures, measurements

st.title("Export")
run = wb.current_run()
probe = measurements.probe_frame(run.results)
mc = measurements.mc_frame(run.results)
made = {
    "figures": {
        "probe_accuracy": figures.probe_accuracy(probe, run.results["selected_layers"]),
        "mc_scores": figures.mc_bars(mc),
    },
    "tables": {
        "probe_accuracy": probe.pivot(index="layer", columns="split", values="accuracy").reset_index(),
        "mc_scores": mc,
        "flip_rates": measurements.flip_frame(run.results),
        "norm_change_vs_base": measurements.norm_change_frame(run.results),
    },
}
for kind in made:
    made[kind].update(st.session_state.outputs[kind])
st.caption("Figures and tables computed on the Norms, Results and Generations pages join these lists.")

st.subheader("Figure")
browser = figures.browser_available()
formats = ["png", "svg", "pdf", "html"] if browser else ["html"]
c1, c2, c3 = st.columns(3)
name = c1.selectbox("Figure", list(made["figures"]))
fmt = c2.selectbox("Format", formats)
scale = c3.selectbox(
    "PNG scale",
    [1, 2, 3, 4],
    index=[1, 2, 3, 4].index(int(figures.PNG_SCALE)),
    format_func=lambda k: f"{k}x ({700 * k}x{500 * k} px)",
    disabled=fmt != "png",
    help="pixels per figure unit; SVG and PDF are vector and need none",
)
if not browser:
    st.error(figures.NO_BROWSER + " Offering HTML only.", icon=":material/error:")
wanted = f"{name}.{fmt}" + (f"@{scale}x" if fmt == "png" else "")
if st.button("Prepare the file", icon=":material/build:"):
    with wb.shows_errors("Export failed"), st.spinner(f"Writing {name}.{fmt}..."):
        st.session_state.export_file = (wanted, wb.figure_bytes(name, made["figures"][name], fmt, scale))
prepared, data = st.session_state.get("export_file", (None, None))
file_name = f"{name}.{fmt}"
if prepared == wanted:
    st.download_button(
        f"Download {file_name}", data, file_name, wb.MIME[fmt], icon=":material/download:", key="download-figure"
    )
st.plotly_chart(made["figures"][name], key=f"preview-{name}")

st.subheader("Table")
c1, c2 = st.columns(2)
table_name = c1.selectbox("Table", list(made["tables"]))
table_fmt = c2.selectbox(
    "Format", ["csv", "md", "tex"], format_func={"csv": "CSV", "md": "markdown", "tex": "LaTeX (booktabs)"}.get
)
table = made["tables"][table_name]
with wb.shows_errors("Export failed"):
    data = wb.table_bytes(table_name, table, table_fmt)
    st.download_button(
        f"Download {table_name}.{table_fmt}",
        data,
        f"{table_name}.{table_fmt}",
        wb.MIME[table_fmt],
        icon=":material/download:",
        key="download-table",
    )
    st.dataframe(table, hide_index=True)
