"""The run folder and the jobs that write it: the only contract between the trainer and the app.

- rundir.py: the files of a run folder, atomic writes, append-only JSON lines, the run's state;
- jobs.py: start a trainer process for a run (`python -m core train`) and stop it;
- live.py: what the app shows of a run while it trains (progress, ETA, curves), from the folder;
- resources.py: CPU, RAM, disk and GPU sampling into resources.jsonl, and hardware descriptions.
"""
