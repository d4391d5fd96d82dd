"""The run folder: the only contract between the trainer and the app. Import each name from the
file that defines it:

- rundir.py: where runs live, their ids and file names, atomic writes, append-only JSON lines,
  tolerant readers, metrics.jsonl's records and the throughput they add up to;
- liveness.py: is the trainer alive (pid + start time, heartbeat), and the GPU lock;
- state.py: status.json (claimed exclusively, written under a lock), read_status, the STOP
  request, damaged runs, the list of runs;
- watch.py: what the app shows of a run while it trains (progress, ETA, curves, viewers);
- resources.py: CPU, RAM, disk and GPU sampling into resources.jsonl, and hardware descriptions.

Starting and stopping a trainer for a run folder is core/jobs.py.
"""
