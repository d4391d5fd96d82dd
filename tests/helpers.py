"""Helpers that tests in several rooms call: the project's paths, tiny random models built offline,
the app under AppTest with run folders written by hand, a Streamlit server and Debian's chromium for
the browser tests, and a run folder whose texts try to inject markup. Fixtures live in conftest.py;
these are plain functions and constants (`from tests.helpers import ...`)."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.config import get_preset
from core.runs import rundir
from core.runs.state import write_status

ROOT = Path(__file__).resolve().parents[1]  # the repository
SNLI = ROOT / "tests" / "data" / "snli"  # 240/60/60 genuine SNLI rows, see its README
CPU = torch.device("cpu")


# --- tiny random models (no download) ------------------------------------------------------


def tiny_config(arch: str):
    from transformers import BertConfig, LlamaConfig, PhiConfig

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_labels=3
    )
    if arch == "phi":
        return PhiConfig(partial_rotary_factor=0.5, eos_token_id=1, bos_token_id=1, pad_token_id=None, **common)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, eos_token_id=1, bos_token_id=1, pad_token_id=None, **common)
    return BertConfig(pad_token_id=0, **common)


def save_tiny_model(arch: str, folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch))
    model.save_pretrained(folder)
    return folder


def tiny_decoder_config(family: str, **overrides):
    """A tiny random config (2 layers, hidden 64) of one decoder family, with what makes the family
    itself: grouped key/value heads, a sliding window of 8 tokens (shorter than the test rows) where
    the family has one, q/k norms (Qwen3, Gemma 3), the fused qkv projection (Phi-3), partial rotary
    (Phi). `overrides` replace fields (e.g. Gemma 2's attn_logit_softcapping)."""
    import transformers

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    families = {
        "phi": ("PhiConfig", dict(partial_rotary_factor=0.4, num_key_value_heads=4)),
        "llama": ("LlamaConfig", {}),
        "mistral": ("MistralConfig", dict(sliding_window=8)),
        "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
        "qwen3": ("Qwen3Config", dict(head_dim=16)),
        "gemma": ("GemmaConfig", dict(head_dim=16)),
        "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
        "gemma3_text": (
            "Gemma3TextConfig",
            dict(
                head_dim=16,
                sliding_window=8,
                query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention"],
            ),
        ),
        "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5)),
    }
    name, extra = families[family]
    return getattr(transformers, name)(**{**common, **extra, **overrides})


def save_word_tokenizer(folder: Path, words: list[str], causal: bool) -> None:
    """A word-level tokenizer built offline. Causal: EOS only, no pad token (as Phi and Llama)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "</s>"] if causal else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words))[: 256 - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if causal:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    else:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    fast.save_pretrained(folder)


def train_tiny(arch: str, tmp_path: Path, lora: dict | None = None, speed: dict | None = None, **train) -> Path:
    """A real run (core.train.train, in this process) of a tiny random `arch` model ("llama": a
    causal LM, "bert": a [CLS] encoder) on 48 SNLI rows, 2 epochs, a few seconds on a CPU; `lora`
    sets LoraSettings fields (e.g. variant), `speed` SpeedConfig fields, `train` TrainConfig fields
    (e.g. report_to). Returns the run folder, tmp_path / "run"."""
    from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, SpeedConfig, TrainConfig
    from core.train import train as train_run

    rows = [json.loads(l) for l in (SNLI / "train.jsonl").read_text().splitlines()[:200]]
    words = [w for r in rows for w in (r["premise"] + " " + r["hypothesis"]).replace(".", " . ").split()]
    folder = save_tiny_model(arch, tmp_path / "model")
    save_word_tokenizer(folder, words + ["Premise", "Hypothesis", "Relation", ":"], causal=arch != "bert")
    cfg = RunConfig(
        model=ModelConfig(name=str(folder)),
        data=DataConfig(
            source="files",
            train=str(SNLI / "train.jsonl"),
            test=str(SNLI / "test.jsonl"),
            max_train_rows=48,
            max_validation_rows=16,
            max_test_rows=24,
            max_length=64,
        ),
        lora=LoraSettings(**{"r": 4, "alpha": 8, "dropout": 0.0, **(lora or {})}),
        train=TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, "head_lr": 1e-2, **train}),
        speed=SpeedConfig(**(speed or {})),
    )
    train_run(cfg, tmp_path / "run")
    return tmp_path / "run"


# --- the app under AppTest, run folders written by hand ---------------------------------------


def start(
    runs_root: Path,
    monkeypatch,
    page: str | None = None,
    run: str | None = None,
    state: dict | None = None,
    params: dict | None = None,
) -> AppTest:
    """The app over `runs_root`, `run` selected, `state` in the session, then `params` in the
    query string and `page` opened; no exception and no last-resort error on the way."""
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(runs_root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    if run:
        at.query_params["run"] = run
    for k, v in (state or {}).items():
        at.session_state[k] = v
    at.run()
    for k, v in (params or {}).items():
        at.query_params[k] = v
    if page:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not any("could not be shown" in e.value for e in at.error)  # the frame's last-resort guard (app.py)
    return at


def text_of(at: AppTest) -> str:
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def make_failed_run(root: Path) -> Path:
    run = root / "20990101-000000-demo-fail"
    run.mkdir(parents=True)
    get_preset("demo").save(run / "config.json")
    write_status(
        run,
        state="failed",
        pid=None,
        created_at="2099-01-01T00:00:00+00:00",
        started_at="2099-01-01T00:00:00+00:00",
        finished_at="2099-01-01T00:00:09+00:00",
        error="RuntimeError: boom at step 3",
        traceback='Traceback (most recent call last):\n  File "core/train.py", line 1\nRuntimeError: boom',
    )
    (run / "train.log").write_text("run folder: x\nloading model\nRuntimeError: boom at step 3\n")
    return run


def run_lock_holder(run: Path) -> subprocess.Popen:
    """A live process that holds `run`'s trainer lock (core.runs.liveness.hold_run_lock), as a real
    trainer does from its claim on: the only kind of process Stop signals. The caller ends it."""
    code = (
        "import sys, time\n"
        "from core.runs.liveness import hold_run_lock\n"
        "assert hold_run_lock(sys.argv[1]) is not None\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def make_running_run(root: Path, pid: int) -> Path:
    """A run whose trainer (`pid`) is alive: 3 of 8 steps done."""
    run = root / "20990101-000000-demo-live"
    run.mkdir(parents=True)
    get_preset("demo").save(run / "config.json")
    started = time.time() - 30
    write_status(
        run, state="running", phase="training", pid=pid, created_at=rundir.now_iso(), started_at=rundir.now_iso()
    )
    m = run / "metrics.jsonl"
    rundir.append_jsonl(
        m,
        {
            "t": started,
            "kind": "setup",
            "total_steps": 8,
            "epochs": 2,
            "steps_per_epoch": 4,
            "device": "cpu",
            "compute_dtype": "float32",
            "labels": ["a", "b", "c"],
        },
    )
    rundir.append_jsonl(
        m,
        {
            "t": started + 2,
            "kind": "eval",
            "split": "validation",
            "stage": "before",
            "accuracy": 0.4,
            "loss": 1.1,
            "n": 20,
            "seconds": 2.0,
        },
    )
    rundir.append_jsonl(
        m,
        {
            "t": started + 4,
            "kind": "eval",
            "split": "test",
            "stage": "before",
            "accuracy": 0.3,
            "loss": 1.1,
            "n": 30,
            "seconds": 3.0,
        },
    )
    for step in (1, 2, 3):
        rundir.append_jsonl(
            m,
            {
                "t": started + 4 + 3 * step,
                "kind": "step",
                "step": step,
                "epoch": 1,
                "epoch_step": step,
                "steps_per_epoch": 4,
                "loss": 1.1 - 0.01 * step,
                "rows": 32,
                "samples_per_s": 10.0,
                "tokens_per_s": 300.0,
                "pad_fraction": 0.1,
                "step_s": 3.2,
            },
        )
    for i in range(5):
        rundir.append_jsonl(
            run / "resources.jsonl", {"t": started + i, "cpu_percent": 90.0 + i, "rss_gb": 0.5, "ram_used_gb": 2.0}
        )
    return run


# --- a Streamlit server and Debian's chromium ------------------------------------------------


CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


VIEWPORT = {"width": 1360, "height": 960}


def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run the browser test")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(tmp_path: Path, env: dict):
    """`streamlit run app.py` on a free loopback port with `env`; yields its URL once healthy,
    always killed at the end (its log in tmp_path/streamlit.log)."""
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.address",
            "127.0.0.1",
            "--server.port",
            str(port),
            "--server.fileWatcherType",
            "none",
            "--browser.gatherUsageStats",
            "false",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("streamlit did not come up:\n" + (tmp_path / "streamlit.log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def settle(page, timeout=120):
    """Wait until the script run that the last action triggered has finished."""
    page.wait_for_timeout(400)
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout * 1000)
    page.wait_for_timeout(300)


# --- data texts that try to inject markup ----------------------------------------------------


EVIL_PREMISE = (
    "[click me](http://evil.example/x) ![img](http://evil.example/a.png) <b>raw</b> "
    "www.evil.example :red[red] :smile: *em* `code` $x^2$"
)


EVIL_HYPOTHESIS = '<img src=x onerror="alert(1)"> http://evil.example/bare a@evil.example'


EVIL_TAG = "**tag** [t](http://evil.example/t)"


def evil_run(tiny_run: Path, root: Path, checkpoints: bool = False) -> Path:
    """A copy of the tiny run whose test rows carry a link, an image and HTML in their texts."""
    skip = shutil.ignore_patterns("state-*" if checkpoints else "checkpoints")
    run = Path(shutil.copytree(tiny_run, root / tiny_run.name, ignore=skip))
    for name in ("test_before.jsonl", "test_after.jsonl"):
        path = run / "predictions" / name
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for r in rows:
            r.update(premise=EVIL_PREMISE, hypothesis=EVIL_HYPOTHESIS, tag=EVIL_TAG)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run
