"""QLoRA Studio: the frame around the pages.

    streamlit run app.py

The sidebar lists the runs in the runs folder ($QLORA_STUDIO_RUNS, else runs/) with their state;
the run picked there (also kept in the URL as ?run=<id>) is the one every page shows. Pages only
read run folders through core/, so a refresh or a server restart rebuilds everything from disk.
"""

import streamlit as st

import ui

st.set_page_config(page_title="QLoRA Studio", page_icon="🧪", layout="wide")

pages = st.navigation([
    st.Page("pages/train.py", title="Train", icon="🏋️", default=True),
    st.Page("pages/report.py", title="Report", icon="📊"),
    st.Page("pages/failures.py", title="Failures", icon="🔍"),
])
ui.sidebar()
pages.run()
