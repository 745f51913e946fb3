"""Where the main job's time goes (issue 23's first step): torch.profiler over `fastflat train --method sam`
(the defaults: fastcnn, Fashion-MNIST, batch 128) for the first STEPS steps and one evaluation of the test set.

    python3 scripts/profile_main_job.py [STEPS] [OUT_DIR]      # default 150 steps, benchmarks/results/

Writes profile-main-job-<time>.txt: the top 20 operators by self CPU time, with the wall time of the run and its
provenance. The profiler's own overhead inflates small operators; read the ranking, not the absolute times.
"""

import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fastflat
from fastflat.runs.rundir import provenance

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 150
out = Path(sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results")
with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    summary = fastflat.train({"method": "sam", "epochs": 1, "max_steps": steps, "out": tmp, "name": "profiled"},
                             progress=False)
    wall = time.perf_counter() - start
table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=48)
stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
path = out / f"profile-main-job-{stamp}.txt"
header = (f"fastflat train --method sam, first {steps} steps of epoch 1 and one test evaluation, under torch.profiler\n"
          f"wall time {wall:.1f} s (profiled), training seconds in the summary {summary.get('train_seconds', 0):.1f}\n"
          f"torch threads {torch.get_num_threads()}; provenance {provenance(torch.device('cpu'))}\n\n")
path.write_text(header + table + "\n")
print(header + table)
print(f"wrote {path}")
