"""The hpr workbench in a browser: ``streamlit run app/main.py`` from the repository root.

Pages (app/views/: a folder named pages/ would also be served by Streamlit as a second, unmanaged app): Runs
(open or start a run), Probes, Norms, Results, Generations, Export. Every page reads the run folder opened on
the Runs page (kept in ``st.session_state.run_folder``); see app/workbench.py.
"""

import streamlit as st
import workbench as wb

st.set_page_config(page_title="hpr workbench", page_icon=":material/rotate_right:", layout="wide")
wb.check_binding()
wb.init_state()

pages = [
    st.Page("views/runs.py", title="Runs", icon=":material/folder_open:", default=True),
    st.Page("views/probes.py", title="Probes", icon=":material/show_chart:"),
    st.Page("views/norms.py", title="Norms", icon=":material/candlestick_chart:"),
    st.Page("views/results.py", title="Results", icon=":material/table_chart:"),
    st.Page("views/generations.py", title="Generations", icon=":material/chat:"),
    st.Page("views/export.py", title="Export", icon=":material/download:"),
]
page = st.navigation(pages)

with st.sidebar:
    folder = st.session_state.get("run_folder")
    st.caption(f"Open run: `{folder}`" if folder else "No run open")

page.run()
