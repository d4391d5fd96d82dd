"""Public mode: what a visitor of a shared deployment may do, checked in core so that no page,
widget or crafted call gets around it. Three environment variables, read at every check:

    QLORA_STUDIO_READ_ONLY=1       browse only: runs, reports, failures, compare, playground and
                                   downloads work; launch, stop, resume, upload and push are refused
    QLORA_STUDIO_PASSWORD=...      (unless read-only) those actions need this password
    QLORA_STUDIO_ALLOW_LOCAL_PATHS 1: model and data fields may name local folders and files;
                                   0: only Hub ids and the embedded / built-in names; unset: 1 on
                                   a plain local server, 0 in public mode (read-only or password set);
                                   deploy/start.sh (the container, the Space) sets 0 unless it is given

    check("launch", password)            # Refused (a ValueError) when this action is not allowed
    check_sources(cfg, uploads=folder)   # Refused when cfg names a local path where none is allowed

The CLI (`python -m core train`) is local and trusted: it checks none of this. jobs.launch,
launch_with_uploads, stop and resume, and share.push_to_hub call check() first; jobs.launch also
check_sources().
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

from .config import BUILTIN_DATA, EMBEDDED_LLM, EMBEDDED_MODEL, RunConfig
from .runs.rundir import PROJECT_ROOT, runs_root

READ_ONLY_ENV = "QLORA_STUDIO_READ_ONLY"
PASSWORD_ENV = "QLORA_STUDIO_PASSWORD"
LOCAL_PATHS_ENV = "QLORA_STUDIO_ALLOW_LOCAL_PATHS"
ACTIONS = {
    "launch": "launching a run",
    "stop": "stopping a run",
    "resume": "resuming a run",
    "upload": "uploading files",
    "push": "pushing an adapter to the Hub",
}
MODEL_NAMES = (EMBEDDED_MODEL, EMBEDDED_LLM)  # the names that are neither a Hub id nor a path
DATA_NAMES = (BUILTIN_DATA,)
# A Hub repository id: `name` or `owner/name`, each part letters, digits, '.', '_', '-', starting
# and ending with a letter or digit, at most 96 characters, no '..' or '--' (the Hub's own rules).
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
CONFIG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_OFF = ("", "0", "false", "no", "off")


class Refused(ValueError):
    """An action or a setting that this deployment does not allow; its text says why, in one sentence."""


def read_only() -> bool:
    """Whether QLORA_STUDIO_READ_ONLY is set (any value but empty, 0, false, no, off)."""
    return os.environ.get(READ_ONLY_ENV, "").strip().lower() not in _OFF


def password() -> str | None:
    """The deployment's password (QLORA_STUDIO_PASSWORD), None when there is none (unset or empty)."""
    value = os.environ.get(PASSWORD_ENV, "")
    return value if value.strip() else None


def public() -> bool:
    """Whether this server is in public mode: read-only, or actions behind a password."""
    return read_only() or password() is not None


def password_ok(typed: str | None) -> bool:
    """Whether `typed` is the deployment's password (compared in constant time); True when
    there is no password to give."""
    wanted = password()
    if wanted is None:
        return True
    return typed is not None and hmac.compare_digest(str(typed).encode("utf-8"), wanted.encode("utf-8"))


def allowed(action: str, typed: str | None = None) -> bool:
    """check() as a yes/no, for pages deciding what to show."""
    try:
        check(action, typed)
    except Refused:
        return False
    return True


def check(action: str, typed: str | None = None) -> None:
    """Refused when `action` (one of ACTIONS) may not run here: always on a read-only deployment;
    with a password set, unless `typed` is that password."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    what = ACTIONS[action]
    sentence = what[0].upper() + what[1:]
    if read_only():
        raise Refused(
            f"{sentence} is off: this is a read-only deployment ({READ_ONLY_ENV} is set), "
            "where runs can be browsed but not launched, stopped, resumed, uploaded or pushed."
        )
    if password() is None:
        return
    if typed is None or not str(typed):
        raise Refused(f"{sentence} needs this deployment's password: enter it in the password field.")
    if not password_ok(typed):
        raise Refused(f"Wrong password: {what} was refused.")


def local_paths_allowed() -> bool:
    """Whether model and data fields may name local folders and files: QLORA_STUDIO_ALLOW_LOCAL_PATHS
    when it is set (1 or 0), else yes on a plain local server and no in public mode."""
    value = os.environ.get(LOCAL_PATHS_ENV, "").strip()
    if value:
        return value.lower() not in _OFF
    return not public()


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub repository id (`name` or `owner/name`, nothing else)."""
    return isinstance(name, str) and HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def _names_a_local_path(name: str) -> bool:
    """Whether a Hub-shaped name is also a file or folder next to the app (the trainer and
    datasets would read that instead of the Hub)."""
    return any((base / name).exists() for base in (Path.cwd(), PROJECT_ROOT))


def _hub_name_problem(kind: str, name: str, known: tuple[str, ...], example: str) -> str | None:
    if name in known:
        return None
    choices = f"a Hugging Face Hub id such as {example}, or {' or '.join(known)}"
    how = f"local paths are off on this server ({LOCAL_PATHS_ENV}=1 allows them)"
    if not is_hub_id(name):
        return f"{kind} {name!r} is not a Hub id: give {choices}; {how}."
    if _names_a_local_path(name):
        return (
            f"{kind} {name!r} is also the name of a file or folder on this server, which would be read "
            f"instead of the Hub: give {choices}; {how}."
        )
    return None


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def check_sources(cfg: RunConfig, uploads: Path | None = None) -> None:
    """Refused when local paths are not allowed here (local_paths_allowed) and `cfg` names one:
    the model must be a Hub id or the embedded model, the data the built-in sample, a Hub dataset
    id, or files inside `uploads` (the run's own uploads/ folder, which the app itself wrote, and
    only when it is inside the runs folder). Nothing a name points to is opened: only the names
    are looked at (and whether a Hub-shaped name exists next to the app)."""
    if local_paths_allowed():
        return
    problem = _hub_name_problem("Model", cfg.model.name, MODEL_NAMES, "microsoft/phi-2")
    data = cfg.data
    if problem is None and data.source not in ("files", "", None):
        problem = _hub_name_problem("Hub dataset id", data.source, DATA_NAMES, "stanfordnlp/snli")
    if problem is None and data.hub_config and (not CONFIG_NAME.fullmatch(data.hub_config) or ".." in data.hub_config):
        problem = (
            f"Dataset configuration {data.hub_config!r} is not a configuration name: use letters, digits, "
            "'.', '_' and '-'."
        )
    if problem is None:
        ok_folder = uploads is not None and _inside(str(uploads), runs_root())
        for split in ("train", "validation", "test"):
            path = getattr(data, split)
            if path and not (ok_folder and _inside(path, uploads)):
                problem = (
                    f"The {split} file {path!r} is a path on this server, and local paths are off here: "
                    f"upload the file on the Train page instead ({LOCAL_PATHS_ENV}=1 allows paths)."
                )
                break
    if problem:
        raise Refused(problem)
