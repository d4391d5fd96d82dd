"""Streamlit helpers shared by the frame (app.py) and the pages: the selected run, the sidebar,
and the Plotly figures. Everything here only reads the run folder through core."""

from __future__ import annotations

import hashlib
import html
import logging
import re
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st
from streamlit import config as server_config
from streamlit.runtime.scriptrunner import get_script_run_ctx

from core import access
from core.results.report import damaged_files
from core.runs import resources, rundir
from core.runs.state import list_runs, read_config, read_status
from core.text import WORD_JOINER, code_span, markdown_text

# Material icons ship with Streamlit's frontend (emoji need a font the machine may not have).
STATE_ICONS = {
    "queued": ":gray[:material/schedule:]",
    "running": ":blue[:material/progress_activity:]",
    "done": ":green[:material/check_circle:]",
    "stopped": ":orange[:material/stop_circle:]",
    "failed": ":red[:material/error:]",
    rundir.DAMAGED: ":red[:material/broken_image:]",
}
UNKNOWN_ICON = ":gray[:material/help:]"
COLORS = {"before": "#9ca3af", "after": "#4f46e5", "line": "#4f46e5", "second": "#f59e0b"}
PLOTLY = {"displayModeBar": False}  # the charts are small; the toolbar only hides their legend
RUN_KEY = "run"  # session_state key of the selected run id (a UI choice, nothing else)
PASSWORD_KEY = "access_password"  # the deployment's password as this session typed it, once it was right
FAILED_KEY = "access_failed"  # (sha256 of this session's last wrong guess, its error): a rerun is not a new guess


# --- text from data -----------------------------------------------------------------------------

# Every character that starts or ends Markdown, GitHub Markdown or Streamlit syntax: emphasis,
# code, links and images, HTML and entities, headings, lists, quotes, tables, strikethrough, math
# ($), directives (:red[...]). CommonMark lets a backslash escape any ASCII punctuation, which then
# shows as itself.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>:$&@=^])")
# Streamlit's renderer also turns plain text into links (http://..., www.x, a@b.c: GitHub's autolink
# literals) and :shortcodes: into emoji and icons after escapes are resolved, so no escape stops
# them: an invisible word joiner (U+2060) after each ':' and '@' and between "www" and its '.' does.
_WORD_JOINER = "\u2060"
_AUTOLINK_BREAK = re.compile(r"(?<=[:@])|(?<=www)(?=\.)", re.IGNORECASE)
_LEADING_SPACE = re.compile(r"^[ \t]+")


def plain(text) -> str:
    """`text` (a premise, a label, a tag, a name: anything from a dataset or a config, not from the
    app) escaped for st.markdown and other Markdown labels, so that it shows literally: a link,
    an image, a URL or an HTML tag in it is shown as typed, never rendered. Line breaks are kept;
    invisible word joiners (U+2060) are added after ':' and '@' (see _AUTOLINK_BREAK)."""
    if text is None:
        return ""
    text = _AUTOLINK_BREAK.sub(_WORD_JOINER, str(text))
    lines = _MARKDOWN_SPECIAL.sub(r"\\\1", text).splitlines() or [""]
    # leading spaces as no-break spaces: indentation shows, and never starts a code block
    lines = [_LEADING_SPACE.sub(lambda m: "\u00a0" * len(m.group().expandtabs(4)), line) for line in lines]
    return "  \n".join(lines)  # a line break in the text stays one


# Streamlit's own inline syntax that CommonMark lacks: :red[...] directives, :smile: and
# :material/icon: shortcodes. A word joiner after the colon stops them (no escape does, see plain).
_DIRECTIVE = re.compile(r"(?<=:)(?=[A-Za-z0-9_/-]+[\[:])")


def sentence(text) -> str:
    """A sentence the app itself wrote into a run file (the headline, a verdict, a note), read back
    from the folder, which anyone may have edited: inert (core.text.markdown_text: no link, image,
    HTML, emphasis or code; no Streamlit directive or shortcode) with as few escapes as its
    numbers and brackets allow, so that it reads as written."""
    return _DIRECTIVE.sub(WORD_JOINER, markdown_text(text))


def damage_text(lines: list[str]) -> str:
    """Damage lines ("metrics.jsonl: 2 unreadable lines", from core) for st.markdown: the file's name
    as code, the reason escaped (it may quote what the damaged file holds)."""
    out = []
    for line in lines:
        name, sep, why = str(line).partition(": ")
        out.append(f"{code_span(name)}: {plain(why)}" if sep and name and " " not in name else plain(line))
    return "; ".join(out)


def chart_text(text) -> str:
    """`text` from data (a label, a tag, a name from a run folder) for a Plotly chart: axis and tick
    labels, legends, hover texts, titles and annotations render a subset of HTML (<a href>, <b>,
    <br>, <span style>); escaped (Plotly shows &lt; &gt; &amp; as the characters), it shows as typed."""
    return html.escape("" if text is None else str(text), quote=False)


# --- public mode (core/access.py decides; these only show it) -----------------------------------


def typed_password() -> str | None:
    """The password this session entered (right when it was entered), passed to core with each action."""
    return st.session_state.get(PASSWORD_KEY)


def session_id() -> str | None:
    """This browser session's id in Streamlit's runtime (it cannot be reset from the browser, as
    session_state can), for counting its wrong passwords; None outside a script run."""
    ctx = get_script_run_ctx()
    return getattr(ctx, "session_id", None)


def may(action: str) -> bool:
    """Whether this session may do `action` (launch, stop, resume, upload, push) now."""
    return access.allowed(action, typed_password())


def access_gate() -> bool:
    """The Train page's line about public mode: on a read-only deployment, one sentence saying so;
    with a password, the password field until it is entered right (then remembered for this
    session only). Returns whether this session may launch, stop, resume and upload."""
    if access.read_only():
        st.info(
            "This is a read-only deployment: browse the runs, their reports, failure cases and models; "
            "launching, stopping, resuming and uploading are off.",
            icon=":material/visibility:",
        )
        return False
    if access.password() is None:
        return True
    if not access.password_ok(typed_password()):
        typed = st.text_input(
            "Password",
            type="password",
            key="password_field",
            placeholder="Enter the password to launch",
            help="This deployment asks for a password before a run is launched, stopped, resumed or given files.",
        )
        if not typed:
            st.caption("Enter the password to launch, stop or resume a run, or to upload files.")
            return False
        attempt = hashlib.sha256(typed.encode("utf-8", "surrogatepass")).hexdigest()
        failed = st.session_state.get(FAILED_KEY)
        if failed and failed[0] == attempt:  # the same wrong password still in the field: not a new guess
            st.error(failed[1])
            return False
        try:  # a new guess: a wrong one is counted for this session (and the server), waits and is logged
            access.check("launch", typed, who=session_id())
        except access.Refused as e:
            st.session_state[FAILED_KEY] = (attempt, str(e))
            st.error(str(e))
            return False
        st.session_state[PASSWORD_KEY] = typed
    st.caption("Password accepted for this browser session: launching, stopping, resuming and uploading are on.")
    return True


def close_uploads_when_read_only() -> None:
    """On a read-only deployment, Streamlit's upload endpoint takes no bytes: no uploader is drawn
    there, but the endpoint would still take files from any session into the server's memory. At
    server.maxUploadSize 0 it refuses every file (413); the endpoint reads the option at each
    request. deploy/start.sh passes the same flag from the start; this covers `streamlit run`."""
    if access.read_only() and server_config.get_option("server.maxUploadSize") != 0:
        server_config.set_option("server.maxUploadSize", 0, where_defined="app.py (QLORA_STUDIO_READ_ONLY)")


@st.cache_resource(show_spinner=False)
def hardware() -> dict:
    """This machine's CPU, RAM and GPUs (torch is imported once per server). Called through the
    module, so that a test can give the app other GPUs (tests/engine/test_dist.py)."""
    return resources.hardware_info()


def hardware_line(info: dict) -> str:
    if info.get("gpus"):
        return "GPU: " + resources.describe_hardware(info)
    return resources.describe_hardware(info)


def select_run(run_id: str | None) -> None:
    """Make `run_id` the run every page shows (and keep it in the URL as ?run=)."""
    st.session_state[RUN_KEY] = run_id
    if run_id:
        st.query_params["run"] = run_id
    elif "run" in st.query_params:
        del st.query_params["run"]


def sidebar() -> None:
    """The runs folder as a list with states, the selection, and the hardware in use."""
    runs = list_runs()
    ids = [r["id"] for r in runs]
    by_id = {r["id"]: r for r in runs}
    wanted = st.session_state.get(RUN_KEY) or st.query_params.get("run")
    if wanted not in by_id:
        if wanted and st.query_params.get("run") == wanted:  # from the URL: anyone can craft it
            st.sidebar.warning(f"Run {plain(wanted)} is not in the runs folder.")
        wanted = ids[0] if ids else None
    with st.sidebar:
        st.markdown("### Runs")
        if not runs:
            st.caption(
                "No runs yet. Start one on the **Train** page: the demo preset fine-tunes "
                "a small model in 4-bit on the CPU, offline."
            )
            select_run(None)
        else:
            counts = {s: sum(r["state"] == s for r in runs) for s in STATE_ICONS}
            st.caption(" · ".join(f"{STATE_ICONS[s]} {n} {s}" for s, n in counts.items() if n))
            # The radio's value is set from the selection before it is drawn (the selection can
            # change elsewhere: a launch, ?run=); a click updates the selection in its callback.
            st.session_state["run_picker"] = wanted
            st.radio(
                "Selected run",
                ids,
                label_visibility="collapsed",
                key="run_picker",
                format_func=lambda i: f"{STATE_ICONS.get(by_id[i]['state'], UNKNOWN_ICON)} {i} · {by_id[i]['state']}",
                on_change=lambda: select_run(st.session_state["run_picker"]),
            )
            select_run(wanted)
            for r in runs:
                if r.get("damaged"):
                    st.caption(f"{STATE_ICONS[rundir.DAMAGED]} `{r['id']}` is damaged: {damage_text([r['damaged']])}")
        root = rundir.runs_root()
        shown = root.relative_to(rundir.PROJECT_ROOT) if root.is_relative_to(rundir.PROJECT_ROOT) else f"…/{root.name}"
        st.caption(f"Runs folder: `{shown}`", help=f"{root} (set QLORA_STUDIO_RUNS to use another folder)")
        st.divider()
        st.markdown("**Hardware**")
        st.caption(hardware_line(hardware()))


def selected_run() -> Path | None:
    run_id = st.session_state.get(RUN_KEY)
    if not run_id:
        return None
    try:
        path = rundir.run_path(run_id)
    except ValueError:
        return None
    return path if (path / rundir.STATUS).exists() else None


def run_title(run_dir: Path, status: dict | None = None) -> str:
    cfg, _ = read_config(run_dir)
    state = (status or read_status(run_dir)).get("state", "unknown")
    model = (cfg.get("model") or {}).get("name", "?")
    return f"{STATE_ICONS.get(state, UNKNOWN_ICON)} `{run_dir.name}` · {plain(state)} · {plain(model)}"


def damage_note(run_dir: Path, more: list[str] | None = None) -> list[str]:
    """One warning line naming the files of this run that cannot be read (and why), when there
    are any; the page then shows what the other files hold. Returns those lines. Not for a run
    still queued or running: its files are being written (and reading them all costs)."""
    if read_status(run_dir).get("state") in rundir.ACTIVE_STATES:
        return []
    damaged = damaged_files(run_dir)
    for line in filter(None, more or []):  # a caller's line about a file replaces the generic one
        damaged = [d for d in damaged if d.split(":", 1)[0] != line.split(":", 1)[0]] + [line]
    if damaged:
        st.warning(
            f"Run `{run_dir.name}` is damaged: {damage_text(damaged)}. The page shows what the other files hold.",
            icon=":material/broken_image:",
        )
    return damaged


def page_failed(error: Exception) -> None:
    """The frame's last line of defence: a page raised (a run file damaged in a way no reader
    foresaw, or a bug). One plain sentence instead of a traceback; the traceback goes to the
    server's console, and onto the page too when client.showErrorDetails is "full"."""
    logging.getLogger("qlora_studio").error("a page failed", exc_info=error)
    run_dir = selected_run()
    damaged = damaged_files(run_dir) if run_dir else []
    if damaged:
        st.error(
            f"Run `{run_dir.name}` could not be shown: its files are damaged ({damage_text(damaged)}). "
            "Pick another run in the sidebar; the other runs are not affected."
        )
    else:
        st.error(
            f"This page could not be shown ({type(error).__name__}: {plain(error)}). "
            "The server's console has the details."
        )
    if st.get_option("client.showErrorDetails") == "full":
        st.exception(error)


def no_run_message(what: str) -> None:
    st.info(
        f"No run selected yet. {what} Start a run on the **Train** page; "
        "when it is done, its report and failure cases appear here."
    )
    st.page_link("app_pages/train.py", label="Go to Train", icon=":material/model_training:")


# --- figures ------------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, height: int = 260, **kw) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)),
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        template="plotly_white",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1),
        **kw,
    )
    return fig


def loss_figure(steps: list[dict], epochs: list[dict]) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(
        x=[s["step"] for s in steps],
        y=[s["loss"] for s in steps],
        mode="lines+markers",
        name="step loss",
        line=dict(color=COLORS["line"]),
        marker=dict(size=4),
    )
    if epochs and steps:
        spe = steps[0].get("steps_per_epoch") or 1
        fig.add_scatter(
            x=[e["epoch"] * spe for e in epochs],
            y=[e["train_loss"] for e in epochs],
            mode="markers",
            name="epoch mean",
            marker=dict(size=10, color=COLORS["second"]),
        )
    return _layout(fig, "Training loss", xaxis_title="optimiser step", yaxis_title="cross-entropy")


def val_accuracy_figure(curve: list[dict]) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(
        x=[c["epoch"] for c in curve],
        y=[100 * c["accuracy"] for c in curve],
        mode="lines+markers+text",
        text=[f"{100 * c['accuracy']:.1f}%" for c in curve],
        textposition="top center",
        line=dict(color=COLORS["line"]),
        name="validation",
    )
    return _layout(
        fig,
        "Validation accuracy by epoch (0 = before training)",
        xaxis_title="epoch",
        yaxis_title="accuracy (%)",
        xaxis=dict(dtick=1),
        yaxis=dict(range=[0, 105]),
    )


def resources_figure(samples: list[dict], keys: list[tuple[str, str]], title: str, unit: str) -> go.Figure:
    fig = go.Figure()
    colors = [COLORS["line"], COLORS["second"], "#10b981"]
    for (key, name), color in zip(keys, colors):
        pts = [(r["elapsed_s"], r[key]) for r in samples if key in r]
        fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", name=name, line=dict(color=color))
    return _layout(fig, title, height=220, xaxis_title="seconds", yaxis_title=unit)


def accuracy_figure(before: dict, after: dict, best_epoch) -> go.Figure:
    names = ["before fine-tuning", f"after (epoch {chart_text(best_epoch)})"]
    accs = [100 * before["accuracy"], 100 * after["accuracy"]]
    lo = [100 * s["ci95"][0] for s in (before, after)]
    hi = [100 * s["ci95"][1] for s in (before, after)]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=accs,
            marker_color=[COLORS["before"], COLORS["after"]],
            text=[f"{a:.1f}%<br>{s['correct']}/{s['n']}" for a, s in zip(accs, (before, after))],
            textposition="inside",
            insidetextanchor="start",
            textfont=dict(color="white"),
            error_y=dict(
                type="data",
                symmetric=False,
                array=[h - a for h, a in zip(hi, accs)],
                arrayminus=[a - l for a, l in zip(accs, lo)],
                color="#374151",
            ),
        )
    )
    return _layout(
        fig,
        f"Test accuracy with 95% Wilson intervals (n = {after['n']})",
        height=340,
        yaxis=dict(range=[0, 100], title="accuracy (%)"),
        showlegend=False,
    )


def confusion_figure(matrix: list[list[int]], labels: list[str], title: str) -> go.Figure:
    labels = [chart_text(label) for label in labels]
    fig = go.Figure(
        go.Heatmap(
            z=matrix,
            x=labels,
            y=labels,
            colorscale="Blues",
            showscale=False,
            text=[[str(v) for v in row] for row in matrix],
            texttemplate="%{text}",
            hovertemplate="gold %{y}, predicted %{x}: %{z}<extra></extra>",
        )
    )
    return _layout(
        fig, title, height=300, xaxis_title="predicted", yaxis_title="gold", yaxis=dict(autorange="reversed")
    )


def probs_figure(labels: list[str], before: list[float], after: list[float], gold: str) -> go.Figure:
    labels, gold = [chart_text(label) for label in labels], chart_text(gold)
    fig = go.Figure()
    fig.add_bar(
        x=labels,
        y=before,
        name="before",
        marker_color=COLORS["before"],
        text=[f"{p:.2f}" for p in before],
        textposition="outside",
    )
    fig.add_bar(
        x=labels,
        y=after,
        name="after",
        marker_color=COLORS["after"],
        text=[f"{p:.2f}" for p in after],
        textposition="outside",
    )
    fig.add_annotation(x=gold, y=1.08, text="gold", showarrow=False, font=dict(color="#059669"))
    return _layout(
        fig, "Predicted probabilities", height=300, barmode="group", yaxis=dict(range=[0, 1.15], title="probability")
    )


@st.fragment(run_every=2)
def rerun_when_finished(run_id: str) -> None:
    """On pages that wait for a run: rerun the whole page once the run is no longer active."""
    if read_status(rundir.run_path(run_id)).get("state") not in ("queued", "running"):
        st.rerun()


# --- figures of the report's statistics sections ------------------------------------------------


def reliability_figure(calibration: dict) -> go.Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per
    model (before, after, zero-shot), the diagonal for perfect calibration; ECE in the legend."""
    fig = go.Figure()
    fig.add_scatter(
        x=[0, 1],
        y=[0, 1],
        mode="lines",
        name="perfectly calibrated",
        line=dict(color="#d1d5db", dash="dash"),
        hoverinfo="skip",
    )
    colors = {"before": COLORS["before"], "after": COLORS["after"], "zero_shot": COLORS["second"]}
    for name, cal in calibration.items():
        bins = [b for b in cal.get("bins") or [] if b.get("n")]
        ece = cal.get("ece")
        fig.add_scatter(
            x=[b["confidence"] for b in bins],
            y=[b["accuracy"] for b in bins],
            mode="lines+markers",
            name=chart_text(f"{name.replace('_', '-')} (ECE {ece:.3f})" if ece is not None else name),
            line=dict(color=colors.get(name, "#10b981")),
            marker=dict(size=[6 + min(14, b["n"] ** 0.5) for b in bins]),
            customdata=[b["n"] for b in bins],
            hovertemplate="confidence %{x:.2f}, accuracy %{y:.2f}, n = %{customdata}<extra></extra>",
        )
    return _layout(
        fig,
        "Reliability diagram (accuracy per confidence bin)",
        height=340,
        xaxis=dict(range=[0, 1], title="mean confidence (max probability)"),
        yaxis=dict(range=[0, 1.02], title="accuracy"),
    )


def moves_figure(counts: list[list[int]], labels: list[str]) -> go.Figure:
    """The KxK table of label moves: predicted label before (rows) -> after (columns)."""
    labels = [chart_text(label) for label in labels]
    fig = go.Figure(
        go.Heatmap(
            z=counts,
            x=labels,
            y=labels,
            colorscale="Purples",
            showscale=False,
            text=[[str(v) for v in row] for row in counts],
            texttemplate="%{text}",
            hovertemplate="before %{y} -> after %{x}: %{z}<extra></extra>",
        )
    )
    return _layout(
        fig,
        "Predicted label before (rows) → after (columns)",
        height=300,
        xaxis_title="after",
        yaxis_title="before",
        yaxis=dict(autorange="reversed"),
    )


def trajectory_figure(trajectory: dict, best_epoch=None) -> go.Figure:
    """One example's probability of its gold label per recorded epoch (0 = before training),
    right/wrong as the marker colour; the selected (best) epoch marked."""
    fig = go.Figure()
    fig.add_scatter(
        x=trajectory["epochs"],
        y=trajectory["p_gold"],
        mode="lines+markers",
        name="p(gold)",
        line=dict(color=COLORS["line"]),
        marker=dict(size=10, color=["#059669" if c else "#dc2626" for c in trajectory["correct"]]),
        customdata=[chart_text(p) for p in trajectory["pred"]],
        hovertemplate="epoch %{x}: p(gold) %{y:.3f}, predicted %{customdata}<extra></extra>",
    )
    if best_epoch is not None:
        fig.add_vline(x=best_epoch, line=dict(color="#9ca3af", dash="dot"))
    return _layout(
        fig,
        f"p(gold) per epoch ({chart_text(trajectory['split'])}; green = right, red = wrong)",
        height=260,
        xaxis=dict(dtick=1, title="epoch (0 = before)"),
        yaxis=dict(range=[0, 1.05], title="p(gold)"),
        showlegend=False,
    )
