"""CPU accuracy check: python bench/accuracy_cpu.py CODE_DIR RUN_DIR (CODE_DIR: a checkout of this repo, e.g. a worktree of an older commit)."""
import sys, json, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from core.config import preset_demo, override
from core.train import train
cfg = override(preset_demo(), {"data.source": "files", "data.train": "/work/shared/data/snli_sample/train.jsonl",
    "data.validation": "/work/shared/data/snli_sample/validation.jsonl", "data.test": "/work/shared/data/snli_sample/test.jsonl",
    "data.max_train_rows": 1000, "train.epochs": 2, "train.threads": 1})
t=time.time(); r = train(cfg, Path(sys.argv[2]))
recs=[json.loads(l) for l in open(Path(sys.argv[2])/"metrics.jsonl")]
end=[x for x in recs if x["kind"]=="end"][0]; ev=[x for x in recs if x["kind"]=="eval"]
print(json.dumps({"code": sys.argv[1], "test_accuracy": end.get("test_accuracy"), "evals": [(x["split"],x["stage"],x["accuracy"]) for x in ev], "wall": time.time()-t}))
