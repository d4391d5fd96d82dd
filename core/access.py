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
    check("launch", password, who=sid)   # the same, a wrong password counted for browser session `sid`
    check_sources(cfg, uploads=folder)   # Refused when cfg names a local path where none is allowed

Wrong passwords are slowed down and locked out (guesses): each failure waits a delay that doubles
with the session's recent failures and grows with the server's; after LOCKOUT_FAILURES failures
of one session, or SERVER_LOCKOUT_FAILURES of the whole server, within LOCKOUT_WINDOW_S, every
password is refused until the window has passed. Each failure is one warning line in the
server's log (never the guess).

The CLI (`python -m core train`) is local and trusted: it checks none of this. jobs.launch,
launch_with_uploads, stop and resume, and share.push_to_hub call check() first; jobs.launch also
check_sources().
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections import deque
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
# The file loaders the `datasets` library has built in (datasets.packaged_modules): load_dataset
# given one of these names reads files from this server's working folder instead of the Hub.
# tests/app/test_hardening.py checks this list against the installed datasets.
DATASETS_BUILDERS = (
    "arrow",
    "audiofolder",
    "cache",
    "conll",
    "csv",
    "eval",
    "fasta",
    "fastq",
    "genbank",
    "generator",
    "harbor",
    "hdf5",
    "iceberg",
    "imagefolder",
    "json",
    "lance",
    "meshfolder",
    "mmcif",
    "niftifolder",
    "pandas",
    "parquet",
    "pdb",
    "pdffolder",
    "spark",
    "sql",
    "text",
    "tsfile",
    "videofolder",
    "vortex",
    "webdataset",
    "xml",
)
_OFF = ("", "0", "false", "no", "off")

FAIL_DELAY_S = 0.5
"""The wait after a session's first wrong password; it doubles with each more (MAX_DELAY_S at most)."""
SERVER_DELAY_S = 0.1
"""What each recent wrong password on the whole server adds to every failure's wait."""
MAX_DELAY_S = 8.0
"""The longest wait after one wrong password."""
LOCKOUT_FAILURES = 10
"""Wrong passwords of one browser session, within LOCKOUT_WINDOW_S, that lock it out."""
SERVER_LOCKOUT_FAILURES = 50
"""Wrong passwords of the whole server, within LOCKOUT_WINDOW_S, that lock every session out."""
LOCKOUT_WINDOW_S = 600.0
"""How long a failure counts, and so how long a lockout lasts at most."""

log = logging.getLogger("qlora_studio.access")


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


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def password_ok(typed: str | None) -> bool:
    """Whether `typed` is the deployment's password (their SHA-256 digests compared in constant
    time, so neither the content nor the length shows in the time taken); True when there is no
    password to give. A yes/no only: check() counts the failures."""
    wanted = password()
    if wanted is None:
        return True
    return typed is not None and hmac.compare_digest(_digest(str(typed)), _digest(wanted))


class Failures:
    """Recent wrong passwords, per browser session and for the whole server, with the delay and
    the lockout they earn (module doc). Thread-safe: one instance, FAILURES, serves every session."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep):
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._server: deque[float] = deque()
        self._sessions: dict[str, deque[float]] = {}

    def _recent(self, times: deque[float], now: float) -> int:
        while times and now - times[0] > LOCKOUT_WINDOW_S:
            times.popleft()
        return len(times)

    def locked_for(self, who: str | None) -> float:
        """Seconds until `who` (a session, None: a call without one) may try a password again; 0 when it may."""
        with self._lock:
            now = self.clock()
            waits = []
            if self._recent(self._server, now) >= SERVER_LOCKOUT_FAILURES:
                waits.append(LOCKOUT_WINDOW_S - (now - self._server[-SERVER_LOCKOUT_FAILURES]))
            mine = self._sessions.get(who) if who else None
            if mine is not None and self._recent(mine, now) >= LOCKOUT_FAILURES:
                waits.append(LOCKOUT_WINDOW_S - (now - mine[-LOCKOUT_FAILURES]))
            return max(waits, default=0.0)

    def failed(self, who: str | None, what: str) -> float:
        """Record a wrong password for `what` (e.g. "launching a run") by `who`, log it and wait the
        delay it earns; returns that delay in seconds."""
        with self._lock:
            now = self.clock()
            self._server.append(now)
            server = self._recent(self._server, now)
            session = 0
            if who:
                mine = self._sessions.setdefault(who, deque())
                mine.append(now)
                session = self._recent(mine, now)
                if len(self._sessions) > 10_000:  # sessions that went away: keep only those with recent failures
                    self._sessions = {k: v for k, v in self._sessions.items() if self._recent(v, now)}
        delay = min(MAX_DELAY_S, FAIL_DELAY_S * 2 ** (max(session, 1) - 1) + SERVER_DELAY_S * (server - 1))
        log.warning(
            "wrong password for %s (session %s): %d failure(s) of this session and %d of the server in the "
            "last %.0f s; waiting %.1f s",
            what,
            who or "none",
            session,
            server,
            LOCKOUT_WINDOW_S,
            delay,
        )
        self.sleep(delay)
        return delay

    def succeeded(self, who: str | None) -> None:
        """The right password: the session's own failures are forgotten (the server's count on)."""
        if who:
            with self._lock:
                self._sessions.pop(who, None)

    def clear(self) -> None:
        with self._lock:
            self._server.clear()
            self._sessions.clear()


FAILURES = Failures()


def allowed(action: str, typed: str | None = None) -> bool:
    """Whether check() would let `action` run with `typed`, for pages deciding what to show (a
    question, not an attempt: it counts no failure and waits no delay)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    if read_only():
        return False
    return password() is None or (bool(typed) and password_ok(typed) and not FAILURES.locked_for(None))


def check(action: str, typed: str | None = None, who: str | None = None) -> None:
    """Refused when `action` (one of ACTIONS) may not run here: always on a read-only deployment;
    with a password set, unless `typed` is that password. A wrong password is counted for browser
    session `who` (None: for the server only), waits its delay and is logged; while the session or
    the server is locked out (Failures), every password is refused."""
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
    wait = FAILURES.locked_for(who)
    if wait:
        raise Refused(
            f"Too many wrong passwords: {what} was refused, and every password is refused for "
            f"{max(1, round(wait / 60))} more minute(s)."
        )
    if not password_ok(typed):
        FAILURES.failed(who, what)
        raise Refused(f"Wrong password: {what} was refused.")
    FAILURES.succeeded(who)


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
    if kind.startswith("Hub dataset") and name.lower() in DATASETS_BUILDERS:
        return (
            f"{kind} {name!r} is the name of a file loader of the datasets library, which would read files "
            f"on this server instead of the Hub: give {choices}; {how}."
        )
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
