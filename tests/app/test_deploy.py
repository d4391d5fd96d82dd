"""The GPU Space / container: the Dockerfile's essentials, README.md's Space front matter, and the
image's start command (deploy/start.sh) run on this host with a temporary folder standing in for
/data (docker itself is not needed)."""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        lines.append(current)
        current = ""
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]


def test_the_dockerfile_has_the_essentials():
    ins = dockerfile()
    names = [i for i, _ in ins]
    assert names[0] == "FROM" and "3.11" in ins[0][1]  # Python 3.11
    runs = [a for i, a in ins if i == "RUN"]
    assert any(re.search(r"\bpip install\b.*-r requirements\.txt\b", a) for a in runs)  # the pinned versions
    assert any(i == "COPY" and "requirements.txt" in a for i, a in ins)
    users = [a.strip() for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))  # non-root
    assert any(i == "RUN" and "--uid 1000" in a for i, a in ins)  # Spaces run the container as uid 1000
    assert any(i == "WORKDIR" for i in names)
    assert ("EXPOSE", "8501") in ins
    assert names[-1] == "CMD" and names.index("USER") < names.index("CMD")
    cmd = ins[-1][1]
    assert cmd.startswith("[") and "deploy/start.sh" in cmd
    start = (ROOT / "deploy" / "start.sh").read_text()
    exec_line = next(l for l in start.splitlines() if l.startswith("exec "))
    assert "streamlit run app.py" in exec_line
    assert {"--server.address", "0.0.0.0", "--server.headless", "true", "--server.port"} <= set(shlex.split(exec_line))
    assert "PORT:-8501" in exec_line  # 8501 unless PORT says otherwise


def test_dockerignore_keeps_environments_runs_and_history_out():
    ignored = {
        l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")
    }
    assert {".venv", "runs", ".git", "bench/h200-*", "**/__pycache__"} <= ignored


SPACE_KEYS = {
    "title",
    "emoji",
    "colorFrom",
    "colorTo",
    "sdk",
    "python_version",
    "sdk_version",
    "suggested_hardware",
    "suggested_storage",
    "app_file",
    "app_port",
    "base_path",
    "fullWidth",
    "header",
    "short_description",
    "models",
    "datasets",
    "tags",
    "thumbnail",
    "pinned",
    "hf_oauth",
    "hf_oauth_scopes",
    "hf_oauth_expiration_minutes",
    "hf_oauth_authorized_org",
    "disable_embedding",
    "startup_duration_timeout",
    "custom_headers",
    "preload_from_hub",
    "license",
}
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


def test_readme_front_matter_is_a_docker_space_on_port_8501():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    front, rest = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["sdk"] == "docker" and meta["app_port"] == 8501 and meta["title"] == "QLoRA Studio"
    assert set(meta) <= SPACE_KEYS, set(meta) - SPACE_KEYS  # only keys the Spaces config reference knows
    assert meta["colorFrom"] in COLORS and meta["colorTo"] in COLORS
    assert meta["suggested_hardware"] in ("t4-small", "t4-medium", "l4x1")
    assert len(meta.get("short_description", "")) <= 60
    assert rest.lstrip().startswith("# QLoRA Studio")
    assert "## Deploy to a GPU Space" in rest


# --- the start command on this host ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def start(tmp_path: Path, data: Path) -> tuple[subprocess.Popen, int, Path]:
    port, home, log = free_port(), tmp_path / "home", tmp_path / "start.log"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("QLORA_STUDIO_RUNS", "HF_HOME", "QLORA_STUDIO_ALLOW_LOCAL_PATHS")
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` is this venv's
        HOME=str(home),
        QLORA_STUDIO_DATA=str(data),
        PORT=str(port),
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["sh", "deploy/start.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return proc, port, log


def health(proc: subprocess.Popen, port: int, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"start.sh exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer on port {port} within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the server's environment from /proc")
def test_start_sh_serves_the_app_with_runs_and_the_model_cache_on_the_data_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    proc, port, log = start(tmp_path, data)
    try:
        assert health(proc, port, log) == "ok"
        env = environ_of(proc.pid)  # start.sh execs the server: same process
        assert env["QLORA_STUDIO_RUNS"] == str(data / "runs") and (data / "runs").is_dir()
        assert env["HF_HOME"] == str(data / ".huggingface")
        assert env["QLORA_STUDIO_ALLOW_LOCAL_PATHS"] == "0"  # in the image: Hub ids and built-in names only
        assert f"runs folder {data / 'runs'}" in log.read_text()
    finally:
        stop(proc)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the server's environment from /proc")
def test_start_sh_without_a_data_folder_keeps_runs_in_the_home_folder_and_says_so(tmp_path):
    proc, port, log = start(tmp_path, tmp_path / "no-such-volume")
    try:
        assert health(proc, port, log) == "ok"
        env = environ_of(proc.pid)
        assert env["QLORA_STUDIO_RUNS"] == str(tmp_path / "home" / "runs") and "HF_HOME" not in env
        assert not (tmp_path / "no-such-volume").exists()  # nothing made where the volume would be
        assert "is missing or not writable" in log.read_text()
    finally:
        stop(proc)
