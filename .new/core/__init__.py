"""QLoRA Studio's engine: 4-bit QLoRA fine-tuning of sequence classifiers, and their evaluation.

Never imports streamlit. Three parts:

- the engine, here: config (settings, presets), data (rows -> batches), model (NF4 + LoRA),
  train (the loop), evaluate (predictions, evaluation batches), report (numbers -> Markdown/HTML),
  estimate (the plan before a launch), uploads (files the app receives), __main__ (the CLI);
- runs/: the run folder contract, trainer jobs, the live view, resource sampling;
- speed/: the GPU speed code (fused layers and kernels, packing, CUDA graphs, MFU accounting).

Importing the package itself is cheap: heavy libraries load only in the modules that need them.
"""
