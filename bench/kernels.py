#!/usr/bin/env python
"""Benchmark: the probe × training-example kernel summed over checkpoints (TracIn-CP), ckptforce against Captum.

    ckptforce   tracin_kernel(model.logits, [(θ_t, η_t)], probes, train, module=..., probe_score=nll_rows)
                = Σ_t η_t ⟨∇θ L(probe), ∇θ L(train)⟩ by ghost inner products (+ per-row vmap for the rest)
    Captum      captum.influence.TracInCP(model, train_dataset, checkpoints=[paths], checkpoints_load_func,
                loss_fn=...).influence((probe inputs, labels)) — the same sum: Σ_t lr_t ⟨∇ test loss, ∇ train loss⟩

Both use the loss L = −log π(y|x) (cross-entropy, summed over response tokens for sequences) on both sides, so
the two matrices must be equal; ckptforce's default probe score is log π, which gives exactly −TracInCP (also
checked). Two parts:

* mlp   — an MLP classifier on a synthetic 10-class Gaussian mixture (sklearn is not a dependency): ``--train``
          training examples, ``--probes`` held-out probes, ``--checkpoints`` state_dicts saved by a real SGD loop
          (one per epoch, with that epoch's lr). Captum runs in its two modes: the per-example loop
          (``sample_wise_grads_per_batch=False``, reduction "none") and its batched per-sample-gradient hooks
          (``sample_wise_grads_per_batch=True``, reduction "sum"; Linear / Conv2d layers only).
* gpt2  — a tiny GPT-2 (eager attention) trained a few SGD steps on patterned token sequences. TracInCP takes it
          through a thin wrapper (``forward(input_ids, attention_mask) -> logits`` and a per-row summed
          cross-entropy ``loss_fn`` with reduction "none"); its hook mode does not cover Conv1D / Embedding /
          LayerNorm, so only the per-example loop is run.

Every measurement runs in a fresh subprocess (the driver never imports torch: a child's ru_maxrss starts at
its parent's peak). Times include loading the checkpoint files. ckptforce: one warm-up, best of ``--repeat``;
Captum: one warm-up on 32 training examples, then one timed run. Peak memory: the worker's ru_maxrss minus an
import-only worker's (torch, transformers, captum, ckptforce), so it includes the model and data.

Run from the repository root:  python bench/kernels.py  [--train 2000] [--probes 100] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import children_cpu_s, cpu_busy_s, maxrss_kib

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out" / "kernels"
MARKER = "BENCH_RESULT "
CHECK_REL = 1e-5
GOAL = 100.0
CONTENTION = 0.10  # warn when other processes took more than this share of the CPUs during a measurement
CLASSES, DIM = 10, 64  # the shape of sklearn's digits (8×8 images, 10 classes)
GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 128, "n_positions": 64}
PROMPT, RESPONSE = 8, 16  # GPT-2 part: tokens per prompt and per response


# --------------------------------------------------------------------------------------------------------------
# workers (fresh subprocesses; everything torch lives here)


def _imports():
    import captum.influence  # noqa: F401
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401

    import ckptforce.forces  # noqa: F401

    return torch


def _mlp(torch, hidden: int):
    return torch.nn.Sequential(torch.nn.Linear(DIM, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))  # fmt: skip


def _gpt2(torch):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**GPT2, attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _sequences(torch, n: int, gen):
    """input_ids (n, P+R) of arithmetic sequences x_{t+1} = x_t + step mod V, a random start and step 1..4."""
    start = torch.randint(0, GPT2["vocab_size"], (n, 1), generator=gen)
    step = torch.randint(1, 5, (n, 1), generator=gen)
    ids = (start + step * torch.arange(PROMPT + RESPONSE)) % GPT2["vocab_size"]
    return ids


def worker_setup(args) -> dict:
    """Data and checkpoints of both parts, by real (short) SGD training loops; torch.save of state_dicts."""
    torch = _imports()
    gen = torch.Generator().manual_seed(args.seed)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # MLP on a Gaussian mixture
    means = 1.5 * torch.randn(CLASSES, DIM, generator=gen)
    y = torch.randint(0, CLASSES, (args.train + args.probes,), generator=gen)
    x = means[y] + torch.randn(len(y), DIM, generator=gen)
    torch.manual_seed(args.seed)
    model, info = _mlp(torch, args.hidden), {}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    paths, lrs = [], []
    for epoch in range(args.checkpoints):
        lr = 0.1 / 2**epoch
        for g in opt.param_groups:
            g["lr"] = lr
        order = torch.randperm(args.train, generator=gen)
        for i in range(0, args.train, 64):
            idx = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        path = OUT_DIR / f"mlp_ckpt_{epoch}.pt"
        torch.save(model.state_dict(), path)
        paths.append(str(path))
        lrs.append(lr)
    with torch.no_grad():
        acc = float((model(x[args.train :]).argmax(-1) == y[args.train :]).float().mean())
    torch.save({"x_train": x[: args.train], "y_train": y[: args.train], "x_probe": x[args.train :], "y_probe": y[args.train :]},
               OUT_DIR / "mlp_data.pt")  # fmt: skip
    info["mlp"] = {"checkpoints": paths, "lrs": lrs, "probe_accuracy": acc, "params": sum(p.numel() for p in model.parameters())}
    # tiny GPT-2 on patterned sequences
    torch.manual_seed(args.seed)
    lm = _gpt2(torch)
    ids = _sequences(torch, args.gpt2_train + args.gpt2_probes, gen)
    opt = torch.optim.SGD(lm.parameters(), lr=0.5)
    paths, lrs, losses = [], [], []
    for c in range(args.checkpoints):
        for _ in range(8):
            idx = torch.randint(0, args.gpt2_train, (32,), generator=gen)
            logits = lm(ids[idx]).logits[:, PROMPT - 1 : -1]  # predicts the response tokens
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[idx, PROMPT:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        path = OUT_DIR / f"gpt2_ckpt_{c}.pt"
        torch.save(lm.state_dict(), path)
        paths.append(str(path))
        lrs.append(0.5)
    torch.save({"ids": ids}, OUT_DIR / "gpt2_data.pt")
    info["gpt2"] = {"checkpoints": paths, "lrs": lrs, "loss_first": losses[0], "loss_last": losses[-1],
                    "params": sum(p.numel() for p in lm.parameters())}  # fmt: skip
    (OUT_DIR / "manifest.json").write_text(json.dumps(info))
    return info


def _token_batch(torch, ids):
    from ckptforce.probes import TokenBatch

    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, PROMPT - 1 : -1] = True  # the logits at t predict token t+1: the response
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1)) * mask
    return TokenBatch(ids, torch.ones_like(ids), targets, mask, [(i, "chosen") for i in range(len(ids))])


def _load(args, torch, part):
    """(skeleton module, probes, train, checkpoint paths, lrs) in --dtype."""
    from ckptforce.class_probes import ClassBatch

    info = json.loads((OUT_DIR / "manifest.json").read_text())[part]
    dtype = getattr(torch, args.dtype)
    data = torch.load(OUT_DIR / f"{part}_data.pt", weights_only=True)
    if part == "mlp":
        module = _mlp(torch, args.hidden).to(dtype)

        def cls(x, y):
            return ClassBatch(x.to(dtype), y[:, None], torch.ones(len(y), 1, dtype=torch.bool), list(range(len(y))))

        return module, cls(data["x_probe"], data["y_probe"]), cls(data["x_train"], data["y_train"]), info
    module = _gpt2(torch).to(dtype)
    ids = data["ids"]
    return module, _token_batch(torch, ids[args.gpt2_train :]), _token_batch(torch, ids[: args.gpt2_train]), info


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def _ours(args, torch, part):
    """(probes, train, run): run(probe_score) loads the checkpoint files and returns ckptforce's TracIn."""
    from ckptforce.forces import nll_rows, tracin_kernel
    from ckptforce.model import BoundModel

    module, probes, train, info = _load(args, torch, part)
    module.eval().requires_grad_(False)
    model = BoundModel(module, "classifier" if part == "mlp" else "lm", "bench", "eager" if part == "gpt2" else "none")
    names = model.param_names
    dtype = getattr(torch, args.dtype)

    def run(probe_score=nll_rows):
        ckpts = []
        for path, lr in zip(info["checkpoints"], info["lrs"]):
            state = torch.load(path, weights_only=True, map_location="cpu")
            ckpts.append(({n: state[n].to(dtype) for n in names}, lr))
        return tracin_kernel(model.logits, ckpts, probes, train, module=module, probe_score=probe_score, chunk_size=args.chunk)

    return probes, train, run


def _best(run, repeat: int) -> tuple[list[float], object]:
    run()  # warm-up
    times = []
    for _ in range(repeat):
        t, res = _timed(run)
        times.append(t)
    return times, res


def worker_ours(args, part: str) -> dict:
    torch = _imports()
    import numpy as np

    probes, train, run = _ours(args, torch, part)
    times, res = _best(run, args.repeat)
    peak = maxrss_kib()
    np.save(OUT_DIR / f"{part}_ours.npy", res.k.double().numpy())
    np.save(OUT_DIR / f"{part}_ours_logp.npy", run(probe_score=None).k.double().numpy())  # default score: log π
    return {"times": times, "peak_kib": peak, "approximate": res.approximate, "rows": [len(probes), len(train)]}


def worker_captum(args, part: str, sample_wise: bool) -> dict:
    torch = _imports()
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    module, probes, train, info = _load(args, torch, part)
    lr_of = dict(zip(info["checkpoints"], info["lrs"]))

    if part == "mlp":
        model = module
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none")

        def data(b, n=None):
            return (b.x[:n], b.targets[:n, 0])
    else:

        class Wrapped(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.lm = lm

            def forward(self, input_ids, attention_mask):
                return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)

        class SeqNll(torch.nn.Module):  # per row: Σ_t CE over the response positions (labels -100 elsewhere)
            reduction = "none"

            def forward(self, logits, labels):
                tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
                return tok.sum(1)  # (B,)

        model, loss_fn = Wrapped(module), SeqNll()

        def data(b, n=None):
            labels = torch.where(b.target_mask, b.targets, torch.full_like(b.targets, -100))
            return (b.input_ids[:n], b.attention_mask[:n], labels[:n])

    def load(m, path):
        state = torch.load(path, weights_only=True, map_location="cpu")
        (m if part == "mlp" else m.lm).load_state_dict(state)
        return lr_of[path]

    def run(n_train=None, n_probe=None):
        tracin = TracInCP(model, TensorDataset(*data(train, n_train)), checkpoints=info["checkpoints"], checkpoints_load_func=load,
                          loss_fn=loss_fn, batch_size=args.captum_batch, sample_wise_grads_per_batch=sample_wise)  # fmt: skip
        return tracin.influence(data(probes, n_probe))

    run(32, 1)  # warm-up
    t, scores = _timed(run)
    peak = maxrss_kib()  # before ckptforce runs alongside (its peak is far lower anyway)
    import numpy as np

    np.save(OUT_DIR / f"{part}_captum{'_sw' if sample_wise else ''}.npy", scores.double().detach().numpy())
    alongside, _ = _best(_ours(args, torch, part)[2], args.repeat)  # the same CPU weather as the TracInCP run
    return {"times": [t], "peak_kib": peak, "ours_alongside": alongside}


def worker(args) -> dict:
    kind = args.worker
    import torch

    torch.set_num_threads(args.threads)
    if kind == "import":
        _imports()
        return {"peak_kib": maxrss_kib()}
    if kind == "setup":
        return worker_setup(args)
    part, method = kind.split(":")
    if method == "ours":
        return worker_ours(args, part)
    return worker_captum(args, part, sample_wise=method == "captum_sw")


# --------------------------------------------------------------------------------------------------------------
# the driver (never imports torch)


def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind] + _forward_args(args)
    env = dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    busy0, own0 = cpu_busy_s(), children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    other = (cpu_busy_s() - busy0) - (children_cpu_s() - own0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
        raise SystemExit(f"worker {kind!r} failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len(MARKER) :])
    out["wall_s"] = wall
    out["other_load"] = max(0.0, other / (wall * (os.cpu_count() or 1))) if busy0 >= 0 else float("nan")
    return out


def _forward_args(args) -> list[str]:
    return ["--train", str(args.train), "--probes", str(args.probes), "--checkpoints", str(args.checkpoints),
            "--gpt2-train", str(args.gpt2_train), "--gpt2-probes", str(args.gpt2_probes), "--dtype", args.dtype,
            "--repeat", str(args.repeat), "--chunk", str(args.chunk), "--captum-batch", str(args.captum_batch),
            "--seed", str(args.seed), "--threads", str(args.threads), "--hidden", str(args.hidden)]  # fmt: skip


def _rel(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / np.abs(b).max())


def report(part: str, res: dict, base_kib: int) -> tuple[list[str], dict[str, float]]:
    """Print one part's lines; (failures, {baseline: speed ratio}). The ratio divides the baseline's time by
    ckptforce's best time measured in the same worker right after it (same CPU weather); the ratio to the
    ckptforce worker's own best is printed beside it."""
    import numpy as np

    ours = np.load(OUT_DIR / f"{part}_ours.npy")
    logp = np.load(OUT_DIR / f"{part}_ours_logp.npy")
    mine = res["ours"]
    best = min(mine["times"])
    failures, ratios = [], {}
    print(f"  {'ckptforce tracin_kernel':40s} best {best:8.3f} s of {len(mine['times'])}   peak RSS above import "
          f"{(mine['peak_kib'] - base_kib) / 1024:5.0f} MiB   (other processes {100 * mine['other_load']:.0f}% of the CPUs)")  # fmt: skip
    for key, label in (("captum", "TracInCP, per-example loop"), ("captum_sw", "TracInCP, sample_wise_grads_per_batch")):
        if key not in res:
            continue
        r = res[key]
        ref = np.load(OUT_DIR / f"{part}_{key}.npy")
        t, along = r["times"][0], min(r["ours_alongside"])
        rel, rel_sign = _rel(ours, ref), _rel(-logp, ref)
        ratios[key] = t / along
        print(f"  {label:40s} {t:13.3f} s, 1 run  peak RSS above import {(r['peak_kib'] - base_kib) / 1024:5.0f} MiB   "
              f"(other processes {100 * r['other_load']:.0f}% of the CPUs)\n"
              f"  {'':40s} ckptforce {t / along:6.1f}× faster (ckptforce alongside: {along:.3f} s; vs the ckptforce worker: "
              f"{t / best:.1f}×); max|ours − captum| / max|captum| = {rel:.1e}; default score log π: "
              f"max|K + captum| / max|captum| = {rel_sign:.1e}")  # fmt: skip
        if not rel <= CHECK_REL or not rel_sign <= CHECK_REL:
            failures.append(f"{part}: ckptforce and {label} differ (rel {rel:.1e}, sign check {rel_sign:.1e} > {CHECK_REL:g})")
    return failures, ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/kernels.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--train", type=int, default=2000, help="MLP part: training examples")
    ap.add_argument("--probes", type=int, default=100, help="MLP part: probes (held-out examples)")
    ap.add_argument("--hidden", type=int, default=128, help="MLP part: width of its two hidden layers")
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints saved by each training loop")
    ap.add_argument("--gpt2-train", type=int, default=128, help="GPT-2 part: training sequences")
    ap.add_argument("--gpt2-probes", type=int, default=16, help="GPT-2 part: probe sequences")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype of both methods")
    ap.add_argument("--repeat", type=int, default=5, help="timed ckptforce runs after one warm-up; best reported")
    ap.add_argument("--chunk", type=int, default=512, help="ckptforce: rows per chunk on each side")
    ap.add_argument("--captum-batch", type=int, default=256, help="TracInCP batch_size for the training set")
    ap.add_argument("--parts", default="mlp,gpt2", help="which parts to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every worker (both methods alike); 1 keeps OpenMP from spinning on a shared machine")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(MARKER + json.dumps(worker(args)), flush=True)
        return 0
    parts = [p for p in args.parts.split(",") if p]
    print(f"[setup] python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.dtype}; {args.threads} torch thread(s) per worker; each measurement in a fresh subprocess", flush=True)  # fmt: skip
    info = run_worker("setup", args)
    base = run_worker("import", args)["peak_kib"]
    print(f"[import] torch + transformers + captum + ckptforce: peak RSS {base / 1024:.0f} MiB", flush=True)
    failures, ratios, others = [], {}, {}
    for part in parts:
        i = info[part]
        if part == "mlp":
            print(f"\n[mlp] MLP {DIM}-{args.hidden}-{args.hidden}-{CLASSES} ({i['params']:,} params), synthetic {CLASSES}-class "
                  f"Gaussian mixture: {args.train} training examples × {args.probes} probes, {args.checkpoints} "
                  f"checkpoints (lr {i['lrs']}); probe accuracy {i['probe_accuracy']:.2f}", flush=True)  # fmt: skip
            methods = ["ours", "captum", "captum_sw"]
        else:
            print(f"\n[gpt2] GPT-2 {GPT2} ({i['params']:,} params, eager attention): {args.gpt2_train} training "
                  f"sequences × {args.gpt2_probes} probes, {PROMPT}+{RESPONSE} tokens, {args.checkpoints} checkpoints "
                  f"(lr {i['lrs']}; training loss {i['loss_first']:.2f} -> {i['loss_last']:.2f})", flush=True)  # fmt: skip
            methods = ["ours", "captum"]
        res = {m: run_worker(f"{part}:{m}", args) for m in methods}
        fails, ratios[part] = report(part, res, base)
        failures += fails
        others[part] = {m: r["other_load"] for m, r in res.items()}
    print(f"\n[summary] load average now {os.getloadavg()[0]:.2f}; driver peak RSS {maxrss_kib() / 1024:.0f} MiB")
    if "mlp" in ratios:
        r = ratios["mlp"]["captum"]
        print(f"[goal] ≥ {GOAL:.0f}× faster than TracInCP on the MLP: {r:.0f}× (per-example loop), "
              f"{ratios['mlp']['captum_sw']:.0f}× (sample-wise hooks) -> {'met' if r >= GOAL else 'NOT met'}")  # fmt: skip
    busy = [f"{part} {m} {100 * r:.0f}%" for part, loads in others.items() for m, r in loads.items() if r > CONTENTION]
    if busy:
        print(f"[warn] other processes took > {100 * CONTENTION:.0f}% of the CPUs during: {', '.join(busy)}; times and "
              "ratios move with them (the ratios divide by ckptforce timed right after each baseline): rerun on a quiet machine")  # fmt: skip
    for f in failures:
        print(f"[FAIL] {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
