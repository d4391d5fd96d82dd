"""The run folder and the jobs that write it: the only contract between the trainer and the app.

- rundir.py: the files of a run folder, atomic writes, append-only JSON lines, tolerant readers
  (the one entry point: it also re-exports what liveness.py and state.py define);
- liveness.py: is the trainer alive (pid + start time, heartbeat), and the GPU lock;
- state.py: status.json (claimed exclusively, written under a lock), read_status, damaged runs;
- jobs.py: start a trainer process for a run (`python -m core train`), resume it, stop it;
- live.py: what the app shows of a run while it trains (progress, ETA, curves), from the folder;
- resources.py: CPU, RAM, disk and GPU sampling into resources.jsonl, and hardware descriptions.
"""

from . import rundir  # noqa: F401 - first: liveness.py and state.py build on it
