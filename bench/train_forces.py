"""The training-example forces at 124M: one JVP per example ('today'), the per-example contraction of captured
factors, the batched linear layers (the default), and ``--forces approximate``, on the GPT-2 small (124M) Trainer run
of ``bench/scale.py``; every time a ratio to a plain forward over the same probe rows measured in the same process.

U SFT examples (random token rows of 32 tokens, the Trainer's causal-LM loss), the run's AdamW preconditioner from
its optimizer.pt, the first --rows probe rows of scale.py, the head streamed as ``analyze`` streams it. The batched
and approximate paths take all --examples; the two per-example paths, whose cost is the same for every example,
take the first --baseline-examples (their per-example cost is what the ratios compare). ``floor`` times the training
rows' own forward and backward (their ghost factors) and nothing else: what every method that needs each example's
gradient pays, so the exact forces over it bound any such approximation's speed-up. Prints seconds, forwards
per example, the speed-ups, the largest difference of the forces on the shared examples relative to the largest
force, the approximation's error ‖approx − exact‖ / ‖exact‖ against the batched forces, and each path's peak
memory (separate processes: peak RSS, or peak CUDA memory).

    python bench/train_forces.py                        # U = 256, 48 rows: ~25 min on 2 cores (+ the run, built once)
    python bench/train_forces.py --examples 64 --baseline-examples 8
    python bench/train_forces.py --device cuda
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
from ckptforce.budget import batched_elements, default_memory_gb, head_chunks, rows_budget
from ckptforce.forces.approx import approximate_forces
from ckptforce.forces.attribution import example_forces
from ckptforce.forces.precondition import preconditioner
from ckptforce.forces.head import SplitLM
from ckptforce.training_forces import interval_lr
what, run_dir, probes, device, rows, n_ex = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
run = open_run(run_dir)
with run.open(run.checkpoints[0]) as a, run.open(run.checkpoints[1]) as b:
    model = bind(a).to(device)
    theta = model.params_from(a, device=device)
    pre = preconditioner(theta, start=a.optimizer(), end=b.optimizer(), lr=interval_lr(run, 0))
batch = make_batch(tokenize(load_probe_set(probes))).to(device)
batch = batch.select(list(range(min(rows, len(batch)))))
budget = rows_budget(default_memory_gb(device), parameters=sum(p.numel() for p in model.module.parameters()))
fn = SplitLM(model.logits, model.body, *model.head(), *head_chunks(budget, vocab=model.vocab_size))
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
if what == "floor":  # the training rows' own forward and backward (their ghost factors), and nothing else
    from ckptforce.forces.ghost import row_grads
    from ckptforce.forces.kernels import nll_rows
    names = [n for n, t in theta.items() if t.is_floating_point()]
    for i in range(0, n_ex, 32):  # approximate_forces' training chunks: half of chunk_size 64
        row_grads(model.logits, theta, train.select(list(range(i, min(i + 32, n_ex)))), nll_rows, module=model.module, names=names)
    pos, method = torch.zeros(n_ex, len(batch)), "the training rows' forward and backward"
elif what == "approx":
    names = [n for n, t in theta.items() if t.is_floating_point()]
    pos = approximate_forces(model.logits, theta, batch, train, list(range(n_ex)), weights, coeff, pre.scale, module=model.module, names=names)[0]
    method = "approximate"
else:
    kw = {"jvp": {}, "factors": dict(module=model.module, batched=False)}.get(what, dict(module=model.module, train_chunk=64,
          elements=batched_elements(budget, theta)))
    forces = example_forces(fn, theta, batch, train, list(range(n_ex)), weights, coeff, pre, chunk_size=64, **kw)
    pos, method = forces.pos, forces.method
sync(); secs = time.perf_counter() - t0
torch.save({"pos": pos}, sys.argv[7])
peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": secs, "forward": fwd, "rows": len(batch), "method": method, "peak_gib": peak}))
"""


PATHS = ("jvp", "factors", "batched", "approx", "floor")


def inner(what: str, run: Path, probes: Path, device: str, rows: int, examples: int, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _INNER, what, str(run), str(probes), device, str(rows), str(examples), str(out)],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=256, help="training examples U of the batched and approximate paths (default 256)")
    ap.add_argument("--baseline-examples", type=int, default=16, help="examples of the two per-example paths (default 16)")
    ap.add_argument("--rows", type=int, default=48, help="probe rows (default 48)")
    ap.add_argument("--skip", nargs="*", default=[], choices=PATHS, help="paths not to run")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run, probes = args.workdir / "run", args.workdir / "probes.jsonl"
    build_run(run)
    write_probes(probes)
    print(f"[run] {run}: GPT-2 small (124M); {args.examples} SFT examples × {args.rows} probe rows; {os.cpu_count()} cores, {args.device}")
    res = {}
    for what in PATHS:
        if what in args.skip:
            continue
        n = args.baseline_examples if what in ("jvp", "factors") else args.examples
        res[what] = r = inner(what, run, probes, args.device, args.rows, n, args.workdir / f"forces-{what}.pt")
        r["per_example"] = r["seconds"] / r["forward"] / n
        print(f"[{what}]  {n} examples: {r['seconds']:.1f} s = {r['seconds'] / r['forward']:.1f} forwards, {r['per_example']:.3f} per example "
              f"(forward {r['forward']:.2f} s), peak {r['peak_gib']:.2f} GiB, method {r['method']}")  # fmt: skip
    import torch

    pos = {w: torch.load(args.workdir / f"forces-{w}.pt")["pos"] for w in res if w != "floor"}
    shared = min(args.baseline_examples, args.examples)
    ref = pos.get("jvp")
    for w in ("factors", "batched"):
        if w in res and ref is not None:
            diff = float((pos[w][:shared] - ref[:shared]).abs().max()) / float(ref[:shared].abs().max())
            print(f"[{w} vs one JVP per example]  {res['jvp']['per_example'] / res[w]['per_example']:.1f}× faster per example, "
                  f"largest difference {diff:.1e} of the largest force ({shared} examples)")  # fmt: skip
    if "approx" in res and "batched" in res:
        err = float(torch.linalg.vector_norm(pos["approx"] - pos["batched"]) / torch.linalg.vector_norm(pos["batched"]))
        print(f"[approx vs batched exact]  {res['batched']['per_example'] / res['approx']['per_example']:.1f}× faster per example"
              + (f" ({res['jvp']['per_example'] / res['approx']['per_example']:.0f}× one JVP per example)" if "jvp" in res else "")
              + f", error ‖approx − exact‖/‖exact‖ = {err:.3f} over {args.examples} examples")  # fmt: skip
    if "floor" in res and "batched" in res:
        print(f"[floor]  the training rows' own forward and backward take {res['floor']['per_example'] / res['batched']['per_example']:.1%} of "
              f"the batched exact forces: no method that needs each example's gradient is more than "
              f"{res['batched']['per_example'] / res['floor']['per_example']:.1f}× faster than them at these sizes")  # fmt: skip


if __name__ == "__main__":
    main()
