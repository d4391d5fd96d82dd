"""QLoRA Studio's engine: 4-bit QLoRA fine-tuning of sequence classifiers, and their evaluation.

Never imports streamlit. Modules: config (settings, presets), data (rows -> batches), model
(NF4 + LoRA), train (the loop), evaluate (predictions), report (numbers -> Markdown/HTML),
rundir (the run folder contract), jobs (start/stop a trainer process), resources (sampling).
Importing the package itself is cheap: heavy libraries load only in the modules that need them.
"""
