"""A real model size: `ckptforce analyze` on a Trainer run of GPT-2 small (124M), every figure a ratio to a plain
forward over the same probe rows measured in the same run.

Builds (once, cached in --workdir) a real Hugging Face Trainer run of GPT-2 small (12 layers, 768 dims, vocab
50,257; random init; AdamW for 3 steps, a checkpoint with optimizer.pt after each: 3 checkpoints, 2 intervals),
writes a probe file of token ids (48 probes × 6 responses of 10–18 tokens = 288 rows), then measures:

* forward: one plain forward of the 288 rows at a checkpoint (in a fresh process, best of 2): the unit;
* the split by tensor alone on those rows, from backprop factors and (``--per-row``: slow) from per-row gradients;
* ``ckptforce analyze`` as a user runs it (the installed CLI): default (split by tensor, 2 nodes) and
  ``--no-by-tensor``; wall time per interval in forwards, and peak RSS of the process;
* first, long responses (``--long-rows`` 48 rows × ``--long`` 480-token responses after a 16-token prompt):
  ``analyze --no-by-tensor --nodes N`` on the first interval only (a run folder of links to checkpoints 1 and 2),
  in forwards over those rows (one forward of them timed in the same run) and peak RSS;
* with ``--train U``: ``analyze --train`` on the first interval with U SFT examples (the run's own 16 rows, then
  random rows of the same shape), default settings otherwise: wall time in forwards and peak RSS.

    python bench/scale.py                  # ~30 min on 2 cores (the run is built once: ~3 min, 4.5 GB on disk)
    python bench/scale.py --long 0         # without the long-response case (~20 min)
    python bench/scale.py --intervals 1 --long-nodes 0 --no-split   # the shortest run that gives every peak RSS
    python bench/scale.py --per-row        # also time the per-row split on 16 rows (what 'today' means)
    python bench/scale.py --long 0 --no-split --train 256 --intervals 1   # also analyze --train with 256 SFT examples
    python bench/scale.py --long 0 --no-split --train 256 --train-only --forces approximate   # the approximation alone
    python bench/scale.py --device cuda    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import measure  # noqa: E402  (wall seconds, peak RSS of a process tree)

REPO = Path(__file__).resolve().parents[1]
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}


def build_run(root: Path) -> None:
    """GPT-2 small, random init, 3 AdamW steps on random tokens, a checkpoint after each (cached)."""
    manifest = root / "bench_manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == GPT2_SMALL:
        return
    shutil.rmtree(root, ignore_errors=True)
    code = f"""
import os, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed
set_seed(0)
model = GPT2LMHeadModel(GPT2Config(**{GPT2_SMALL!r}, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
g = torch.Generator().manual_seed(0)
data = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(0, 50257, (16, 32), generator=g)]
args = TrainingArguments(output_dir="{root}", max_steps=3, save_steps=1, logging_steps=1, learning_rate=1e-4,
                         per_device_train_batch_size=4, use_cpu=True, report_to="none", disable_tqdm=True, save_total_limit=None)
Trainer(model=model, args=args, train_dataset=data).train()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    manifest.write_text(json.dumps(GPT2_SMALL))


def write_train(path: Path, examples: int) -> None:
    """SFT examples as token ids (prompt = the first token, completion = the other 31, no EOS added: the Trainer's
    causal-LM rows): the run's own 16 training rows first, then random rows of the same shape."""
    import torch

    ids = torch.randint(0, 50257, (16, 32), generator=torch.Generator().manual_seed(0))  # build_run's data
    more = torch.randint(0, 50257, (max(0, examples - 16), 32), generator=torch.Generator().manual_seed(1))
    rows = torch.cat([ids, more])[:examples].tolist()
    path.write_text("".join(json.dumps({"id": f"u{i}", "prompt_ids": r[:1], "completion": r[1:]}) + "\n" for i, r in enumerate(rows)))


def write_probes(path: Path, *, probes: int = 48, long: int = 0) -> None:
    import random

    rng = random.Random(0)
    ids = lambda k: [rng.randrange(50257) for _ in range(k)]  # noqa: E731
    types = ("chosen", "rejected", "rephrase_chosen", "other_trained", "irrelevant", "random")
    if long:
        lines = [{"id": f"p{i}", "prompt_ids": ids(16), "responses": {"chosen": ids(long)}} for i in range(probes)]
    else:
        lines = [{"id": f"p{i}", "prompt_ids": ids(8), "responses": {t: ids(rng.randint(2, 10)) for t in types}} for i in range(probes)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


_INNER = """
import json, sys, time, torch
from pathlib import Path
from ckptforce.io import open_run
from ckptforce.model import bind
from ckptforce.probes import load_probe_set, make_batch, tokenize
from ckptforce.budget import default_memory_gb, head_chunks, rows_budget
from ckptforce.forces.head import SplitLM
from ckptforce.forces.linear import contributions_by_tensor
what, run_dir, probes, device, rows = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
run = open_run(run_dir)
with run.open(run.checkpoints[0]) as a, run.open(run.checkpoints[1]) as b:
    model = bind(a).to(device)
    theta = model.params_from(a, device=device)
    step = {n: t - theta[n] for n, t in model.params_from(b, device=device).items()}
batch = make_batch(tokenize(load_probe_set(probes))).to(device)
batch = batch.select(list(range(min(rows, len(batch)))))
def timed(f, n):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter(); f()
        if device.startswith("cuda"): torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
with torch.no_grad():
    fwd = timed(lambda: model.logits(theta, batch), 2)
if what == "forward":
    out = fwd
elif what == "factored":  # the head streamed as analyze streams it (chunks of the default budget)
    budget = rows_budget(default_memory_gb(device), parameters=sum(p.numel() for p in model.module.parameters()))
    positions, vocab = head_chunks(budget, vocab=model.vocab_size)
    fn = SplitLM(model.logits, model.body, *model.head(), positions=positions, vocab=vocab)
    out = timed(lambda: contributions_by_tensor(fn, theta, batch, step, module=model.module, factored_chunk=64), 1)
else:
    out = timed(lambda: contributions_by_tensor(model.logits, theta, batch, step, chunk_size=8), 1)
print(json.dumps({"seconds": out, "forward": fwd, "rows": len(batch)}))
"""


def inner(what: str, run: Path, probes: Path, device: str, rows: int = 10**9) -> dict:
    out = subprocess.run([sys.executable, "-c", _INNER, what, str(run), str(probes), device, str(rows)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-row", action="store_true", help="also time the per-row split (16 rows; slow, ~10 GB)")
    ap.add_argument("--skip-analyze", action="store_true", help="time the split only")
    ap.add_argument("--long", type=int, default=480, metavar="TOKENS", help="response length of the long case (0: skip it)")
    ap.add_argument("--long-rows", type=int, default=48, metavar="ROWS", help="rows of the long case")
    ap.add_argument("--long-nodes", type=int, default=2, metavar="N", help="--nodes of the long case (0: observe and the JVP only; "
                    "the path's nodes are JVPs again, so the peak memory is the same)")
    ap.add_argument("--intervals", type=int, choices=(1, 2), default=2, help="intervals analyzed in the 288-row cases")
    ap.add_argument("--no-split", action="store_true", help="do not time the split by tensor alone")
    ap.add_argument("--train", type=int, default=0, metavar="U", help="also analyze the first interval with --train: U SFT examples "
                    "(the run's 16 rows, then random ones), default settings otherwise (0: skip)")
    ap.add_argument("--forces", choices=("exact", "approximate"), default="exact", help="--forces of the --train analysis")
    ap.add_argument("--train-only", action="store_true", help="with --train: skip the analyses without training examples")
    args = ap.parse_args()
    exe = shutil.which("ckptforce") or sys.exit("install ckptforce first: pip install -e .")
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.workdir / "run"
    build_run(run)
    probes = args.workdir / "probes.jsonl"
    write_probes(probes)
    print(f"[run] {run}: GPT-2 small (124M), 3 checkpoints with optimizer.pt; 48 probes × 6 responses; {os.cpu_count()} cores, {args.device}")

    first = args.workdir / "run_first_interval"  # checkpoints 1 and 2 only: one interval
    shutil.rmtree(first, ignore_errors=True)
    first.mkdir()
    for name in ("checkpoint-1", "checkpoint-2"):
        (first / name).symlink_to(run / name, target_is_directory=True)
    if args.long:
        long_probes = args.workdir / f"probes_long{args.long}.jsonl"
        write_probes(long_probes, probes=args.long_rows, long=args.long)
        lf = inner("forward", run, long_probes, args.device)
        print(f"[long forward]  {lf['forward']:.1f} s for {lf['rows']} rows × {args.long}-token responses (16-token prompts)")
        if not args.skip_analyze:
            wall, peak = analyze(exe, first, long_probes, args, ["--no-by-tensor", "--nodes", str(args.long_nodes)])
            print(f"[analyze long, --no-by-tensor --nodes {args.long_nodes}]  {wall:.0f} s for 1 interval = {wall / lf['forward']:.1f} "
                  f"forwards (with start-up), peak RSS {peak / 1024:.2f} GiB")  # fmt: skip
    base = inner("forward", run, probes, args.device)
    fwd = base["forward"]
    print(f"[forward]  {fwd:.2f} s for {base['rows']} rows: the unit below")
    if not args.no_split:
        f = inner("factored", run, probes, args.device)
        print(f"[split, factored]  {f['seconds']:.1f} s = {f['seconds'] / f['forward']:.1f} forwards ({f['rows']} rows)")
    if args.per_row:
        p16 = inner("per-row", run, probes, args.device, rows=16)
        f16 = inner("factored", run, probes, args.device, rows=16)
        print(f"[split, 16 rows]  per-row {p16['seconds'] / p16['forward']:.1f} forwards, factored {f16['seconds'] / f16['forward']:.1f} "
              f"forwards: {p16['seconds'] / f16['seconds']:.1f}× faster")  # fmt: skip
    if args.skip_analyze:
        return
    if args.train:
        train = args.workdir / f"train{args.train}.jsonl"
        write_train(train, args.train)
        wall, peak = analyze(exe, first, probes, args, ["--train", str(train), "--no-train-eos", "--forces", args.forces])
        print(f"[analyze --train, {args.train} SFT examples, --forces {args.forces}, 1 interval]  {wall:.0f} s = {wall / fwd:.1f} forwards "
              f"(with start-up), peak RSS {peak / 1024:.2f} GiB{_approx_error(args.workdir / 'cube.h5')}")  # fmt: skip
        if args.train_only:
            return
    for label, extra in (("default (split by tensor, 2 nodes)", []), ("--no-by-tensor", ["--no-by-tensor"])):
        wall, peak = analyze(exe, run if args.intervals == 2 else first, probes, args, extra)
        per = wall / args.intervals
        print(f"[analyze {label}]  {wall:.0f} s for {args.intervals} interval(s) = {per / fwd:.1f} forwards per interval (with start-up), "
              f"peak RSS {peak / 1024:.2f} GiB")  # fmt: skip


def _approx_error(cube: Path) -> str:
    """', error of the approximation E' (force_approx_error, stored in the cube), or '' for exact forces."""
    import h5py
    import numpy as np

    with h5py.File(cube, "r") as f:
        err = np.asarray(f["force_approx_error"][()]) if "force_approx_error" in f else np.array([np.nan])
    return "" if np.isnan(err).all() else f"; ‖approx − exact‖ / ‖exact‖ over the first examples {float(np.nanmax(err)):.3f}"


def analyze(exe: str, run: Path, probes: Path, args, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``ckptforce analyze`` into a fresh cube."""
    out = args.workdir / "cube.h5"
    out.unlink(missing_ok=True)
    shutil.rmtree(str(out) + ".parts", ignore_errors=True)
    return measure([exe, "analyze", str(run), "--probes", str(probes), "-o", str(out), "-q", "--device", args.device, *extra])


if __name__ == "__main__":
    main()
