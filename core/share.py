"""Sharing a run's fine-tuned adapter: a zip to download, or a model repository on the Hub.

    data = zip_folder(run / "checkpoints" / "epoch-2", name="RUN-epoch-2")   # the zip's bytes
    url = push_to_hub(run / "checkpoints" / "epoch-2", "you/my-adapter")      # needs a write token
    data = merged_zip(run, name="RUN-merged")          # the merged model (core/export.py), zipped
    url = push_merged(run, "you/my-classifier")        # ... or pushed

An epoch folder is a portable classifier (adapter + head, tokenizer, classifier.json, README.md
model card; see core/checkpoint.py and core/classifier.py): the zip and the Hub repository hold
exactly its files. A merged export (the base dequantised, LoRA merged in, the head included: plain
transformers loads it) is written into a temporary folder, then zipped or pushed the same way; the
Report page offers it for runs of at most MERGED_MAX_PARAMS parameters. Pushing needs a token with
write access: HF_TOKEN, or the one `hf auth login` stored; without one, push_to_hub raises
ValueError(NO_TOKEN). Every failure is a ValueError in one sentence (a refused token, no network,
...), never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

from . import access
from .runs.rundir import ADAPTER_CONFIG, CLASSIFIER_FILE

# huggingface_hub is imported where it is used: the Report page imports this file, and only a push
# (or asking for the stored token) needs it.

MERGED_MAX_PARAMS = 200_000_000  # merged downloads are built in memory: the Report page offers them up to this size
NO_TOKEN = "Set HF_TOKEN (a write token from huggingface.co/settings/tokens) as a secret/environment variable to push."


def merged_info(folder: Path) -> dict | None:
    """classifier.json's `merged` entry of a merged export (core/export.py), None for other folders."""
    try:
        info = json.loads((Path(folder) / CLASSIFIER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    merged = info.get("merged") if isinstance(info, dict) else None
    return merged if isinstance(merged, dict) else None


def epoch_files(folder: Path) -> list[Path]:
    """The regular files of a checkpoint folder (or of a merged export), sorted, symbolic links left
    out (and never followed: linked folders are not entered); ValueError when it is neither a folder
    of a finished epoch (no adapter_config.json) nor an export, or when it or checkpoints/ is itself a link."""
    folder = Path(folder)
    for linked in (folder, *folder.parents[:1]):  # checkpoints/epoch-<k>: an imported run may link them anywhere
        if linked.is_symlink():
            raise ValueError(f"{linked} is a symbolic link, which is never followed in a run folder")
    if not (folder / ADAPTER_CONFIG).is_file() and merged_info(folder) is None:
        raise ValueError(f"{folder} is not a checkpoint folder with a trained adapter (no {ADAPTER_CONFIG})")
    files = []
    for top, _, names in os.walk(folder):  # does not descend into linked folders
        files += [Path(top) / n for n in names if not (Path(top) / n).is_symlink() and (Path(top) / n).is_file()]
    return sorted(files)


def zip_folder(folder: Path, name: str | None = None) -> bytes:
    """A zip (in memory) of checkpoint folder `folder`, its files in one folder `name` (default:
    the folder's own name), so unzipping gives a folder that load_classifier and
    AutoPeftModelForSequenceClassification.from_pretrained read as it is."""
    folder = Path(folder)
    root = name or folder.name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for path in epoch_files(folder):
            z.write(path, f"{root}/{path.relative_to(folder).as_posix()}")
    return buf.getvalue()


def merged_zip(run_dir: Path, name: str, dtype: str | None = None) -> bytes:
    """The merged model of the run's selected epoch (core/export.py, its default dtype) as a zip of
    one folder `name`, which AutoModelForSequenceClassification.from_pretrained reads as it is."""
    from .export import export_merged  # torch and the model: only when asked for

    with tempfile.TemporaryDirectory(prefix="qlora-merged-") as tmp:
        out = Path(tmp) / name
        export_merged(Path(run_dir), out, dtype=dtype, check_rows=0)
        return zip_folder(out, name)


def push_merged(
    run_dir: Path, repo_id: str, token: str | None = None, private: bool = True, password: str | None = None
) -> str:
    """push_to_hub for the merged model of the run's selected epoch, exported into a temporary folder
    (the checks that need no export come first)."""
    from .export import export_merged  # see merged_zip

    access.check("push", password)
    check_repo_id(repo_id)
    if not (token or hub_token()):
        raise ValueError(NO_TOKEN)
    with tempfile.TemporaryDirectory(prefix="qlora-merged-") as tmp:
        out = Path(tmp) / f"{Path(run_dir).name}-merged"
        export_merged(Path(run_dir), out, check_rows=0)
        return push_to_hub(out, repo_id, token=token, private=private, password=password)


def hub_token() -> str | None:
    """The Hugging Face token this process would push with: HF_TOKEN, else the stored login."""
    from huggingface_hub import get_token  # here, not at the top: see the imports

    try:
        return get_token()
    except Exception:  # noqa: BLE001 - a broken token store is the same as no token here
        return None


def _reason(error: BaseException) -> str:
    """Why a Hub call failed, in words a user can act on."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled  # see the imports

    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be sent to the Hub"
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            return "the Hub refused the token (401): check that HF_TOKEN is a valid token"
        if status == 403:
            return (
                "the token may not write there (403): use a token with write access, to a namespace "
                "you own or belong to"
            )
        if status == 409:
            return "the Hub reports a conflict (409): the name may be taken by a dataset or Space of yours"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the Hub answered with an error ({status or 'no status'}: {first})"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (
        f"the Hugging Face Hub could not be reached ({type(error).__name__}{': ' + text if text else ''}): "
        "check the network connection"
    )


def check_repo_id(repo_id: str) -> str:
    """`repo_id` stripped, or a ValueError saying what a Hub repository id looks like."""
    repo_id = (repo_id or "").strip()
    if not access.is_hub_id(repo_id):
        raise ValueError(
            f"{repo_id!r} is not a Hub repository id: use NAME or OWNER/NAME, letters, digits, '.', "
            "'_' and '-' (e.g. you/qlora-nli-adapter)"
        )
    return repo_id


def push_to_hub(
    folder: Path, repo_id: str, token: str | None = None, private: bool = True, password: str | None = None
) -> str:
    """Create the model repository `repo_id` on the Hub if it does not exist (private unless said
    otherwise) and upload the checkpoint folder's files into it; returns the repository's URL.
    access.Refused on a read-only deployment or without the password (core/access.py);
    ValueError(NO_TOKEN) without a token; ValueError in one sentence when the Hub refuses or
    cannot be reached."""
    access.check("push", password)
    repo_id = check_repo_id(repo_id)
    folder = Path(folder)
    files = epoch_files(folder)
    token = token or hub_token()
    if not token:
        raise ValueError(NO_TOKEN)
    from huggingface_hub import HfApi  # here, not at the top: see the imports

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        full_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(
            repo_id=full_id,
            folder_path=str(folder),
            repo_type="model",
            allow_patterns=[p.relative_to(folder).as_posix() for p in files],
            commit_message=_commit_message(folder),
        )
    except Exception as e:  # noqa: BLE001 - the network and the Hub fail in many ways; one sentence each
        raise ValueError(f"could not push {folder.name} to {repo_id}: {_reason(e)}") from e
    return str(url)


def _commit_message(folder: Path) -> str:
    merged = merged_info(folder)
    if merged:
        return f"Upload the merged model of {merged.get('run_id')} epoch-{merged.get('epoch')} from QLoRA Studio"
    return f"Upload {folder.parent.parent.name} {folder.name} from QLoRA Studio"
