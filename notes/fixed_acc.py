# ruff: noqa  (exploration script)
import sys, pandas as pd
from experiments.results.halting_stats import fixed_accuracy
r = pd.read_parquet(sys.argv[1] + "/results.parquet")
for s in ("val", "hard"):
    print(s, fixed_accuracy(r, s).round(3).to_dict())
