"""CPU accuracy check: the demo recipe on 1,000 shared SNLI rows, 2 epochs, one thread.

    python bench/accuracy_cpu.py CODE_DIR RUN_DIR [key=value ...]

CODE_DIR: a checkout of this repo (a worktree of an older commit, or .); key=value: config
overrides (e.g. lora.dropout=0.05). Switches such as QLORA_FUSED=0 come from the environment.
Prints the test accuracy, every evaluation and the last step losses as JSON."""
import json
import sys
import time

sys.path.insert(0, sys.argv[1])
from pathlib import Path  # noqa: E402

from core.config import override, preset_demo  # noqa: E402
from core.train import train  # noqa: E402

extra = dict(kv.split("=", 1) for kv in sys.argv[3:])
extra = {k: (float(v) if v.replace(".", "", 1).isdigit() else v) for k, v in extra.items()}
cfg = override(preset_demo(), {"data.source": "files", "data.train": "/work/shared/data/snli_sample/train.jsonl",
    "data.validation": "/work/shared/data/snli_sample/validation.jsonl", "data.test": "/work/shared/data/snli_sample/test.jsonl",
    "data.max_train_rows": 1000, "train.epochs": 2, "train.threads": 1, **extra})
t = time.time()
train(cfg, Path(sys.argv[2]))
recs = [json.loads(line) for line in open(Path(sys.argv[2]) / "metrics.jsonl")]
end = [x for x in recs if x["kind"] == "end"][0]
ev = [x for x in recs if x["kind"] == "eval"]
steps = [x for x in recs if x["kind"] == "step"]
print(json.dumps({"code": sys.argv[1], "overrides": extra, "test_accuracy": end.get("test_accuracy"),
                  "evals": [(x["split"], x["stage"], x["accuracy"]) for x in ev],
                  "last_losses": [round(x["loss"], 5) for x in steps[-2:]], "wall": round(time.time() - t, 1)}))
