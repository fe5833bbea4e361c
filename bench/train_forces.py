"""The training-example forces at a real size: one JVP per example ('today') against the captured factors (one
capture of the probe rows, each example's step contracted with it), on the GPT-2 small (124M) Trainer run of
``bench/scale.py``, every time a ratio to a plain forward over the same probe rows measured in the same process.

U SFT examples (random token rows of the run's length), the run's AdamW preconditioner from its optimizer.pt, the
probe rows of scale.py (the first --rows). Prints seconds, forwards, the speed-up, the largest difference of the
forces between the two paths relative to their largest value, and the peak RSS of each path (separate processes).

    python bench/train_forces.py                    # U = 16, 48 rows: ~5 min on 2 cores (+ the run, built once)
    python bench/train_forces.py --examples 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import REPO, build_run, write_probes  # noqa: E402

_INNER = """
import json, resource, sys, time, torch
from ckptforce.io import open_run
from ckptforce.model import bind
from ckptforce.probes import load_probe_set, make_batch, tokenize
from ckptforce.forces.attribution import example_forces, preconditioner
from ckptforce.training_forces import interval_lr
what, run_dir, probes, device, rows, n_ex = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
run = open_run(run_dir)
with run.open(run.checkpoints[0]) as a, run.open(run.checkpoints[1]) as b:
    model = bind(a).to(device)
    theta = model.params_from(a, device=device)
    pre = preconditioner(theta, start=a.optimizer(), end=b.optimizer(), lr=interval_lr(run, 0))
batch = make_batch(tokenize(load_probe_set(probes))).to(device)
batch = batch.select(list(range(min(rows, len(batch)))))
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 50257, (n_ex, 32), generator=g)
class Rows:  # the training rows: prompt = the first token, completion = the rest (the Trainer's causal-LM loss)
    def __init__(self, ids):
        self.input_ids, self.attention_mask = ids, torch.ones_like(ids)
        self.targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        self.target_mask = torch.ones_like(ids, dtype=torch.bool); self.target_mask[:, -1] = False
    def select(self, i):
        return Rows(self.input_ids[i])
    def __len__(self):
        return len(self.input_ids)
train = Rows(ids.to(device))
weights = torch.full((n_ex,), 1.0 / 31)
coeff = torch.full((n_ex,), interval_lr(run, 0) / 4)
def sync():
    if device.startswith("cuda"): torch.cuda.synchronize()
with torch.no_grad():
    model.logits(theta, batch); sync()
    t0 = time.perf_counter(); model.logits(theta, batch); sync(); fwd = time.perf_counter() - t0
t0 = time.perf_counter()
forces = example_forces(model.logits, theta, batch, train, list(range(n_ex)), weights, coeff, pre, module=model.module if what == "factors" else None, chunk_size=64)
sync(); secs = time.perf_counter() - t0
torch.save({"pos": forces.pos, "pos_tok": forces.pos_tok}, sys.argv[7])
peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": secs, "forward": fwd, "rows": len(batch), "method": forces.method, "peak_gib": peak}))
"""


def inner(what: str, run: Path, probes: Path, device: str, rows: int, examples: int, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _INNER, what, str(run), str(probes), device, str(rows), str(examples), str(out)],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=16, help="training examples U (default 16)")
    ap.add_argument("--rows", type=int, default=48, help="probe rows (default 48)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run, probes = args.workdir / "run", args.workdir / "probes.jsonl"
    build_run(run)
    write_probes(probes)
    print(f"[run] {run}: GPT-2 small (124M); {args.examples} SFT examples × {args.rows} probe rows; {os.cpu_count()} cores, {args.device}")
    res = {}
    for what in ("jvp", "factors"):
        res[what] = r = inner(what, run, probes, args.device, args.rows, args.examples, args.workdir / f"forces-{what}.pt")
        print(f"[{what}]  {r['seconds']:.1f} s = {r['seconds'] / r['forward']:.1f} forwards ({r['seconds'] / r['forward'] / args.examples:.2f} "
              f"per example; forward {r['forward']:.2f} s), peak {r['peak_gib']:.2f} GiB, method {r['method']}")  # fmt: skip
    import torch

    a, b = (torch.load(args.workdir / f"forces-{w}.pt") for w in ("jvp", "factors"))
    diff = max(float((a[k] - b[k]).abs().max()) / float(a[k].abs().max()) for k in a)
    speed = (res["jvp"]["seconds"] / res["jvp"]["forward"]) / (res["factors"]["seconds"] / res["factors"]["forward"])
    print(f"[factors vs one JVP per example]  {speed:.1f}× faster (in forwards), largest difference {diff:.1e} of the largest force")


if __name__ == "__main__":
    main()
