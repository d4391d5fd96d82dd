"""QLoRA Studio: the frame around the pages.

    streamlit run app.py

Pages live in app_pages/ (not pages/, which Streamlit would also serve as a second, frameless app).
The sidebar lists the runs in the runs folder ($QLORA_STUDIO_RUNS, else runs/) with their state;
the run picked there (also kept in the URL as ?run=<id>) is the one every page shows. Pages only
read run folders through core/, so a refresh or a server restart rebuilds everything from disk.
"""

import streamlit as st

from app_pages import ui

st.set_page_config(page_title="QLoRA Studio", page_icon=":material/science:", layout="wide")
ui.close_uploads_when_read_only()

pages = st.navigation(
    [
        st.Page("app_pages/train.py", title="Train", icon=":material/model_training:", default=True),
        st.Page("app_pages/report.py", title="Report", icon=":material/summarize:"),
        st.Page("app_pages/failures.py", title="Failures", icon=":material/rule:"),
        st.Page("app_pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("app_pages/playground.py", title="Playground", icon=":material/science:"),
    ]
)
ui.sidebar()
try:
    pages.run()
except Exception as e:  # st.rerun / st.stop are BaseExceptions and pass; anything else: one sentence
    ui.page_failed(e)
