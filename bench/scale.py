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
    python bench/scale.py --long 0 --no-split --skip-analyze --sides 32   # the approximation's probe factors: y and y* together
    python bench/scale.py --long 0 --no-split --train 256 --intervals 1   # also analyze --train with 256 SFT examples
    python bench/scale.py --long 0 --no-split --train 256 --train-only --forces approximate   # the approximation alone
    python bench/scale.py --device cuda    # on a GPU
    python bench/scale.py --model llama-tiny --long 64 --long-rows 8 --long-split --intervals 1 --no-split   # the Llama path in
        # miniature (GQA, RMSNorm, RoPE, untied head; ~2 min on a CPU): check it before a GPU run
    python bench/scale.py --device cuda --model llama-1b --dtype bfloat16 --long 512 --long-rows 1000 --long-split \
        --intervals 1 --no-split  # Llama 3.2 1B's shapes in bfloat16, 1,000 probes × 512 tokens (the run: ~22 GB on disk)

``--model`` / ``--dtype`` other than GPT-2 small in float32 work in their own folder under --workdir. On a GPU each
result line adds the peak GPU memory in use during the analysis (nvidia-smi, every process, the allocator's reserve
included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import measure  # noqa: E402  (wall seconds, peak RSS of a process tree)

REPO = Path(__file__).resolve().parents[1]
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}
#: --model: (transformers config class, its arguments). llama-1b has Llama 3.2 1B's shapes (GQA 32/8 heads, RMSNorm,
#: RoPE θ 500k, a 128k vocabulary, tied head: 1.24B parameters); llama-143m Llama 3's 128k vocabulary with an untied
#: head on a small body (4 layers of 512, GQA 8/2: 143M parameters, 131M of them in the embedding and head), the
#: size a CPU can analyze with long responses; llama-tiny the architecture in miniature, to check the path.
MODELS = {
    "gpt2-small": ("GPT2Config", {**GPT2_SMALL, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}),
    "llama-1b": ("LlamaConfig", {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 2048, "rope_theta": 500000.0,
                                 "tie_word_embeddings": True}),
    "llama-143m": ("LlamaConfig", {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
                                   "num_key_value_heads": 2, "vocab_size": 128256, "max_position_embeddings": 2048, "rope_theta": 500000.0,
                                   "tie_word_embeddings": False}),
    "llama-tiny": ("LlamaConfig", {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "vocab_size": 2000, "max_position_embeddings": 1024, "tie_word_embeddings": False}),
}  # fmt: skip


def build_run(root: Path, model: str = "gpt2-small", dtype: str = "float32", device: str = "cpu") -> None:
    """``model`` (MODELS), random init, in ``dtype``: 3 AdamW steps of a Hugging Face Trainer on random tokens, a
    checkpoint with optimizer.pt after each (cached: rebuilt only when the model or dtype changes)."""
    cls, config = MODELS[model]
    manifest = root / "bench_manifest.json"
    want = config if (model, dtype) == ("gpt2-small", "float32") else {"model": model, "dtype": dtype, **config}  # the old runs' manifest
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    code = f"""
import os, torch
os.environ["HF_HUB_OFFLINE"] = "1"
import transformers
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed
set_seed(0)
model = AutoModelForCausalLM.from_config(getattr(transformers, {cls!r})(**{config!r})).to(getattr(torch, {dtype!r}))
g = torch.Generator().manual_seed(0)
data = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(0, {config["vocab_size"]}, (16, 32), generator=g)]
args = TrainingArguments(output_dir="{root}", max_steps=3, save_steps=1, logging_steps=1, learning_rate=1e-4,
                         per_device_train_batch_size=4, use_cpu={device == "cpu"}, report_to="none", disable_tqdm=True,
                         save_total_limit=None)
Trainer(model=model, args=args, train_dataset=data).train()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    manifest.write_text(json.dumps(want))


def write_train(path: Path, examples: int, vocab: int = 50257) -> None:
    """SFT examples as token ids (prompt = the first token, completion = the other 31, no EOS added: the Trainer's
    causal-LM rows): the run's own 16 training rows first, then random rows of the same shape."""
    import torch

    ids = torch.randint(0, vocab, (16, 32), generator=torch.Generator().manual_seed(0))  # build_run's data
    more = torch.randint(0, vocab, (max(0, examples - 16), 32), generator=torch.Generator().manual_seed(1))
    rows = torch.cat([ids, more])[:examples].tolist()
    path.write_text("".join(json.dumps({"id": f"u{i}", "prompt_ids": r[:1], "completion": r[1:]}) + "\n" for i, r in enumerate(rows)))


def write_probes(path: Path, *, probes: int = 48, long: int = 0, vocab: int = 50257) -> None:
    import random

    rng = random.Random(0)
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
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
what, run_dir, probes, device, rows, dtype = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), getattr(torch, sys.argv[6])
run = open_run(run_dir)
with run.open(run.checkpoints[0]) as a, run.open(run.checkpoints[1]) as b:
    model = bind(a).to(device, dtype)
    theta = model.params_from(a, device=device, dtype=dtype)
    step = {n: t - theta[n] for n, t in model.params_from(b, device=device, dtype=dtype).items()}
batch = make_batch(tokenize(load_probe_set(probes))).to(device)
batch = batch.select(list(range(min(rows, len(batch)))))
# the plain forward in chunks of rows whose logits take at most 2 GiB (1,000 rows × 512 tokens × a 128k vocabulary
# would take 131 GB at once): what a user's own forward over these rows costs
step_rows = max(1, min(len(batch), 2**31 // (batch.targets.shape[1] * model.vocab_size * dtype.itemsize)))
def forward():
    for start in range(0, len(batch), step_rows):
        model.logits(theta, batch.select(slice(start, start + step_rows)))
def timed(f, n):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter(); f()
        if device.startswith("cuda"): torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
with torch.no_grad():
    fwd = timed(forward, 2)
if what == "forward":
    out = fwd
elif what == "factored":  # the head streamed as analyze streams it (chunks of the default budget)
    budget = rows_budget(default_memory_gb(device), parameters=sum(p.numel() for p in model.module.parameters()), dtype_bytes=dtype.itemsize)
    positions, vocab = head_chunks(budget, vocab=model.vocab_size, dtype_bytes=dtype.itemsize)
    fn = SplitLM(model.logits, model.body, *model.head(), positions=positions, vocab=vocab)
    out = timed(lambda: contributions_by_tensor(fn, theta, batch, step, module=model.module, factored_chunk=64), 1)
elif what == "sides":  # --forces approximate's probe factors of log π(y) and log π(y*), on `rows` rows
    from ckptforce.forces.approx import _max_logp_rows
    from ckptforce.forces.ghost import row_grads, row_grads_each, sq_norms
    from ckptforce.forces.kernels import logp_rows
    scores, kw = [logp_rows, _max_logp_rows], {"module": model.module, "names": [n for n, t in theta.items() if t.is_floating_point()]}
    norms = lambda sides: [float(sum(sq_norms(g).values()).sum()) for g in sides]  # noqa: E731
    apart = timed(lambda: [row_grads(model.logits, theta, batch, sc, **kw) for sc in scores], 2)
    joint = timed(lambda: row_grads_each(model.logits, theta, batch, scores, **kw), 2)
    a, j = norms([row_grads(model.logits, theta, batch, sc, **kw) for sc in scores]), norms(row_grads_each(model.logits, theta, batch, scores, **kw))
    out = {"apart": apart, "joint": joint, "rel": max(abs(x - y) / abs(x) for x, y in zip(a, j))}
else:
    out = timed(lambda: contributions_by_tensor(model.logits, theta, batch, step, chunk_size=8), 1)
print(json.dumps({"seconds": out, "forward": fwd, "rows": len(batch)}))
"""


def inner(what: str, run: Path, probes: Path, args, rows: int = 10**9) -> dict:
    cmd = [sys.executable, "-c", _INNER, what, str(run), str(probes), args.device, str(rows), args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "scale")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2-small", help="the run's architecture (random init)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the run's weights and analyze --dtype (half precision: for a GPU)")
    ap.add_argument("--probes", type=int, default=48, metavar="N", help="probes of the main case (6 responses each)")
    ap.add_argument("--long-split", action="store_true", help="analyze the long case with the split by tensor (default settings) "
                    "instead of --no-by-tensor")
    ap.add_argument("--per-row", action="store_true", help="also time the per-row split (16 rows; slow, ~10 GB)")
    ap.add_argument("--sides", type=int, default=0, metavar="ROWS", help="also time --forces approximate's probe factors of y "
                    "and y* on ROWS rows: a pass per score against one forward with a backward per score (0: skip)")
    ap.add_argument("--skip-analyze", action="store_true", help="time the split only")
    ap.add_argument("--long", type=int, default=480, metavar="TOKENS", help="response length of the long case (0: skip it)")
    ap.add_argument("--long-rows", type=int, default=48, metavar="ROWS", help="rows of the long case")
    ap.add_argument("--long-nodes", type=int, default=2, metavar="N", help="--nodes of the long case (0: observe and the JVP only; "
                    "the path's nodes are JVPs again, so the peak memory is the same)")
    ap.add_argument("--long-only", action="store_true", help="run the long case only")
    ap.add_argument("--intervals", type=int, choices=(1, 2), default=2, help="intervals analyzed in the 288-row cases")
    ap.add_argument("--no-split", action="store_true", help="do not time the split by tensor alone")
    ap.add_argument("--train", type=int, default=0, metavar="U", help="also analyze the first interval with --train: U SFT examples "
                    "(the run's 16 rows, then random ones), default settings otherwise (0: skip)")
    ap.add_argument("--forces", choices=("exact", "approximate"), default="exact", help="--forces of the --train analysis")
    ap.add_argument("--train-only", action="store_true", help="with --train: skip the analyses without training examples")
    args = ap.parse_args()
    if args.long_only and not args.long:
        ap.error("--long-only needs a long case: give --long TOKENS (not 0)")
    exe = shutil.which("ckptforce") or sys.exit("install ckptforce first: pip install -e .")
    if (args.model, args.dtype) != ("gpt2-small", "float32"):  # each run in its own folder
        args.workdir = args.workdir / f"{args.model}-{args.dtype}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.workdir / "run"
    build_run(run, args.model, args.dtype, args.device)
    vocab = MODELS[args.model][1]["vocab_size"]
    probes = args.workdir / "probes.jsonl"
    write_probes(probes, probes=args.probes, vocab=vocab)
    print(f"[run] {run}: {args.model} ({args.dtype}), 3 checkpoints with optimizer.pt; {args.probes} probes × 6 responses; "
          f"{os.cpu_count()} cores, {args.device}")  # fmt: skip

    first = args.workdir / "run_first_interval"  # checkpoints 1 and 2 only: one interval
    shutil.rmtree(first, ignore_errors=True)
    first.mkdir()
    for name in ("checkpoint-1", "checkpoint-2"):
        (first / name).symlink_to(run / name, target_is_directory=True)
    if args.long:
        long_probes = args.workdir / f"probes_long{args.long}.jsonl"
        write_probes(long_probes, probes=args.long_rows, long=args.long, vocab=vocab)
        lf = inner("forward", run, long_probes, args)
        print(f"[long forward]  {lf['forward']:.1f} s for {lf['rows']} rows × {args.long}-token responses (16-token prompts)")
        if not args.skip_analyze:
            flags = ([] if args.long_split else ["--no-by-tensor"]) + ["--nodes", str(args.long_nodes)]
            wall, peak = analyze(exe, first, long_probes, args, flags)
            print(f"[analyze long, {' '.join(flags)}]  {wall:.0f} s for 1 interval = {wall / lf['forward']:.1f} "
                  f"forwards (with start-up), peak RSS {peak / 1024:.2f} GiB{args.gpu_peak}")  # fmt: skip
    if args.long_only:
        return
    base = inner("forward", run, probes, args)
    fwd = base["forward"]
    print(f"[forward]  {fwd:.2f} s for {base['rows']} rows: the unit below")
    if not args.no_split:
        f = inner("factored", run, probes, args)
        print(f"[split, factored]  {f['seconds']:.1f} s = {f['seconds'] / f['forward']:.1f} forwards ({f['rows']} rows)")
    if args.sides:
        sd = inner("sides", run, probes, args, rows=args.sides)
        t = sd["seconds"]
        print(f"[approximate: probe factors of y and y*, {sd['rows']} rows]  a pass each {t['apart']:.1f} s = {t['apart'] / sd['forward']:.1f} "
              f"forwards, one forward and two backwards {t['joint']:.1f} s = {t['joint'] / sd['forward']:.1f} forwards: "
              f"{t['apart'] / t['joint']:.2f}× faster; squared norms equal to {t['rel']:.1e}")  # fmt: skip
    if args.per_row:
        p16 = inner("per-row", run, probes, args, rows=16)
        f16 = inner("factored", run, probes, args, rows=16)
        print(f"[split, 16 rows]  per-row {p16['seconds'] / p16['forward']:.1f} forwards, factored {f16['seconds'] / f16['forward']:.1f} "
              f"forwards: {p16['seconds'] / f16['seconds']:.1f}× faster")  # fmt: skip
    if args.skip_analyze:
        return
    if args.train:
        train = args.workdir / f"train{args.train}.jsonl"
        write_train(train, args.train, vocab)
        wall, peak = analyze(exe, first, probes, args, ["--train", str(train), "--no-train-eos", "--forces", args.forces])
        print(f"[analyze --train, {args.train} SFT examples, --forces {args.forces}, 1 interval]  {wall:.0f} s = {wall / fwd:.1f} forwards "
              f"(with start-up), peak RSS {peak / 1024:.2f} GiB{args.gpu_peak}{_approx_error(args.workdir / 'cube.h5')}")  # fmt: skip
        if args.train_only:
            return
    for label, extra in (("default (split by tensor, 2 nodes)", []), ("--no-by-tensor", ["--no-by-tensor"])):
        wall, peak = analyze(exe, run if args.intervals == 2 else first, probes, args, extra)
        per = wall / args.intervals
        print(f"[analyze {label}]  {wall:.0f} s for {args.intervals} interval(s) = {per / fwd:.1f} forwards per interval (with start-up), "
              f"peak RSS {peak / 1024:.2f} GiB{args.gpu_peak}")  # fmt: skip


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
    dtype = ["--dtype", args.dtype] if args.dtype != "float32" else []
    with GpuPeak(args.device) as gpu:
        result = measure([exe, "analyze", str(run), "--probes", str(probes), "-o", str(out), "-q", "--device", args.device, *dtype, *extra])
    args.gpu_peak = gpu.text()
    return result


class GpuPeak:
    """The most GPU memory in use (every process, by nvidia-smi every 0.2 s) above what was in use before, while
    the block runs; nothing on a CPU. The allocator's reserve counts: what decides whether a run fits."""

    def __init__(self, device: str):
        self.on = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        index = int(device.partition(":")[2] or 0)
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        self.index = visible[index].strip() if index < len(visible) else str(index)  # nvidia-smi numbers every GPU
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _used(self) -> int:
        """MiB in use on the GPU; turns the sampler off (and reports nothing) when nvidia-smi gives no number."""
        out = subprocess.run(["nvidia-smi", "-i", self.index, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)  # fmt: skip
        try:
            return int(out.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):  # "[N/A]" (MIG), an NVML error
            self.on = False
            return 0

    def _sample(self) -> None:
        while self.on and not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> "GpuPeak":
        if self.on:
            self.base = self.peak = self._used()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()

    def text(self) -> str:
        return f", peak GPU memory {(self.peak - self.base) / 1024:.2f} GiB" if self.on else ""


if __name__ == "__main__":
    main()
