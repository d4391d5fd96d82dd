"""Public mode (core/access.py), data text shown literally (app_pages/ui.plain), and sharing a
run's adapter (core/share.py): core refuses by itself, and the real pages (streamlit AppTest) do
not even show what a visitor may not do. Run folders: a copy of the real tiny run (`tiny_run`),
and failed / running runs written by hand (tests/helpers.py)."""

import html.parser
import http.server
import io
import json
import shutil
import subprocess
import threading
import types
import zipfile
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from app_pages.ui import PASSWORD_KEY, plain
from core import access, jobs, share
from core.config import BUILTIN_DATA, EMBEDDED_LLM, EMBEDDED_MODEL, get_preset, override
from core.runs import rundir
from core.runs.state import list_runs, read_status, stop_requested, write_status
from tests.helpers import (
    EVIL_HYPOTHESIS,
    EVIL_PREMISE,
    EVIL_TAG,
    evil_run,
    free_port,
    make_failed_run,
    make_running_run,
    run_lock_holder,
    start,
    text_of,
)

ENV = (
    access.READ_ONLY_ENV,
    access.PASSWORD_ENV,
    access.LOCAL_PATHS_ENV,
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No public-mode variable and no Hub token from the machine leaks into a test."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


class Started:
    """Stands in for jobs' subprocess module: records what would start, starts nothing."""

    def __init__(self):
        self.calls = []
        outer = self

        class Popen:
            pid = None

            def __init__(self, args, **kwargs):
                outer.calls.append(args)

        self.module = types.SimpleNamespace(Popen=Popen, STDOUT=subprocess.STDOUT, DEVNULL=subprocess.DEVNULL)


@pytest.fixture
def started(monkeypatch) -> Started:
    s = Started()
    monkeypatch.setattr(jobs, "subprocess", s.module)  # only jobs' own Popen: streamlit uses it too
    return s


def demo_cfg(**changes):
    return override(get_preset("demo"), {"data.max_train_rows": 32, **changes})


def labels(at: AppTest, kind: str) -> list[str]:
    return [e.proto.label for e in at.get(kind)]


# --- core: who may do what ------------------------------------------------------------------------


def test_read_only_refuses_every_action_in_core_and_writes_nothing(tmp_path, monkeypatch, started, sleeper):
    root = tmp_path / "runs"
    monkeypatch.setenv(rundir.RUNS_ENV, str(root))
    running = make_running_run(root, sleeper.pid)
    failed = make_failed_run(root)
    monkeypatch.setenv(access.READ_ONLY_ENV, "1")
    calls = [
        lambda: jobs.launch(demo_cfg()),
        lambda: jobs.launch(demo_cfg(), password="anything"),
        lambda: jobs.launch_with_uploads(demo_cfg(), {"train": ("t.csv", b"premise,hypothesis,label\n")}),
        lambda: jobs.stop(running),
        lambda: jobs.resume(failed),
    ]
    for call in calls:
        with pytest.raises(access.Refused, match="this is a read-only deployment") as e:
            call()
        assert isinstance(e.value, ValueError)  # what the pages and the CLI already show as one sentence
    assert sorted(p.name for p in root.iterdir()) == sorted([running.name, failed.name])  # no new run folder
    assert not stop_requested(running) and sleeper.poll() is None  # no STOP file, no signal
    assert not started.calls and read_status(failed)["state"] == "failed"
    monkeypatch.setenv(access.READ_ONLY_ENV, "0")  # 0 / false / no / off / empty: not read-only
    assert not access.read_only() and access.allowed("launch")


def test_a_password_guards_every_action_in_core(tmp_path, monkeypatch, started, sleeper):
    root = tmp_path / "runs"
    monkeypatch.setenv(rundir.RUNS_ENV, str(root))
    running = make_running_run(root, sleeper.pid)
    sleeper = run_lock_holder(running)  # the stand-in trainer holds the run's lock, as a trainer does
    write_status(running, pid=sleeper.pid)
    monkeypatch.setenv(access.PASSWORD_ENV, "s3cret pass")
    with pytest.raises(access.Refused, match="Launching a run needs this deployment's password"):
        jobs.launch(demo_cfg())
    with pytest.raises(access.Refused, match="^Wrong password: launching a run was refused.$"):
        jobs.launch(demo_cfg(), password="s3cret")
    with pytest.raises(access.Refused, match="Wrong password: uploading files was refused"):
        jobs.launch_with_uploads(demo_cfg(), {"train": ("t.csv", b"x")}, password="S3CRET PASS")
    with pytest.raises(access.Refused, match="Stopping a run needs this deployment's password"):
        jobs.stop(running, password="")
    with pytest.raises(access.Refused, match="Wrong password: stopping a run was refused"):
        jobs.stop(running, password="s3cret pass ")
    with pytest.raises(access.Refused, match="Wrong password: resuming a run was refused"):
        jobs.resume(running, password="nope")
    assert [p.name for p in root.iterdir()] == [running.name] and not started.calls
    assert not stop_requested(running) and sleeper.poll() is None

    run = jobs.launch(demo_cfg(), password="s3cret pass")  # the right one
    assert started.calls[-1][-1] == str(run) and read_status(run)["state"] == "queued"
    assert jobs.stop(running, password="s3cret pass") and stop_requested(running)
    assert access.password_ok("s3cret pass") and not access.password_ok(None)


@pytest.mark.parametrize(
    "env, allowed",
    [
        ({}, True),  # a plain local server: as before
        ({access.READ_ONLY_ENV: "1"}, False),  # public mode
        ({access.PASSWORD_ENV: "pw"}, False),  # public mode
        ({access.PASSWORD_ENV: "pw", access.LOCAL_PATHS_ENV: "1"}, True),
        ({access.LOCAL_PATHS_ENV: "0"}, False),  # what deploy/start.sh sets in the image
    ],
)
def test_when_local_paths_are_allowed(monkeypatch, env, allowed):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert access.local_paths_allowed() is allowed


def test_model_and_dataset_fields_take_hub_ids_and_builtin_names_only(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv(rundir.RUNS_ENV, str(root))
    monkeypatch.setenv(access.LOCAL_PATHS_ENV, "0")
    for name in ("microsoft/phi-2", "gpt2", "Org-1/name_2.v3", EMBEDDED_MODEL, EMBEDDED_LLM):
        access.check_sources(demo_cfg(**{"model.name": name}))
    for source in ("stanfordnlp/snli", "glue", BUILTIN_DATA):
        access.check_sources(demo_cfg(**{"data.source": source}))
    refused = {
        "/etc": "is not a Hub id",
        "../x": "is not a Hub id",
        "~/models/x": "is not a Hub id",
        "./x": "is not a Hub id",
        ".hidden": "is not a Hub id",
        "a/b/c": "is not a Hub id",
        "C:\\models": "is not a Hub id",
        "org/..": "is not a Hub id",
        "org/../x": "is not a Hub id",
        "-org/x": "is not a Hub id",
        "embedded:other": "is not a Hub id",
        "tests/data": "is also the name of a file or folder on this server, which would be read instead of the Hub",
    }
    for name, why in refused.items():
        with pytest.raises(
            access.Refused,
            match=f"^Model '.*' {why}: give a Hugging Face Hub id such as "
            f"microsoft/phi-2, or {EMBEDDED_MODEL} or {EMBEDDED_LLM}; local paths are off",
        ):
            access.check_sources(demo_cfg(**{"model.name": name}))
        with pytest.raises(access.Refused, match=f"^Hub dataset id '.*' {why}: .*stanfordnlp/snli, or {BUILTIN_DATA}"):
            access.check_sources(demo_cfg(**{"data.source": name}))
    with pytest.raises(access.Refused, match="configuration '../x' is not a configuration name"):
        access.check_sources(demo_cfg(**{"data.source": "org/x", "data.hub_config": "../x"}))
    # data files: only the run's own uploads/ (written by the app), and only inside the runs folder
    uploads = root / "run-1" / "uploads"
    inside = demo_cfg(**{"data.source": "files", "data.train": str(uploads / "train-t.csv")})
    access.check_sources(inside, uploads=uploads)
    with pytest.raises(access.Refused, match="^The train file '/etc/passwd' is a path on this server"):
        access.check_sources(demo_cfg(**{"data.train": "/etc/passwd"}), uploads=uploads)
    escape = demo_cfg(**{"data.source": "files", "data.test": str(uploads / ".." / ".." / "secret.csv")})
    with pytest.raises(access.Refused, match="The test file .* is a path on this server"):
        access.check_sources(escape, uploads=uploads)
    with pytest.raises(access.Refused, match="The train file"):
        access.check_sources(inside, uploads=None)
    with pytest.raises(access.Refused, match="The train file"):  # an uploads folder outside the runs folder
        access.check_sources(demo_cfg(**{"data.train": str(tmp_path / "up" / "t.csv")}), uploads=tmp_path / "up")
    monkeypatch.setenv(access.LOCAL_PATHS_ENV, "1")
    access.check_sources(demo_cfg(**{"model.name": "/etc", "data.train": "/etc/passwd"}))


def test_jobs_launch_refuses_a_planted_path_before_making_anything(tmp_path, monkeypatch, started):
    root = tmp_path / "runs"
    monkeypatch.setenv(rundir.RUNS_ENV, str(root))
    monkeypatch.setenv(access.PASSWORD_ENV, "pw")
    planted = tmp_path / "planted"
    planted.mkdir()
    for changes in (
        {"model.name": str(planted)},
        {"data.source": str(planted)},
        {"data.source": "files", "data.train": str(planted / "train.jsonl")},
    ):
        with pytest.raises(access.Refused, match="local paths are off"):
            jobs.launch(demo_cfg(**changes), password="pw")
    with pytest.raises(access.Refused, match="is not a Hub id"):
        jobs.launch_with_uploads(demo_cfg(**{"model.name": str(planted)}), {"train": ("t.csv", b"x")}, password="pw")
    assert not root.exists() and not started.calls
    # the app's own uploads still work in password mode
    data = b"premise,hypothesis,label\n" + b"".join(b"a %d,b,%d\n" % (i, i % 3) for i in range(12))
    run = jobs.launch_with_uploads(demo_cfg(), {"train": ("t.csv", data), "test": ("s.csv", data)}, password="pw")
    assert started.calls[-1][-1] == str(run) and (run / "uploads" / "train-t.csv").read_bytes() == data


# --- the pages in public mode ---------------------------------------------------------------------

ACTION_BUTTONS = {"Launch", "Stop", "Resume", "Push to Hub"}


def runs_of_every_kind(tiny_run: Path, root: Path, pid: int) -> dict[str, Path]:
    done = Path(shutil.copytree(tiny_run, root / tiny_run.name))
    failed = make_failed_run(root)
    stopped = root / "20990101-000000-demo-stopped"
    stopped.mkdir()
    get_preset("demo").save(stopped / "config.json")
    write_status(stopped, state="stopped", created_at=rundir.now_iso(), finished_at=rundir.now_iso())
    return {"done": done, "failed": failed, "stopped": stopped, "running": make_running_run(root, pid)}


def test_read_only_pages_browse_but_show_no_action(tiny_run, tmp_path, monkeypatch, sleeper, started):
    monkeypatch.setenv(access.READ_ONLY_ENV, "1")
    monkeypatch.setenv("HF_TOKEN", "hf_xxx")  # even with a token: no push on a read-only deployment
    runs = runs_of_every_kind(tiny_run, tmp_path / "runs", sleeper.pid)
    for kind, run in runs.items():
        at = start(run.parent, monkeypatch, run=run.name)
        assert at.session_state["run"] == run.name
        shown = set(labels(at, "button"))
        assert not shown & ACTION_BUTTONS, (kind, shown)
        assert not at.get("file_uploader") and not at.text_input, kind  # no settings form, no password field
        assert "Start a new run" not in [e.label for e in at.expander]
        assert any("This is a read-only deployment" in i.value for i in at.info), kind
    assert any(e.proto.text.startswith("training") for e in at.get("progress"))  # the running run is watched
    assert not started.calls and not any(stop_requested(r) for r in runs.values())

    report = json.loads((runs["done"] / "report.json").read_text())
    at = start(runs["done"].parent, monkeypatch, page="report", run=runs["done"].name)
    assert {m.label: m.value for m in at.metric}[
        "Before fine-tuning"
    ] == f"{100 * report['test_before']['accuracy']:.1f}%"
    assert "Download adapter" in labels(at, "download_button")  # browsing: allowed
    assert "Push to the Hugging Face Hub" not in [e.label for e in at.expander] and not at.text_input
    at.switch_page("app_pages/failures.py").run()
    assert "test examples" in text_of(at) and len(at.dataframe[0].value) == report["test_after"]["n"]
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception and at.multiselect(key="compare_runs").value
    at.switch_page("app_pages/playground.py").run()
    assert not at.exception and at.selectbox(key="playground_run").value == runs["done"].name


def test_password_mode_shows_actions_only_after_the_right_password(tmp_path, monkeypatch, started, sleeper):
    monkeypatch.setenv(access.PASSWORD_ENV, "s3cret")
    root = tmp_path / "runs"
    running = make_running_run(root, sleeper.pid)
    sleeper = run_lock_holder(running)  # the stand-in trainer holds the run's lock, as a trainer does
    write_status(running, pid=sleeper.pid)
    at = start(root, monkeypatch, run=running.name)
    field = at.text_input(key="password_field")
    assert field.proto.type == field.proto.PASSWORD and field.placeholder == "Enter the password to launch"
    assert not set(labels(at, "button")) & ACTION_BUTTONS and not at.get("file_uploader")

    field.input("wrong").run()
    assert [e.value for e in at.error] == ["Wrong password: launching a run was refused."]
    assert not set(labels(at, "button")) & ACTION_BUTTONS and PASSWORD_KEY not in at.session_state

    at.text_input(key="password_field").input("s3cret").run()
    assert at.session_state[PASSWORD_KEY] == "s3cret"
    assert "Stop" in labels(at, "button") and "Launch" not in labels(at, "button")  # the form: built when opened
    at.session_state["new_run:watching"] = True  # opens "Start a new run" (what a click does)
    at.run()
    assert {"Stop", "Launch"} <= set(labels(at, "button"))
    at.run()  # remembered for this session: no field any more
    assert not [t for t in at.text_input if t.key == "password_field"]
    assert "Password accepted for this browser session" in text_of(at)
    at.button(key=f"stop:{running.name}").click().run()
    assert stop_requested(running) and sleeper.wait(timeout=10) == -15  # SIGTERM, through core's check
    at.button(key="launch").click().run()
    assert not at.exception, [e.value for e in at.exception]
    new = [r for r in list_runs(root) if r["path"] != running]
    assert len(new) == 1 and started.calls[-1][-1] == str(new[0]["path"])

    other = start(root, monkeypatch, run=running.name)  # another browser session: locked again
    assert other.text_input(key="password_field") and "launch" not in [b.key for b in other.button]


def test_the_train_page_refuses_a_planted_server_path_without_reading_it(tmp_path, monkeypatch, started):
    planted = tmp_path / "planted-model"
    planted.mkdir()  # a model folder whose config.json, if it were read, limits max_length to 16
    (planted / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 16}))
    root = tmp_path / "runs"
    monkeypatch.setenv(access.LOCAL_PATHS_ENV, "1")  # the control: allowed, the folder is read
    at = start(root, monkeypatch)
    at.text_input(key="model@demo").set_value(str(planted)).run()
    assert any("takes at most 16 tokens" in w.value for w in at.warning)

    monkeypatch.setenv(access.LOCAL_PATHS_ENV, "0")
    at = start(root, monkeypatch)
    at.text_input(key="model@demo").set_value(str(planted)).run()
    assert [e.value for e in at.error] == [
        f"Check the settings: Model '{planted}' is not a Hub id: give a Hugging Face Hub id such as microsoft/phi-2, "
        f"or {EMBEDDED_MODEL} or {EMBEDDED_LLM}; local paths are off on this server "
        "(QLORA_STUDIO_ALLOW_LOCAL_PATHS=1 allows them)."
    ]
    assert not any("16 tokens" in w.value for w in at.warning)  # never read
    assert at.button(key="launch_disabled").disabled and not [b for b in at.button if b.key == "launch"]
    at.text_input(key="model@demo").set_value(EMBEDDED_MODEL)
    at.radio(key="data_kind@demo").set_value("hub").run()
    for source, why in ((str(tmp_path), "is not a Hub id"), ("tests/data", "is also the name of a file or folder")):
        at.text_input(key="hub_id@demo").set_value(source).run()
        assert at.error and at.error[0].value.startswith(f"Check the settings: Hub dataset id '{source}' {why}")
        assert at.button(key="launch_disabled").disabled
    at.text_input(key="hub_id@demo").set_value("stanfordnlp/snli").run()
    assert not at.error and not list(root.glob("*")) and not started.calls


# --- data text shown literally ----------------------------------------------------------------------


class TextAndTags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def shown(parsed: TextAndTags) -> str:
    """The text a reader sees (plain's invisible word joiners left out)."""
    return "".join(parsed.text).replace("\u2060", "")


def render(markdown: str) -> TextAndTags:
    """CommonMark (the spec Streamlit's renderer follows) plus GitHub's tables and strikethrough."""
    parsed = TextAndTags()
    parsed.feed(MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown))
    return parsed


@pytest.mark.parametrize(
    "text",
    [
        EVIL_PREMISE,
        EVIL_HYPOTHESIS,
        EVIL_TAG,
        "# heading",
        "1. list",
        "> quote",
        "| a | b |\n|---|---|\n| c | d |",
        "~~gone~~",
        "&amp; &lt;b&gt;",
        "a\\*b\\",
        "line one\nline two",
        "foo\n===",
        "- item",
        "    indented",
        "[ref]: http://e.x",
    ],
)
def test_plain_text_renders_as_itself(text):
    got = render(plain(text))
    assert set(got.tags) <= {"p", "br"}, got.tags  # no link, image, HTML, heading, list, table, code, emphasis
    assert " ".join(shown(got).split()) == " ".join(text.split())


def test_the_failures_page_shows_data_text_literally(tiny_run, tmp_path, monkeypatch):
    run = evil_run(tiny_run, tmp_path / "runs")
    at = start(run.parent, monkeypatch, page="failures")
    md = [m.value for m in at.markdown]
    premise = next(m for m in md if m.startswith("**Premise:**"))
    hypothesis = next(m for m in md if m.startswith("**Hypothesis:**"))
    gold = next(m for m in md if m.startswith("**Gold:**"))
    assert (
        premise == f"**Premise:** {plain(EVIL_PREMISE)}" and hypothesis == f"**Hypothesis:** {plain(EVIL_HYPOTHESIS)}"
    )
    assert gold.endswith(f" · **tag:** {plain(EVIL_TAG)}")
    for line in (premise, hypothesis, gold):
        got = render(line)
        assert set(got.tags) <= {"p", "strong"}, (line, got.tags)  # the page's own bold only: no a, img, b
    assert shown(render(premise)).strip() == f"Premise: {EVIL_PREMISE}"


# --- the adapter: download and push -----------------------------------------------------------------


def best_folder(run: Path) -> Path:
    return run / "checkpoints" / f"epoch-{json.loads((run / 'report.json').read_text())['best_epoch']}"


def test_the_adapter_zip_unzips_into_a_folder_that_loads_and_predicts_the_same(tiny_run, tmp_path):
    from core.classifier import load_classifier

    folder = best_folder(tiny_run)
    data = share.zip_folder(folder, name=f"{tiny_run.name}-{folder.name}")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names == [f"{tiny_run.name}-{folder.name}/{p.name}" for p in sorted(folder.iterdir())]
    assert {"adapter_config.json", "adapter_model.safetensors", "classifier.json", "README.md"} <= {
        n.split("/", 1)[1] for n in names
    }
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    unzipped = tmp_path / f"{tiny_run.name}-{folder.name}"
    rows = [
        {"premise": "A man is playing a guitar on stage.", "hypothesis": "Nobody is making music."},
        {"premise": "Two dogs run in a park.", "hypothesis": "Animals are outside."},
    ]
    import numpy as np

    np.testing.assert_allclose(
        load_classifier(unzipped).predict(rows), load_classifier(folder).predict(rows), atol=1e-5
    )
    with pytest.raises(ValueError, match="is not a checkpoint folder with a trained adapter"):
        share.zip_folder(tiny_run)


class FakeApi:
    """Records HfApi calls (the network is not reachable here)."""

    calls: list = []

    def __init__(self, token=None, **kw):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        from huggingface_hub import RepoUrl

        FakeApi.calls.append(("create_repo", repo_id, kw))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw))


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tiny_run, monkeypatch):
    import huggingface_hub

    folder = best_folder(tiny_run)
    with pytest.raises(ValueError) as e:
        share.push_to_hub(folder, "me/adapter")
    assert str(e.value) == (
        "Set HF_TOKEN (a write token from huggingface.co/settings/tokens) as a secret/environment variable to push."
    )
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    url = share.push_to_hub(folder, "adapter")  # a bare name: the token owner's namespace
    assert url == "https://huggingface.co/me/adapter"
    (_, token), (_, repo, create), (_, upload) = FakeApi.calls
    assert token == "hf_test_token" and repo == "adapter"
    assert create == {"repo_type": "model", "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/adapter" and Path(upload["folder_path"]) == folder
    assert sorted(upload["allow_patterns"]) == sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match="'../x' is not a Hub repository id"):
        share.push_to_hub(folder, "../x")
    monkeypatch.setenv(access.PASSWORD_ENV, "pw")
    with pytest.raises(access.Refused, match="Pushing an adapter to the Hub needs this deployment's password"):
        share.push_to_hub(folder, "me/adapter")
    share.push_to_hub(folder, "me/adapter", private=False, password="pw")
    assert FakeApi.calls[-2][2]["private"] is False
    monkeypatch.setenv(access.READ_ONLY_ENV, "1")
    with pytest.raises(access.Refused, match="read-only deployment"):
        share.push_to_hub(folder, "me/adapter", password="pw")


class Refusing(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_push_failures_are_one_sentence(tiny_run, monkeypatch):
    import huggingface_hub.constants

    folder = best_folder(tiny_run)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody there
    with pytest.raises(ValueError) as e:
        share.push_to_hub(folder, "me/adapter")
    assert str(e.value).startswith(
        f"could not push {folder.name} to me/adapter: the Hugging Face Hub could not be reached ("
    ) and str(e.value).endswith("): check the network connection")
    assert "\n" not in str(e.value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)  # a Hub that refuses the token
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(ValueError) as e:
            share.push_to_hub(folder, "me/adapter")
    finally:
        server.shutdown()
    assert str(e.value) == (
        f"could not push {folder.name} to me/adapter: the Hub refused the token (401): check "
        "that HF_TOKEN is a valid token"
    )


def test_the_report_page_offers_the_adapter_and_says_what_pushing_needs(tiny_run, tmp_path, monkeypatch):
    import huggingface_hub

    root = tmp_path / "runs"
    run = Path(shutil.copytree(tiny_run, root / tiny_run.name))
    at = start(root, monkeypatch, page="report")
    assert "Download adapter" in labels(at, "download_button")
    assert [i.value for i in at.info if "HF_TOKEN" in i.value] == [share.NO_TOKEN]  # no token: what it needs
    assert "Push to Hub" not in labels(at, "button")

    monkeypatch.setenv(access.PASSWORD_ENV, "pw")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    at = start(root, monkeypatch, page="report")
    assert "Pushing needs this deployment's password" in text_of(at) and "Push to Hub" not in labels(at, "button")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    at = start(root, monkeypatch, page="report", state={PASSWORD_KEY: "pw"})  # entered on the Train page
    at.text_input(key="push_repo").set_value("me/nli-adapter").run()
    at.button(key="push").click().run()
    assert [s.value for s in at.success] == ["Pushed to https://huggingface.co/me/nli-adapter"]
    assert FakeApi.calls[-1][1]["folder_path"] == str(best_folder(run))
