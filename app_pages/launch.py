"""The "Start a new run" form of the Train page: a preset, then every setting (model, data, LoRA,
training), uploads with their column and label mapping, the checks the trainer would make, the
plan ("What will happen": device, rows, steps, parameters, time and memory estimates) and the
Launch button, which starts the trainer as its own process (core.jobs.launch).
"""

import json

import pandas as pd
import streamlit as st

from app_pages import ui
from app_pages.preview import data_preview
from core import access, estimate, jobs, uploads
from core.config import (
    BUILTIN_DATA,
    BUILTIN_DIR,
    EMBEDDED_LLM,
    EMBEDDED_MODEL,
    NLI_LABELS,
    PRESETS,
    TRACKERS,
    DataConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    get_preset,
    override,
)
from core.model import check_model
from core.runs.watch import format_duration
from core.trackers import check_installed

DATA_CHOICES = {
    "builtin": "Built-in NLI sample",
    "hub": "Hugging Face Hub dataset",
    "upload": "Upload files (CSV / JSONL)",
}
PRESET_LABELS = {
    "demo": "Embedded demo (MiniLM, CPU, offline)",
    "llm-demo": "Embedded causal LM demo (SmolLM2-135M, CPU, offline)",
    "phi2-snli": "Phi-2 on SNLI (GPU, Hub)",
}


@st.cache_data(show_spinner="Reading the model's configuration…", max_entries=32)
def model_facts(model_json: str, n_labels: int, lora_json: str) -> dict:
    """Parameter counts and shape without weights (cached: it builds the model on the meta device)."""
    cfg = RunConfig(
        model=ModelConfig(**json.loads(model_json)),
        data=DataConfig(labels=[f"class{i}" for i in range(n_labels)]),
        lora=LoraSettings(**json.loads(lora_json)),
    )
    return estimate.model_facts_or_error(cfg)


def upload_section(k) -> tuple[dict, dict, dict, list[str]]:
    """Uploaders, previews and column mapping; returns (config changes, files, row counts, errors)."""
    errors: list[str] = []
    files: dict[str, tuple[str, bytes]] = {}
    parsed: dict[str, list[dict]] = {}
    kinds = ["csv", "tsv", "jsonl", "json", "parquet"]
    cols = st.columns(3)
    for col, split, label in zip(
        cols, ("train", "validation", "test"), ("Train file", "Validation file (optional)", "Test file")
    ):
        f = col.file_uploader(label, type=kinds, key=f"upload:{split}")
        if f is None:
            continue
        try:
            rows = uploads.parse_upload(f.name, f.getvalue())  # kept in core, within a budget of bytes
        except ValueError as e:
            col.error(str(e))
            errors.append(f"{split} file: {e}")
            continue
        if not rows:
            col.error("This file has no rows.")
            errors.append(f"{split} file is empty")
            continue
        files[split] = (f.name, f.getvalue())
        parsed[split] = rows
        col.caption(f"{len(rows):,} rows · saved as `uploads/{split}-{uploads.safe_filename(f.name)}`")
    if "train" not in parsed:
        st.info(
            "Upload a **train** and a **test** file (JSONL or CSV, one example per row). "
            "Without a validation file, 10% of the train rows are held out for validation."
        )
        errors.append("upload a train file")
        return {}, files, {}, errors
    if "test" not in parsed:
        errors.append("upload a test file: the before/after report is measured on it")
    rows = parsed["train"]
    columns = list(rows[0].keys())
    st.markdown("**Preview of the train file**")
    st.dataframe(pd.DataFrame(rows[:5]), hide_index=True)
    guess = uploads.guess_columns(columns)
    pair = st.radio(
        "Input",
        ["premise + hypothesis", "single text"],
        horizontal=True,
        key=k("input_kind"),
        index=0 if (guess["premise"] and guess["hypothesis"]) or not guess["text"] else 1,
    )

    def idx(c: str | None) -> int:
        return columns.index(c) if c in columns else 0

    mcols = st.columns(3)
    changes: dict = {}
    if pair == "premise + hypothesis":
        changes["data.premise_column"] = mcols[0].selectbox(
            "Premise column", columns, index=idx(guess["premise"]), key=k("prem_col")
        )
        changes["data.hypothesis_column"] = mcols[1].selectbox(
            "Hypothesis column", columns, index=idx(guess["hypothesis"]), key=k("hyp_col")
        )
    else:
        changes["data.text_column"] = mcols[0].selectbox(
            "Text column", columns, index=idx(guess["text"]), key=k("text_col")
        )
    label_col = mcols[2].selectbox("Label column", columns, index=idx(guess["label"]), key=k("label_col"))
    changes["data.label_column"] = label_col
    values = sorted({str(r.get(label_col)) for r in rows[:5000]})
    names = st.text_input(
        "Class names, in id order",
        ", ".join(NLI_LABELS),
        key=k("labels"),
        help="A label may be a class name or an integer id into this list. "
        "Rows labelled -1, '-' or empty are dropped and counted.",
    )
    changes["data.labels"] = [x.strip() for x in names.split(",") if x.strip()]
    st.caption(
        f"Label values in the train file: {', '.join(map(ui.plain, values[:20]))}{' …' if len(values) > 20 else ''}"
    )
    known = {s: len(r) for s, r in parsed.items()}
    return changes, files, known, errors


def check_mapping(cfg, parsed_rows: list[dict], split: str = "train") -> tuple[str | None, list[str]]:
    """Map every row of one uploaded split exactly as the trainer will (columns, labels, empty
    texts): (the error that would stop the run, or None; notes on rows that would be dropped)."""
    return uploads.check_split(cfg.data, split, parsed_rows)


@st.cache_data(show_spinner=False, max_entries=32, ttl=60)
def model_problem(model_json: str, max_length: int) -> str | None:
    """What the trainer would refuse about the model before loading it (a folder that does not
    exist, code it would have to run, a max length above its positions); None if nothing."""
    try:
        check_model(RunConfig(model=ModelConfig(**json.loads(model_json)), data=DataConfig(max_length=max_length)))
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


def settings_form() -> None:
    top = st.columns([2, 2, 1])
    preset = top[0].selectbox(
        "Preset",
        list(PRESETS),
        format_func=lambda p: PRESET_LABELS.get(p, p),
        key="preset",
        help="Starting settings; every field below can be changed. Embedded demo: all-MiniLM-L6-v2 in "
        "4-bit on the built-in NLI sample, runs on a CPU without network. Embedded causal LM demo: "
        "SmolLM2-135M-Instruct the same way, its head started from the label words (a few minutes on a "
        "CPU). Phi-2 on SNLI: "
        "the reference experiment, needs a GPU and the Hugging Face Hub.",
    )
    base = get_preset(preset)

    def k(name: str) -> str:
        return f"{name}@{preset}"  # each preset keeps its own field values

    changes: dict = {}
    errors: list[str] = []
    files: dict = {}
    known_rows: dict = {}

    folders = "a local folder in HF format" if access.local_paths_allowed() else "(no local folders on this server)"
    changes["model.name"] = (
        top[1]
        .text_input(
            "Model",
            base.model.name,
            key=k("model"),
            help=f"A Hugging Face Hub id (e.g. microsoft/phi-2), {folders}, {EMBEDDED_MODEL} (an encoder) or "
            f"{EMBEDDED_LLM} (a causal LM): these two ship with the app and work offline.",
        )
        .strip()
    )
    top[2].markdown("&nbsp;")  # aligns the checkbox with the inputs
    quantize = top[2].checkbox(
        "4-bit NF4 (QLoRA)",
        base.model.quantize is not None,
        key=k("quantize"),
        help="Load the base model's linear layers in 4-bit NF4; off = unquantised",
    )
    changes["model.quantize"] = "bnb.nf4" if quantize else None

    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("##### Data")
        default_data = "builtin" if base.data.source == BUILTIN_DATA else "hub"
        data_kind = st.radio(
            "Dataset",
            list(DATA_CHOICES),
            format_func=DATA_CHOICES.get,
            horizontal=True,
            index=list(DATA_CHOICES).index(default_data),
            key=k("data_kind"),
        )
        if data_kind == "builtin":
            changes["data.source"] = BUILTIN_DATA
            if not (BUILTIN_DIR / "train.jsonl").exists():
                errors.append(f"the built-in sample is missing from {BUILTIN_DIR}")
            st.caption(
                "Premise/hypothesis pairs labelled entailment, neutral or contradiction, each tagged "
                "with the phenomenon it tests (negation, quantifiers, …); ships with the app."
            )
        r = st.columns(2)
        for i, split in enumerate(("train", "validation", "test")):
            v = r[i % 2].number_input(
                f"Max {split} rows",
                0,
                10_000_000,
                getattr(base.data, f"max_{split}_rows") or 0,
                step=16,
                key=k(f"max_{split}"),
                help="A stratified, seeded sample; 0 = all rows",
            )
            changes[f"data.max_{split}_rows"] = int(v) or None
        changes["data.max_length"] = int(
            r[1].number_input("Max length (tokens)", 8, 8192, base.data.max_length, step=16, key=k("max_length"))
        )
    with right:
        st.markdown("##### LoRA")
        lcols = st.columns(2)
        lora_r = int(lcols[0].number_input("Rank r", 1, 1024, base.lora.r, key=k("lora_r")))
        alpha = float(
            lcols[1].number_input("Alpha", 0.5, 4096.0, float(base.lora.alpha), step=1.0, key=k("lora_alpha"))
        )
        dropout = float(
            lcols[0].number_input("Dropout", 0.0, 0.95, float(base.lora.dropout), step=0.05, key=k("lora_dropout"))
        )
        tm_default = base.lora.target_modules
        tm_text = (
            lcols[1]
            .text_input(
                "Target modules",
                ", ".join(tm_default) if isinstance(tm_default, list) else (tm_default or ""),
                key=k("target_modules"),
                help="Comma-separated module names (e.g. q_proj, v_proj, fc1, fc2), all-linear, or empty for "
                "the usual ones of the architecture.",
            )
            .strip()
        )
        target = (
            None
            if not tm_text
            else "all-linear"
            if tm_text == "all-linear"
            else [t.strip() for t in tm_text.split(",") if t.strip()]
        )
        changes.update({"lora.r": lora_r, "lora.alpha": alpha, "lora.dropout": dropout, "lora.target_modules": target})

        st.markdown("##### Training")
        t = st.columns(2)
        changes["train.epochs"] = int(t[0].number_input("Epochs", 1, 1000, base.train.epochs, key=k("epochs")))
        changes["train.lr"] = float(
            t[1].number_input("Learning rate", 1e-6, 0.5, base.train.lr, step=1e-4, format="%.1e", key=k("lr"))
        )
        changes["train.batch_size"] = int(
            t[0].number_input("Batch size", 1, 4096, base.train.batch_size, key=k("batch"))
        )
        changes["train.seed"] = int(t[1].number_input("Seed", 0, 2**31 - 1, base.train.seed, key=k("seed")))
        seeds = int(
            t[0].number_input(
                "Seeds",
                1,
                20,
                1,
                key=k("seeds"),
                help="Train the same settings with this many seeds (seed, seed+1, ...), one after another, as one "
                "group: the report shows the mean and spread over seeds. One run is not a result.",
            )
        )
        gpus = len(ui.hardware().get("gpus") or [])
        if gpus > 1:  # data-parallel: the trainer starts torchrun itself (core/dist.py)
            changes["train.processes"] = int(
                t[1].number_input(
                    "GPUs",
                    1,
                    gpus,
                    min(base.train.processes, gpus),
                    key=k("gpus"),
                    help="Data-parallel training: one process per GPU, each taking an equal share of every batch "
                    "(the same batch size and learning rate as one GPU, so results compare).",
                )
            )
        with st.popover("More settings"):
            head_lr = st.number_input(
                "Head learning rate (0 = same as LoRA)",
                0.0,
                0.5,
                base.train.head_lr or 0.0,
                step=1e-4,
                format="%.1e",
                key=k("head_lr"),
            )
            changes["train.head_lr"] = float(head_lr) or None
            micro = st.number_input(
                "Micro-batch size (0 = batch size)", 0, 4096, base.train.micro_batch_size or 0, key=k("micro")
            )
            changes["train.micro_batch_size"] = int(micro) or None
            changes["model.compute_dtype"] = st.selectbox(
                "Compute dtype", ["auto", "float32", "bfloat16", "float16"], key=k("dtype")
            )
            changes["model.device"] = st.selectbox("Device", ["auto", "cpu", "cuda"], key=k("device"))
            variants = ["lora", "rslora", "dora"]
            changes["lora.variant"] = st.selectbox(
                "LoRA variant",
                variants,
                index=variants.index(base.lora.variant),
                key=k("lora_variant"),
                help="LoRA; rsLoRA scales the update by alpha / sqrt(r) instead of alpha / r (larger ranks keep "
                "learning); DoRA splits each weight into a magnitude and a direction and adapts the direction "
                "(runs peft's own layer: slower than the fused 4-bit + LoRA one).",
            )
            weights = base.train.class_weights
            changes["train.class_weights"] = (
                st.text_input(
                    "Class weights",
                    weights if isinstance(weights, str) else ",".join(f"{w:g}" for w in weights),
                    key=k("class_weights"),
                    help="Weights of the classes in the training loss: none; balanced (each class weighs as much "
                    "as the others, from the training rows); or one weight per class in label order, e.g. 1,2,2.",
                ).strip()
                or "none"
            )
            patience = st.number_input(
                "Early stopping patience (0 = off)",
                0,
                1000,
                base.train.early_stopping_patience or 0,
                key=k("patience"),
                help="Stop when no epoch has beaten the best one (validation accuracy, a lower loss breaking ties) "
                "for this many epochs.",
            )
            changes["train.early_stopping_patience"] = int(patience) or None
            changes["train.gradient_checkpointing"] = st.checkbox(
                "Gradient checkpointing",
                base.train.gradient_checkpointing,
                key=k("gradient_checkpointing"),
                help="Keep only each layer's input and compute the layer again in the backward pass: much less "
                "activation memory (for a model that does not fit otherwise), at the cost of a slower step.",
            )
            changes["train.report_to"] = st.multiselect(
                "Also log to",
                list(TRACKERS),
                default=list(base.train.report_to),
                key=k("report_to"),
                help="Experiment trackers that get the loss, learning rate, validation and test accuracy as the "
                "run goes: TensorBoard (files in the run folder), MLflow (MLFLOW_TRACKING_URI), Weights & Biases "
                "(its WANDB_* variables). metrics.jsonl stays the record.",
            )

    if data_kind == "hub":
        h = st.columns([2, 1, 1, 1, 1])
        source = (
            h[0]
            .text_input(
                "Hub dataset id", base.data.source if default_data == "hub" else "stanfordnlp/snli", key=k("hub_id")
            )
            .strip()
        )
        changes["data.source"] = source
        changes["data.hub_config"] = (
            h[1].text_input("Configuration", base.data.hub_config or "", key=k("hub_config")).strip() or None
        )
        changes["data.train_split"] = h[2].text_input("Train split", base.data.train_split, key=k("hub_train")).strip()
        changes["data.validation_split"] = (
            h[3]
            .text_input(
                "Validation split",
                base.data.validation_split or "",
                key=k("hub_val"),
                help="Leave empty to hold out 10% of train",
            )
            .strip()
            or None
        )
        changes["data.test_split"] = h[4].text_input("Test split", base.data.test_split, key=k("hub_test")).strip()
        st.caption("Loaded with `datasets.load_dataset` when the run starts (needs the network or the HF cache).")
    elif data_kind == "upload":
        up_changes, files, known_rows, up_errors = upload_section(k)
        changes.update(up_changes)
        changes["data.source"] = "files"
        errors += up_errors

    # --- validate, then show what will happen ----------------------------------------------------
    try:
        cfg = override(base, changes)
        access.check_sources(cfg)  # before anything reads the model or the data a name points to
    except ValueError as e:
        st.error(f"Check the settings: {e}")
        st.button("Launch", type="primary", disabled=True, key="launch_disabled")
        return
    notes: list[str] = []
    if data_kind == "upload":  # every uploaded split, mapped as the trainer will map it
        for split, upload in files.items():
            err, split_notes = check_mapping(cfg, uploads.parse_upload(*upload), split)
            if err:
                errors.append(f"column/label mapping of the {split} file: {err}")
            notes += split_notes
    problem = model_problem(json.dumps(cfg.to_dict()["model"], sort_keys=True), cfg.data.max_length)
    if problem:
        errors.append(f"model: {problem}")
    try:
        check_installed(cfg.train.report_to)  # the pip line, before a launch that would fail
    except ValueError as e:
        errors.append(str(e))

    data_preview(cfg, files, data_kind, k("class_weights"))  # app_pages/preview.py: the rows the trainer will read
    st.markdown("##### What will happen")
    d = cfg.to_dict()
    facts = model_facts(
        json.dumps(d["model"], sort_keys=True), len(cfg.data.labels), json.dumps(d["lora"], sort_keys=True)
    )
    p = estimate.plan(cfg, rows=known_rows or None, facts=facts)
    draw_plan(cfg, p)
    for e in errors:
        st.warning(e)
    for n in notes:
        st.info(n)
    if st.button("Launch", type="primary", disabled=bool(errors) or bool(p.get("error")), key="launch"):
        try:
            password = ui.typed_password()
            run_dir = (
                jobs.launch_with_uploads(cfg, files, seeds=seeds, password=password)
                if files
                else jobs.launch(cfg, seeds=seeds, password=password)
            )
        except (ValueError, OSError) as e:
            st.error(f"Could not start the run: {e}")
            return
        ui.select_run(run_dir.name)
        st.rerun()


def draw_plan(cfg, p: dict) -> None:
    if p.get("error"):
        st.error(p["error"])
        return
    device = f"the GPU {p['gpu']} ({p['gpu_memory_gb']} GiB)" if p["device"] == "cuda" else "the CPU"
    weights = (
        "4-bit NF4" + (" with double quantisation" if cfg.model.double_quant else "")
        if cfg.model.quantize
        else "unquantised"
    )
    targets = cfg.lora.target_modules
    targets = (
        "the architecture's usual modules"
        if targets is None
        else ui.plain(targets if isinstance(targets, str) else ", ".join(targets))
    )
    rows = p["rows"]

    def fmt(n: int | None) -> str:
        return "?" if n is None else f"{n:,}"

    steps = p.get("total_steps")
    st.markdown(
        f"Runs on **{device}** in **{p['dtype']}**; base weights **{weights}**, LoRA r={cfg.lora.r} "
        f"(alpha {cfg.lora.alpha:g}) on {targets}.  \n"
        f"Rows: **{fmt(rows['train'])}** train, **{fmt(rows['validation'])}** validation, **{fmt(rows['test'])}** test "
        f"→ **{fmt(steps)}** optimiser steps ({p.get('steps_per_epoch', '?')} per epoch × {cfg.train.epochs} epochs)."
    )
    c = st.columns(6)
    if p["params"]:
        pr = p["params"]
        c[0].metric(
            "Total parameters",
            f"{pr['total'] / 1e6:,.1f} M",
            help=f"{pr['total']:,} (4-bit weights counted at full size)",
        )
        c[1].metric(
            "Packed 4-bit count",
            f"{pr['packed'] / 1e6:,.1f} M",
            help=f"{pr['packed']:,}: the naive numel() sum of a 4-bit model (two weights per byte)",
        )
        c[2].metric(
            "Trainable (LoRA + head)",
            f"{pr['trainable'] / 1e6:,.2f} M",
            help=f"{pr['trainable']:,} = {100 * pr['trainable'] / pr['total']:.2f}% of the total",
        )
    else:
        c[0].caption(f"No parameter counts: they need the model's config ({p['params_error']})")
    t = p.get("time")
    c[3].metric(
        "Estimated time",
        f"~{format_duration(t['seconds'], short=True)}" if t else "unknown",
        help=(
            f"Scaled from the measured speed of run {t['from_run']} ({t['train_rows_per_s']} training "
            "rows/s), assuming similar text lengths."
            if t
            else "Estimates are scaled from an earlier finished run of this model on this device; there is none yet."
        ),
    )
    gm = p.get("gpu_memory")
    if gm:
        value = f"≤ {gm['estimate_gb']} GiB" if gm["estimate_gb"] else "unknown"
        helptext = (
            "Weights + LoRA optimiser state + activations of one micro-batch at max length "
            "(an upper bound: batches are padded only to their longest row)."
        )
        if cfg.train.gradient_checkpointing:
            helptext += " With gradient checkpointing a layer keeps only its input: the activations are far smaller."
        if gm.get("measured_gb"):
            helptext += f" Run {gm['measured_run']} peaked at {gm['measured_gb']} GiB."
        c[4].metric("Estimated GPU memory", value, help=helptext)
    else:
        c[4].metric("GPU memory", "none", help="This run uses the CPU.")
    if p["device"] == "cpu" and (p["params"] or {}).get("total", 0) > 500e6:
        st.warning(
            f"This model has {p['params']['total'] / 1e9:.1f} B parameters and the run would use the CPU: "
            "expect hours per epoch. Use a machine with a CUDA GPU, or the embedded demo model."
        )
