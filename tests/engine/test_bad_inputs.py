"""Bad inputs: each case of the README's "Bad inputs" table, with its exact message (or its start).

Real `python -m core` subprocesses where the error comes before training (a wrong-typed config,
Ctrl-C while the run loads); `core.__main__.main()` in-process for the other CLI cases
(the same code, without a new interpreter's imports; a guard fails the test if training would
start); the functions themselves for data files; AppTest for the upload checks. No training run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from core.__main__ import main
from core.config import DataConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig, get_preset, override
from core.data import load_splits, to_examples
from core.tables import iter_table, read_table
from tests.helpers import ROOT

PAIR = {"premise": "A man plays a guitar.", "hypothesis": "A person makes music."}


def cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "core", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def nli_rows(n: int, **extra) -> list[dict]:
    labels = ["entailment", "neutral", "contradiction"]
    return [
        {
            "premise": f"A man plays guitar number {i}.",
            "hypothesis": f"Someone plays {i}.",
            "label": labels[i % 3],
            **extra,
        }
        for i in range(n)
    ]


@pytest.fixture
def no_training(monkeypatch):
    """main(["train", ...]) in-process must fail before training: if it got there, fail loudly."""
    import core.train

    def refuse(*a, **k):
        raise AssertionError("training started: the bad input was not caught before")

    monkeypatch.setattr(core.train, "train", refuse)


def run_main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --- the command line and the settings ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_run(tmp_path_factory) -> Path:
    """A run folder by hand: a tiny random BERT (word-level tokenizer) in 4 bits with LoRA, its
    epoch-0 and epoch-1 adapters, config.json and report.json: enough for `evaluate`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForSequenceClassification, BertConfig, PreTrainedTokenizerFast

    from core.model import add_lora, load_model

    tmp_path = tmp_path_factory.mktemp("tiny-bert-run")
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=3,
            pad_token_id=0,
        )
    ).save_pretrained(folder)
    words = sorted({w.strip(".") for r in nli_rows(6) for w in (r["premise"] + " " + r["hypothesis"]).split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    cfg = RunConfig(
        model=ModelConfig(name=str(folder)),
        data=DataConfig(max_length=32),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        train=TrainConfig(epochs=1),
    )
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg.save(run / "config.json")
    model = add_lora(load_model(cfg.model, 3, 0, torch.device("cpu"), torch.float32), cfg.lora)
    for k in (0, 1):
        model.save_pretrained(run / "checkpoints" / f"epoch-{k}", safe_serialization=True)
    (run / "report.json").write_text(json.dumps({"best_epoch": 1}))
    return run


def test_evaluate_on_a_file_named_test_works_and_says_where_the_predictions_went(tiny_bert_run, tmp_path, capsys):
    run = tiny_bert_run
    data = write_jsonl(
        tmp_path / "test.jsonl",
        nli_rows(6) + [{**PAIR, "label": "-"}, {"premise": "", "hypothesis": "x", "label": "neutral"}],
    )
    code = main(["evaluate", str(run), "--data", str(data)])
    out, err = capsys.readouterr()
    assert code == 0, err
    before, after = run / "predictions" / "test-file_before.jsonl", run / "predictions" / "test-file_after.jsonl"
    assert "test-file: n=6 (dropped 1 unlabelled, 1 with an empty text)" in out
    assert f"predictions: {before}, {after}" in out
    assert len(before.read_text().splitlines()) == len(after.read_text().splitlines()) == 6
    assert not (run / "predictions" / "test_before.jsonl").exists()  # the run's own test predictions untouched


def test_evaluate_refuses_a_reserved_name_a_non_run_folder_and_a_missing_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", nli_rows(3))
    code, err = run_main(capsys, "evaluate", run, "--data", data)
    assert code == 2 and f"error: {run} is not a run folder (no config.json)" in err
    RunConfig().save(run / "config.json")
    code, err = run_main(capsys, "evaluate", run, "--data", data, "--name", "test")
    assert code == 2 and "error: invalid evaluation name 'test': use 1-60 letters" in err and "(e.g. test-file)" in err
    code, err = run_main(capsys, "evaluate", run, "--data", tmp_path / "nope.jsonl")
    assert code == 2 and f"error: data file not found: {tmp_path / 'nope.jsonl'}" in err
    code, err = run_main(capsys, "evaluate", run, "--data", data)  # no checkpoint: said before any model loads
    assert code == 2 and "has no trained adapter yet" in err


@pytest.mark.e2e
def test_a_config_file_with_wrong_types_exits_2_naming_the_field(tmp_path):
    cfg = get_preset("demo").to_dict()
    for section, key, value, message in [
        ("train", "epochs", "three", "error: train.epochs must be an integer, not 'three'"),
        ("train", "lr", "0.001", "error: train.lr must be a finite number, not '0.001'"),
    ]:
        bad = json.loads(json.dumps(cfg))
        bad[section][key] = value
        (tmp_path / "c.json").write_text(json.dumps(bad))
        p = cli("train", "--config", tmp_path / "c.json", "--run-dir", tmp_path / "r")
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("model", "name", 5, "model.name must be a string, not 5"),
        ("model", "double_quant", "yes", "model.double_quant must be true or false, not 'yes'"),
        ("data", "labels", [0, 1, 2], "data.labels must be a list of strings, not [0, 1, 2]"),
        ("data", "max_train_rows", 2.5, "data.max_train_rows must be an integer or null, not 2.5"),
        ("lora", "alpha", None, "lora.alpha must be a finite number, not None"),
        ("train", "epochs", True, "train.epochs must be an integer, not True"),
        ("train", "warmup_ratio", "0.1", "train.warmup_ratio must be a finite number, not '0.1'"),
    ],
)
def test_every_wrong_type_is_named(section, key, value, message):
    d = get_preset("demo").to_dict()
    d[section][key] = value
    with pytest.raises(ValueError) as e:
        RunConfig.from_dict(d)
    assert str(e.value) == message


def test_labels_given_as_one_string_are_split_into_class_names(tmp_path):
    d = get_preset("demo").to_dict()
    d["data"]["labels"] = "entailment, not_entailment"
    (tmp_path / "c.json").write_text(json.dumps(d))
    assert RunConfig.load(tmp_path / "c.json").data.labels == ["entailment", "not_entailment"]
    with pytest.raises(ValueError, match="data.labels needs at least two classes"):
        DataConfig(labels="entailment")
    assert DataConfig(label_map={"yes": 0}).label_map == {"yes": "0"}  # an id, as --label-map yes=0 gives


@pytest.mark.parametrize(
    "dotted,value,message",
    [
        ("data.max_length", 4, "data.max_length must be between 8 and 8192"),
        ("data.max_length", 100_000, "data.max_length must be between 8 and 8192"),
        ("data.max_train_rows", 0, "data.max_train_rows must be a positive integer or null"),
        ("data.max_validation_rows", -5, "data.max_validation_rows must be a positive integer or null"),
        ("data.max_test_rows", 0, "data.max_test_rows must be a positive integer or null"),
        ("data.validation_fraction", 0.5, "data.validation_fraction must be in (0, 0.5)"),
        ("lora.r", 0, "lora.r must be an integer in [1, 1024]"),
        ("lora.alpha", 0, "lora.alpha must be positive"),
        ("lora.alpha", float("inf"), "lora.alpha must be a finite number, not inf"),
        ("lora.dropout", 1.0, "lora.dropout must be in [0, 1)"),
        ("train.epochs", 0, "train.epochs must be an integer in [1, 1000]"),
        ("train.lr", 2.0, "train.lr must be in (0, 1)"),
        ("train.lr", float("nan"), "train.lr must be a finite number, not nan"),
        ("train.head_lr", 0.0, "train.head_lr must be in (0, 1) or null"),
        ("train.weight_decay", -0.1, "train.weight_decay must be >= 0"),
        ("train.warmup_ratio", 1.0, "train.warmup_ratio must be in [0, 1)"),
        ("train.batch_size", 0, "train.batch_size must be a positive integer"),
        ("train.micro_batch_size", 5, "train.micro_batch_size must divide train.batch_size"),
        ("train.eval_batch_size", 0, "train.eval_batch_size must be a positive integer"),
        ("train.max_grad_norm", 0.0, "train.max_grad_norm must be positive or null"),
        ("train.seed", -1, "train.seed must be in [0, 2**32)"),
        ("train.threads", 0, "train.threads must be a positive integer or null"),
        ("speed.eval_tokens", 0, "speed.eval_tokens must be a positive integer"),
        ("speed.micro_tokens", -1, "speed.micro_tokens must be a non-negative integer or null"),
    ],
)
def test_every_numeric_setting_out_of_range_is_refused_with_its_name(dotted, value, message):
    with pytest.raises(ValueError) as e:
        override(get_preset("demo"), {dotted: value})
    assert str(e.value) == message


def test_config_file_problems_are_named(tmp_path):
    (tmp_path / "c.json").write_text('{"train": {"epochs": 2,}}')
    with pytest.raises(ValueError, match=r"config file .*c.json is not valid JSON"):
        RunConfig.load(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"train": {"epoch": 2}}')
    with pytest.raises(ValueError, match=r"unknown keys in train: \['epoch'\]"):
        RunConfig.load(tmp_path / "c.json")
    with pytest.raises(ValueError, match="config file not found"):
        RunConfig.load(tmp_path / "missing.json")


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "three"])
    assert e.value.code == 2 and "argument --epochs: invalid int value: 'three'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--label-map", "0:entailment"])
    assert (
        e.value.code == 2
        and "--label-map takes RAW=NAME pairs such as 0=entailment, not '0:entailment'" in capsys.readouterr().err
    )


def test_a_runs_folder_that_cannot_be_written_gets_one_sentence(tmp_path, monkeypatch, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(blocker))
    code, err = run_main(capsys, "train", "--preset", "demo")
    assert code == 2 and err.startswith(f"error: {blocker} is a file where a folder is needed: set QLORA_STUDIO_RUNS")
    assert "Traceback" not in err
    # /sys refuses new folders even to root: a real read-only place
    monkeypatch.setenv("QLORA_STUDIO_RUNS", "/sys/qlora-studio-runs")
    code, err = run_main(capsys, "train", "--preset", "demo")
    assert code == 2 and err.startswith("error: cannot write /sys/qlora-studio-runs (")
    assert "set QLORA_STUDIO_RUNS (or --run-dir) to a folder you can write" in err


def test_a_run_id_that_would_leave_the_runs_folder_is_refused(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path / "runs"))
    code, err = run_main(capsys, "train", "--preset", "demo", "--run-id", "../escape")
    assert code == 2 and err.startswith("error: invalid run id '../escape': use 1-80 letters, digits, '.', '_' or '-'")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


def test_a_full_disk_names_the_folder(tmp_path, monkeypatch, capsys, no_training):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # every write of the run folder syncs: where ENOSPC shows
    run = tmp_path / "run"
    code, err = run_main(capsys, "train", "--preset", "demo", "--run-dir", run)
    assert code == 2 and err.startswith(f"error: no space left on the disk of {run}: free some space")


@pytest.mark.real_model
@pytest.mark.e2e
def test_ctrl_c_prints_one_line_exits_130_and_marks_the_run_stopped(tmp_path):
    run = tmp_path / "run"

    # SIGINT as a terminal delivers it: a test runner started in the background (`cmd &` in a
    # script) has SIGINT ignored, which the child would inherit and Python would then keep
    def default_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "core",
            "train",
            "--preset",
            "demo",
            "--max-train-rows",
            "64",
            "--epochs",
            "1",
            "--run-dir",
            str(run),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )

    def phase():
        return (json.loads((run / "status.json").read_text()) if (run / "status.json").is_file() else {}).get("phase")

    try:
        deadline = time.time() + 90
        while phase() in (None, "starting") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)  # until train() runs (loading data and model)
        assert proc.poll() is None and phase() not in (None, "starting"), proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            print(proc.communicate())
    # 130, or killed by SIGINT: what a shell reads as 130 too. CPython ends by SIGINT when the
    # KeyboardInterrupt went through an exec() of a string (a dataclass's __init__ being made while
    # transformers imports), even though `core` caught it and returned 130
    assert proc.returncode in (130, -signal.SIGINT), (out[-2000:], err[-3000:])
    last = err.strip().splitlines()[-1]
    assert (
        "Traceback" not in err
        and last == f"interrupted (Ctrl-C); run folder {run} marked stopped, what it wrote is kept"
    )
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"


def test_a_ctrl_c_that_a_library_swallows_still_stops_the_run_at_the_next_step(tmp_path):
    from core.runs import rundir
    from core.train import Stopped, StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest(tmp_path)
    try:
        caught = None
        try:  # a library importing inside a bare `except:` while the model loads (CI saw one)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here, in the main thread
        except BaseException as e:  # noqa: BLE001 - the swallowing library
            caught = e
        assert isinstance(caught, KeyboardInterrupt)  # Ctrl-C still acts at once
        with pytest.raises(KeyboardInterrupt):
            stop.check()  # and is not forgotten: the next step ends the run as stopped
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    fresh = StopRequest(tmp_path)
    try:
        fresh.check()  # no signal, no STOP file: it trains on
        (tmp_path / rundir.STOP).write_text("")
        with pytest.raises(Stopped):  # the Stop button is a stop, not an interrupt
            fresh.check()
    finally:
        fresh.restore()


def test_max_length_above_the_model_limit_is_refused_before_loading(tmp_path, capsys, no_training):
    code, err = run_main(capsys, "train", "--preset", "demo", "--max-length", "1024", "--run-dir", tmp_path / "r")
    assert (
        code == 2
        and (
            "error: data.max_length is 1024 but model 'embedded:all-MiniLM-L6-v2' takes at most 512 "
            "tokens (max_position_embeddings in its config.json): use --max-length 512 or less"
        )
        in err
    )
    assert not (tmp_path / "r").exists()  # nothing made


def test_a_model_folder_that_does_not_exist_gets_one_sentence(tmp_path, capsys, no_training):
    code, err = run_main(capsys, "train", "--preset", "demo", "--model", "./no-such-model", "--run-dir", tmp_path / "r")
    assert code == 2 and err.strip() == (
        "error: model folder './no-such-model' does not exist: give a folder in "
        "Hugging Face format (one saved with save_pretrained, holding config.json) "
        "or a Hub id such as microsoft/phi-2"
    )
    (tmp_path / "empty").mkdir()
    code, err = run_main(
        capsys, "train", "--preset", "demo", "--model", tmp_path / "empty", "--run-dir", tmp_path / "r"
    )
    assert code == 2 and f"error: model folder '{tmp_path / 'empty'}' has no config.json" in err
    assert not (tmp_path / "r").exists()


def test_a_hub_model_not_in_the_cache_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    from core.config import ModelConfig
    from core.model import load_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as e:
        load_tokenizer(ModelConfig(name="no-such-org/no-such-model"))
    assert str(e.value) == (
        "could not load the tokenizer of model 'no-such-org/no-such-model': it is not a local folder and not in the "
        "Hugging Face cache, and HF_HUB_OFFLINE is set. Without network access, download it where there is network "
        "(hf download no-such-org/no-such-model) and copy the Hugging Face cache here, or give a local folder in "
        "Hugging Face format (e.g. one saved with save_pretrained) as --model."
    )


def remote_code_model(tmp_path: Path) -> Path:
    """A model folder whose config.json maps to its own code (which would leave a mark if it ran)."""
    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qlora-studio-custom",
                "hidden_size": 8,
                "max_position_embeddings": 512,
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForSequenceClassification": "modeling_custom.CustomModel",
                },
            }
        )
    )
    mark = tmp_path / "code-ran"
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(f"open({str(mark)!r}, 'w').write('ran')\n")
    return folder


def test_a_model_that_needs_remote_code_is_refused_naming_the_variable(tmp_path, capsys, monkeypatch, no_training):
    from core.model import REMOTE_CODE_ENV, check_model, load_model, load_tokenizer

    monkeypatch.delenv(REMOTE_CODE_ENV, raising=False)
    folder = remote_code_model(tmp_path)
    message = (
        f"model '{folder}' needs its own Python code to load (auto_map in its config.json), and running a "
        "model's code is off: if you trust that code, set the environment variable "
        "QLORA_STUDIO_TRUST_REMOTE_CODE=1"
    )
    code, err = run_main(capsys, "train", "--preset", "demo", "--model", folder, "--run-dir", tmp_path / "r")
    assert code == 2 and err.startswith(f"error: {message}")
    cfg = override(get_preset("demo"), {"model.name": str(folder)})
    for load in (
        lambda: check_model(cfg),
        lambda: load_tokenizer(cfg.model),
        lambda: load_model(cfg.model, 3, 0, torch.device("cpu"), torch.float32),
    ):
        with pytest.raises(RuntimeError) as e:
            load()
        assert str(e.value).startswith(message)
    assert not (tmp_path / "code-ran").exists() and not (tmp_path / "r").exists()


def test_remote_code_runs_only_with_the_variable_and_trust_is_always_explicit(tmp_path, monkeypatch):
    from core.model import REMOTE_CODE_ENV, check_model, pretrained_source

    folder = remote_code_model(tmp_path)
    monkeypatch.delenv(REMOTE_CODE_ENV, raising=False)
    assert pretrained_source(str(folder))[1]["trust_remote_code"] is False
    monkeypatch.setenv(REMOTE_CODE_ENV, "1")
    assert pretrained_source(str(folder))[1]["trust_remote_code"] is True
    check_model(override(get_preset("demo"), {"model.name": str(folder)}))  # allowed: no error
    # every Auto*.from_pretrained (model, tokenizer, config) in core/ passes trust_remote_code, itself or
    # in the **source of pretrained_source
    import ast

    calls = 0
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("from_pretrained", "get_config_dict")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id.startswith(("Auto", "Pretrained"))
            ):
                calls += 1
                names = {k.arg for k in node.keywords}
                assert "trust_remote_code" in names or None in names or node.func.attr == "get_config_dict", (
                    f"{path.relative_to(ROOT)}:{node.lineno} loads without trust_remote_code"
                )
    assert calls >= 4


# --- data files ---------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    good = json.dumps({**PAIR, "label": "neutral"}) + "\n"
    (tmp_path / "latin1.jsonl").write_bytes(
        good.encode() + '{"premise": "café", "hypothesis": "x", "label": 0}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError) as e:
        read_table(tmp_path / "latin1.jsonl")
    assert str(e.value) == (
        f"{tmp_path / 'latin1.jsonl'}: line 2 is not UTF-8 text (byte 0xe9 at byte offset "
        f"{len(good.encode()) + 16} of the file): save the file as UTF-8"
    )
    (tmp_path / "latin1.csv").write_bytes("premise,hypothesis,label\ncafé,x,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: line 2 is not UTF-8 text \(byte 0xe9 at byte offset 28 "):
        read_table(tmp_path / "latin1.csv")
    (tmp_path / "latin1.json").write_bytes('[\n{"premise": "café"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json: line 2 is not UTF-8 text \(byte 0xe9 at byte offset 18 "):
        read_table(tmp_path / "latin1.json")


def test_files_that_cannot_be_parsed_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"premise": "x"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON \(Expecting property name"):
        read_table(tmp_path / "bad.jsonl")
    (tmp_path / "wide.csv").write_text("premise,hypothesis,label\na,b,neutral\na, b, c,neutral\n")
    with pytest.raises(
        ValueError,
        match=r"wide.csv: line 3 has 4 fields, the header has 3 \(a text holding a comma "
        r"needs quotes\)",
    ):
        read_table(tmp_path / "wide.csv")
    (tmp_path / "twice.csv").write_text("premise,label,label\na,b,c\n")
    with pytest.raises(ValueError, match=r"twice.csv: column 'label' appears more than once in the header"):
        read_table(tmp_path / "twice.csv")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake.parquet: could not read as Parquet"):
        read_table(tmp_path / "fake.parquet")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"a.txt: unsupported file type '.txt'"):
        read_table(tmp_path / "a.txt")
    with pytest.raises(ValueError, match=r"data file not found: .*missing.jsonl"):
        iter_table(tmp_path / "missing.jsonl")  # at once, before any row is asked for


def test_missing_columns_say_which_and_list_the_columns(tmp_path):
    rows = [{"sentence": "x", "gold": "neutral"}]
    with pytest.raises(ValueError) as e:
        to_examples(rows, DataConfig(), "train", source="t.csv")
    assert str(e.value).startswith(
        "train (t.csv): no label column found (tried label, gold_label); columns are "
        "['sentence', 'gold']. Name it with --label-column."
    )
    with pytest.raises(ValueError, match=r"^test: premise column 's1' not found; columns are \['a', 'label'\]"):
        to_examples([{"a": "x", "label": 0}], DataConfig(premise_column="s1"), "test")


def test_an_unknown_label_names_split_file_and_row(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", nli_rows(3) + [{**PAIR, "label": "maybe"}])
    with pytest.raises(ValueError) as e:
        load_splits(DataConfig(source="files", train=str(data), test=str(data)), seed=0)
    assert str(e.value) == (
        f"train (file {data}) row 4: unknown label 'maybe'; expected one of ['entailment', "
        "'neutral', 'contradiction'] or an id 0..2 (use a label mapping to rename values)"
    )
    with pytest.raises(ValueError, match=r"^test row 1: label id 7 is out of range"):
        to_examples([{**PAIR, "label": 7}], DataConfig(), "test")


def test_rows_without_labels_and_with_empty_texts_are_dropped_counted_and_said(tmp_path, capsys):
    rows = nli_rows(12) + [
        {**PAIR, "label": "-"},
        {**PAIR, "label": None},
        {"premise": "", "hypothesis": "x", "label": "neutral"},
        {"premise": "   ", "hypothesis": "x", "label": "neutral"},
        {"premise": "x", "label": "neutral"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", nli_rows(3))
    splits, stats = load_splits(DataConfig(source="files", train=str(train), test=str(test)), seed=0)
    st = stats["train"]
    assert st["rows_read"] == 17 and st["dropped_unlabelled"] == 2 and st["dropped_empty"] == 3
    assert st["kept"] == 12 and st["empty_rows"] == [15, 16, 17]
    assert st["warnings"] == [
        "train: dropped 2 of 17 rows without a gold label (-1, '-', empty or null)",
        "train: dropped 3 of 17 rows with an empty premise, hypothesis or text (rows 15, 16, 17)",
    ]
    err = capsys.readouterr().err
    assert "warning: train: dropped 3 of 17 rows with an empty premise" in err
    examples, s = to_examples(
        [{"text": " ", "label": "neutral"}, {"text": "ok", "label": "neutral"}], DataConfig(text_column="text"), "t"
    )
    assert [e.text for e in examples] == ["ok"] and s.dropped_empty == 1


def test_a_split_left_with_no_rows_is_refused_naming_its_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", nli_rows(6))
    empty_texts = write_jsonl(tmp_path / "blank.jsonl", [{"premise": "", "hypothesis": "", "label": "neutral"}] * 3)
    with pytest.raises(ValueError) as e:
        load_splits(DataConfig(source="files", train=str(empty_texts), test=str(good)), seed=0)
    assert str(e.value) == (
        f"train: no usable rows in file {empty_texts}: of 3 rows, 0 have no gold label and 3 an "
        "empty premise, hypothesis or text"
    )
    unlabelled = write_jsonl(tmp_path / "val.jsonl", [{**PAIR, "label": "-1"}] * 2)
    with pytest.raises(ValueError, match=r"^validation: no usable rows in file .*val.jsonl: of 2 rows, 2 have no gold"):
        load_splits(DataConfig(source="files", train=str(good), validation=str(unlabelled), test=str(good)), seed=0)
    (tmp_path / "zero.csv").write_text("")
    with pytest.raises(ValueError, match=r"^test: file .*zero.csv has no rows"):
        load_splits(DataConfig(source="files", train=str(good), test=str(tmp_path / "zero.csv")), seed=0)
    one = write_jsonl(tmp_path / "one.jsonl", nli_rows(1))
    with pytest.raises(ValueError, match=r"^train: only 1 usable row, too few to hold out validation rows"):
        load_splits(DataConfig(source="files", train=str(one), test=str(good)), seed=0)
    with pytest.raises(ValueError, match=r"^no test rows: give --test FILE"):
        load_splits(DataConfig(source="files", train=str(good)), seed=0)


def test_more_rows_asked_than_a_split_holds_is_a_warning_not_an_error(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", nli_rows(30))
    test = write_jsonl(tmp_path / "test.jsonl", nli_rows(9))
    splits, stats = load_splits(
        DataConfig(source="files", train=str(train), test=str(test), max_train_rows=500, max_test_rows=9), seed=0
    )
    assert len(splits["train"]) == 27 and len(splits["test"]) == 9  # 3 carved out as validation
    assert stats["train"]["warnings"] == [
        "train: asked for 500 rows (data.max_train_rows), only 27 are usable: using all 27"
    ]
    assert stats["test"]["warnings"] == []
    assert "warning: train: asked for 500 rows" in capsys.readouterr().err


def test_large_files_are_streamed_not_read_whole(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 25_000
    text = "".join(
        json.dumps(
            {
                "premise": f"A fairly long premise sentence number {i} for size.",
                "hypothesis": f"Hypothesis {i}.",
                "label": i % 3,
            }
        )
        + "\n"
        for i in range(n)
    )
    (tmp_path / "big.jsonl").write_text(text)
    (tmp_path / "big.csv").write_text(
        "premise,hypothesis,label\n"
        + "".join(f"A fairly long premise sentence number {i} for size.,Hypothesis {i}.,{i % 3}\n" for i in range(n))
    )
    size = (tmp_path / "big.jsonl").stat().st_size
    assert size > 2_000_000
    del text
    for name in ("big.jsonl", "big.csv"):
        tracemalloc.start()
        count = sum(1 for _ in iter_table(tmp_path / name))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n and peak < size / 20, (name, peak, size)  # a few rows at a time, not the file
    # mapping consumes the stream: only Examples are kept
    consumed = []

    def stream():
        for i, row in enumerate(iter_table(tmp_path / "big.jsonl")):
            consumed.append(i)
            yield row

    examples, stats = to_examples(stream(), DataConfig(), "train")
    assert len(examples) == stats.rows_read == len(consumed) == n
    # Parquet: by record batches, across row groups, without pandas' saved index column
    table = pa.table(
        {
            "premise": ["p"] * 20_000,
            "hypothesis": ["h"] * 20_000,
            "label": [1] * 20_000,
            "__index_level_0__": list(range(20_000)),
        }
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=3_000)
    it = iter_table(tmp_path / "big.parquet")
    assert next(it) == {"premise": "p", "hypothesis": "h", "label": 1}
    assert 1 + sum(1 for _ in it) == 20_000


# --- uploads in the app -------------------------------------------------------------------------


def test_every_uploaded_split_is_checked_like_the_trainer(tmp_path):
    from core import uploads

    cfg = DataConfig(premise_column="s1", hypothesis_column="s2", label_column="gold")
    good = [{"s1": "a", "s2": "b", "gold": i % 3} for i in range(6)]
    assert uploads.check_split(cfg, "train", good) == (None, [])
    problem, _ = uploads.check_split(cfg, "test", [{"s1": "a", "s2": "b", "gold": "maybe"}])
    assert problem.startswith("test row 1: unknown label 'maybe'")
    problem, _ = uploads.check_split(cfg, "validation", [{"sentence1": "a", "sentence2": "b", "gold": 0}])
    assert problem.startswith(
        "validation: premise column 's1' not found; columns are ['sentence1', 'sentence2', 'gold']"
    )
    problem, _ = uploads.check_split(cfg, "test", [{"s1": "", "s2": "b", "gold": 0}])
    assert problem == "test: no usable rows: of 1 rows, 0 have no gold label and 1 an empty premise, hypothesis or text"
    assert uploads.check_split(cfg, "test", []) == ("the test file has no rows", [])
    _, notes = uploads.check_split(cfg, "train", good + [{"s1": "a", "s2": "", "gold": 1}])
    assert notes == ["train: dropped 1 of 7 rows with an empty premise, hypothesis or text (rows 7)"]
    with pytest.raises(ValueError) as e:
        uploads.read_upload("my data.csv", "s1,s2,gold\ncafé,b,0\n".encode("latin-1"))
    assert str(e.value).startswith("my data.csv: line 2 is not UTF-8 text (byte 0xe9")


def test_the_train_page_checks_every_upload_and_the_model_before_launch(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("QLORA_STUDIO_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240)
    at.run()
    at.radio(key="data_kind@demo").set_value("upload").run()
    train = "premise,hypothesis,label\n" + "".join(f"A man plays {i}.,A person plays.,{i % 3}\n" for i in range(12))
    at.file_uploader(key="upload:train").set_value(("train.csv", train.encode(), "text/csv"))
    at.file_uploader(key="upload:validation").set_value(("val.csv", b"s1,s2,label\na,b,0\n", "text/csv"))
    at.file_uploader(key="upload:test").set_value(("test.csv", b"premise,hypothesis,label\na,b,maybe\n", "text/csv"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert any(
        w.startswith(
            "column/label mapping of the validation file: validation: premise column 'premise' "
            "not found; columns are ['s1', 's2', 'label']"
        )
        for w in warnings
    ), warnings
    assert any(
        w.startswith("column/label mapping of the test file: test row 1: unknown label 'maybe'") for w in warnings
    ), warnings
    assert at.button(key="launch").disabled
    at.file_uploader(key="upload:validation").set_value(("val.csv", b"premise,hypothesis,label\nc,d,1\n", "text/csv"))
    at.file_uploader(key="upload:test").set_value(("test.csv", b"premise,hypothesis,label\na,b,0\n,b,1\n", "text/csv"))
    at.run()
    assert not any("column/label mapping" in w.value for w in at.warning)
    assert any("test: dropped 1 of 2 rows with an empty premise" in i.value for i in at.info)
    assert not at.button(key="launch").disabled
    at.number_input(key="max_length@demo").set_value(1024).run()
    assert any(
        w.value.startswith(
            "model: data.max_length is 1024 but model 'embedded:all-MiniLM-L6-v2' takes at most 512 tokens"
        )
        for w in at.warning
    )
    assert at.button(key="launch").disabled
    assert not list((tmp_path / "runs").glob("*"))


def test_saving_uploads_on_a_full_disk_names_the_folder_and_leaves_no_half_file(tmp_path, monkeypatch):
    from core import uploads

    class FullDisk:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(uploads, "open", FullDisk, raising=False)
    with pytest.raises(ValueError) as e:
        uploads.save_uploads(tmp_path / "run", {"train": ("t.jsonl", b"{}\n")})
    folder = tmp_path / "run" / "uploads"
    assert str(e.value) == (
        f"could not save the uploaded train file into {folder}: No space left on device "
        "(the disk is full: free some space)"
    )
    assert not list(folder.iterdir())
