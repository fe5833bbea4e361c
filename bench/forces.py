#!/usr/bin/env python
"""Benchmark: cost of ckptforce's force engine (``ckptforce.forces``) relative to one plain forward, its peak
memory, and the accuracy/cost of the path quadrature on a real pair of checkpoints.

Part 1 — cost and memory on a synthetic GPT-2 (random init, ``attn_implementation="eager"``, no downloads):

* forward      ``with torch.no_grad(): model.logits(params, batch)``: the baseline every ratio divides by
* observe      ``observe(model.logits, params, batch)``: the forward plus the softmax statistics
* jvp          ``delta_lin(..., method="jvp")``: A·J·Δθ by one forward-mode JVP
* double_vjp   ``delta_lin(..., method="double_vjp")``: the same by reverse-over-reverse
* path<n>      ``delta_path(..., nodes=n)`` for each n of ``--path-nodes`` (default 2 and 4)
* by_tensor    ``contributions_by_tensor(..., chunk_size=16)``, only with ``--by-tensor``

All of them see the same batch and the same chunking (``--chunk-size``; default: the whole batch in one call).
Each measurement runs in a fresh subprocess that builds the model, the batch and Δθ itself, runs the method
once as a warm-up (``delta_path`` warms up with ``nodes=1``: the same code at the cost of one node), then
``--repeat`` timed runs; the best time is reported. Each worker also times a plain forward after every run of
its method, and its ratio is best(method) / best(forward alongside): that holds up better than dividing by the
forward worker's time when other processes come and go on the CPUs (the cross-check against the forward
worker is printed too, as is the share of the CPUs other processes took during each worker).

Peak memory is one call's: read right after the method's first call (later calls can only add allocator
fragmentation). On CPU the worker's ``ru_maxrss`` minus that of a subprocess that only imports (torch,
transformers, ckptforce), so it includes the model, batch and Δθ; on CUDA ``torch.cuda.max_memory_allocated``
(nothing is allocated on the GPU at import). The driver never imports torch: on Linux a child's ru_maxrss
starts at its parent's peak.

Correctness check: the jvp and double_vjp workers return Δ_lin per row (total, per token, argmax); the driver
fails unless max|jvp − double_vjp| / max|double_vjp| ≤ 1e-4 for each (fp32).

Part 2 — quadrature nodes on a real run (``sample_runs/tiny-gpt2-trainer``, Hugging Face Trainer checkpoints
2, 4, 6), in float64: for the pairs 2→4 and 2→6 (a "large step"), Δ_obs = observe(θ_b).logp − observe(θ_a).logp
and, for n = 0 (the tangent Δ_lin) and n = 1..6 (Δ_path), the max and mean gap relative to Δ_obs and the cost
relative to one forward (timed on the first pair; the cost does not depend on Δθ). Ends with ``suggested default nodes: N`` — the smallest n whose max relative gap is
< 1e-3 on both pairs.

Run from the repository root:  python bench/forces.py  [--device cuda] [--repeat 3] [--probes 24] [--by-tensor]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import children_cpu_s, cpu_busy_s, maxrss_kib, vmhwm_kib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out" / "forces"
SAMPLE_RUN = REPO / "sample_runs" / "tiny-gpt2-trainer"
MIB = 2**20
MARKER = "BENCH_RESULT "
CHECK_REL = 1e-4  # jvp vs double vjp, fp32
GOAL_JVP = 3.3
CONTENTION = 0.10  # warn when other processes took more than this share of the CPUs during a measurement
QUAD_MAX_NODES = 6
QUAD_TOL = 1e-3
PROMPT_LEN = (12, 20)  # synthetic probes: prompt and response lengths (inclusive), random ids
RESPONSE_LEN = (6, 16)
LABEL = {"forward": "forward", "observe": "observe", "jvp": "Δ_lin (jvp)", "double_vjp": "Δ_lin (double vjp)",
         "by_tensor": "by tensor (chunk 16)"}  # fmt: skip


def label(method: str) -> str:
    return LABEL.get(method) or f"Δ_path n={method[4:]}"


# --------------------------------------------------------------------------------------------------------------
# the worker (runs in a fresh subprocess; everything torch lives here)




def _imports():
    """The same imports for every worker, so the import-only baseline is comparable."""
    import torch
    import transformers  # noqa: F401
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401  (the lazy module loads the model code)

    import ckptforce.forces
    import ckptforce.model
    import ckptforce.probes  # noqa: F401

    return torch


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(
    n_probes: int, n_responses: int, vocab: int, prompt_len: tuple[int, int], response_len: tuple[int, int], seed: int
):
    """``n_probes`` probes of random token ids with ``n_responses`` response types each -> a TokenBatch."""
    import random

    from ckptforce.probes import LmProbe, ProbeSet, TokenizedProbes, make_batch

    rng = random.Random(seed)
    types = [f"type{k}" for k in range(n_responses)]
    probes, prompt_ids, response_ids = [], [], []
    for i in range(n_probes):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))]
        responses = {t: [rng.randrange(vocab) for _ in range(rng.randint(*response_len))] for t in types}
        probes.append(LmProbe(id=f"p{i}", prompt=None, prompt_ids=prompt, responses=responses))
        prompt_ids.append(prompt)
        response_ids.append(responses)
    tok = TokenizedProbes(ProbeSet(path=Path("bench"), probes=probes), prompt_ids=prompt_ids, response_ids=response_ids)
    return make_batch(tok)


def build_synthetic(args, torch, device):
    """(model, params, batch, direction, info) for the synthetic GPT-2, all seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckptforce.model import BoundModel

    context = PROMPT_LEN[1] + RESPONSE_LEN[1]
    torch.manual_seed(args.seed)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(64, context), attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    module = GPT2LMHeadModel(cfg).eval().requires_grad_(False).to(device)
    model = BoundModel(module, "lm", "bench", "eager", cfg.n_positions)
    params = {n: p.detach() for n, p in module.named_parameters()}
    batch = random_batch(args.probes, args.responses, args.vocab, PROMPT_LEN, RESPONSE_LEN, args.seed + 1).to(device)
    # Δθ: per tensor 1e-3 × the tensor's RMS (at least the init scale 0.02, so zero-initialised biases move too)
    g = torch.Generator().manual_seed(args.seed + 2)
    direction = {}
    for n, p in params.items():
        scale = 1e-3 * max(float(p.float().pow(2).mean().sqrt()), 0.02)
        direction[n] = (scale * torch.randn(p.shape, generator=g)).to(device=device, dtype=p.dtype)
    info = {
        "params": sum(p.numel() for p in params.values()),
        "rows": len(batch),
        "T": int(batch.input_ids.shape[1]),
        "tokens": int(batch.attention_mask.sum()),
        "response_tokens": int(batch.target_mask.sum()),
        "activation": cfg.activation_function,
    }
    return model, params, batch, direction, info


def _method_fn(method: str, model, params, batch, direction, chunk):
    import torch

    from ckptforce.forces import contributions_by_tensor, delta_lin, delta_path, observe
    from ckptforce.forces.observe import chunks

    fn = model.logits
    if method == "forward":

        def run():
            with torch.no_grad():
                return [fn(params, sub) for sub in chunks(batch, chunk)][-1]

        return run
    if method == "observe":
        return lambda: observe(fn, params, batch, chunk_size=chunk)
    if method in ("jvp", "double_vjp"):
        return lambda: delta_lin(fn, params, batch, direction, method=method, chunk_size=chunk)
    if method.startswith("path"):
        return lambda: delta_path(fn, params, batch, direction, nodes=int(method[4:]), chunk_size=chunk)
    if method == "by_tensor":
        return lambda: contributions_by_tensor(fn, params, batch, direction, chunk_size=16)
    raise ValueError(method)


def worker_measure(args) -> dict:
    t_imp = time.perf_counter()
    torch = _imports()
    device = torch.device(args.device)
    out = {"method": args.worker, "import_s": time.perf_counter() - t_imp, "maxrss_after_import_kib": maxrss_kib(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
        out["device_name"] = torch.cuda.get_device_name(device)
    if args.worker == "import":
        out["maxrss_kib"], out["vmhwm_kib"] = maxrss_kib(), vmhwm_kib()
        return out
    model, params, batch, direction, info = build_synthetic(args, torch, device)
    out.update(info)
    _sync(torch, device)
    out["maxrss_after_setup_kib"] = maxrss_kib()
    if device.type == "cuda":
        out["cuda_after_setup"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    run = _method_fn(args.worker, model, params, batch, direction, args.chunk_size)
    # delta_path's warm-up is delta_path(nodes=1): the same code and kernels as n nodes, at the cost of one node
    warm = (
        _method_fn("path1", model, params, batch, direction, args.chunk_size) if args.worker.startswith("path") else run
    )
    # Every worker but the forward's also times a plain forward, interleaved with its own runs: its ratio divides
    # by the forward measured alongside it, which holds up when other processes come and go on the CPUs.
    fwd = None if args.worker == "forward" else _method_fn("forward", model, params, batch, direction, args.chunk_size)

    ru_runs: list[tuple[float, float, int]] = []  # (user s, sys s, minor page faults) of each timed run

    def timed(f, keep=None):
        _sync(torch, device)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        r = f()
        _sync(torch, device)
        t = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        if keep is not None:
            keep.append((ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime, ru1.ru_minflt - ru0.ru_minflt))
        return t, r

    times, fwd_times = [], []
    result = None
    for i in range(args.repeat + 1):  # round 0 is the warm-up
        result = None  # the previous run's output is freed first: the peak is one call's
        t, result = timed(warm if i == 0 else run, None if i == 0 else ru_runs)
        if i == 0:
            out["warmup_s"] = t
        else:
            times.append(t)
        if i == (1 if warm is not run else 0):  # right after the method's first call: one call's peak
            out["peak_kib"] = maxrss_kib()
            if device.type == "cuda":
                out["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        if fwd is not None:  # (result is small for every method but the forward, which has no twin)
            t, _ = timed(fwd)
            if i > 0:
                fwd_times.append(t)
    out["times"], out["fwd_times"] = times, fwd_times
    best = min(range(len(times)), key=times.__getitem__)
    out["user_s"], out["sys_s"], out["minflt"] = ru_runs[best]  # of the best run
    out["maxrss_kib"], out["vmhwm_kib"] = maxrss_kib(), vmhwm_kib()
    if device.type == "cuda":
        out["cuda_peak_all"] = torch.cuda.max_memory_allocated(device)
    if args.worker in ("jvp", "double_vjp"):
        m = batch.target_mask
        out["method_used"] = result.method
        out["values"] = {
            "total": result.total.double().cpu().tolist(),
            "argmax": result.argmax.double().cpu().tolist(),
            "tok": result.tok[:, : m.shape[1]][m].double().cpu().tolist(),  # response positions only
        }
    if args.worker.startswith("path"):
        out["method_used"] = result.method
    return out


def worker_profile(args) -> dict:
    """torch.profiler of one forward and one delta_lin(jvp), plus the split jvp_logits / dlogp_from_dlogits."""
    torch = _imports()
    from torch.profiler import ProfilerActivity, profile

    from ckptforce.forces import delta_lin, dlogp_from_dlogits, jvp_logits

    device = torch.device(args.device)
    model, params, batch, direction, _ = build_synthetic(args, torch, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    fwd = _method_fn("forward", model, params, batch, direction, None)

    def lin():
        return delta_lin(model.logits, params, batch, direction, method="jvp")

    def best(f, k=2):
        f()
        ts = []
        for _ in range(k):
            _sync(torch, device)
            t0 = time.perf_counter()
            r = f()
            _sync(torch, device)
            ts.append(time.perf_counter() - t0)
        return min(ts), r

    t_fwd, _ = best(fwd)
    t_jl, pair = best(lambda: jvp_logits(model.logits, params, batch, direction, method="jvp"))
    t_dl, _ = best(lambda: dlogp_from_dlogits(pair[0], pair[1], batch.targets, batch.target_mask))
    pair = None
    head = (
        f"whole batch, no chunking: forward {t_fwd:.3f} s; delta_lin(jvp) = jvp_logits {t_jl:.3f} s "
        f"({t_jl / t_fwd:.2f}× forward) + dlogp_from_dlogits {t_dl:.3f} s ({t_dl / t_fwd:.2f}× forward)"
    )
    text = [head]
    for name, f in (("forward", fwd), ("delta_lin(jvp)", lin)):
        with profile(activities=acts) as prof:
            f()
            _sync(torch, device)
        text.append(f"--- torch.profiler: {name} (top ops by self time; the profiler itself adds overhead)")
        text.append(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=40))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "profile_jvp.txt").write_text("\n".join(text))
    return {"method": "profile", "text": "\n".join(text)}


def worker_quad(args) -> dict:
    """Accuracy and cost of Δ_lin and Δ_path (n = 1..6) against Δ_obs on the sample run, float64."""
    torch = _imports()
    from ckptforce import open_run
    from ckptforce.forces import delta_lin, delta_path, observe
    from ckptforce.model import bind

    device = torch.device(args.device)
    run = open_run(SAMPLE_RUN)
    refs = run.checkpoints
    with run.open(refs[0]) as ckpt:
        model = bind(ckpt)
    model.module.double().to(device)
    thetas = {}
    for ref in refs:
        with run.open(ref) as ckpt:
            thetas[ref.step] = model.params_from(ckpt, device=device, dtype=torch.float64)
    vocab = model.module.config.vocab_size
    context = model.context
    # prompts and responses sized to the run's context: prompt + response ≤ context
    p_len = (max(1, context // 4), context // 2)
    r_len = (max(1, context // 8), context - context // 2)
    batch = random_batch(args.quad_probes, args.responses, vocab, p_len, r_len, args.seed + 3).to(device)
    fn = model.logits

    def once(f):
        _sync(torch, device)
        t0 = time.perf_counter()
        f()
        _sync(torch, device)
        return time.perf_counter() - t0

    def cost(f, p):  # the caller's first call of f was its warm-up; a forward is timed alongside each run
        ts, fs = [], []
        for _ in range(args.quad_repeat):
            ts.append(once(f))
            fs.append(once(lambda: fwd(p)))
        fwd_best.append(min(fs))
        return min(ts) / min(fs)

    fwd_best: list[float] = []

    def fwd(p):
        with torch.no_grad():
            return fn(p, batch)

    steps = [r.step for r in refs]
    pairs = [(steps[0], steps[1]), (steps[0], steps[-1])]
    result = {"method": "quad", "steps": steps, "probes": args.quad_probes, "responses": args.responses,
              "prompt_len": p_len, "response_len": r_len, "vocab": vocab, "context": context, "rows": len(batch),
              "T": int(batch.input_ids.shape[1]), "response_tokens": int(batch.target_mask.sum()), "pairs": []}  # fmt: skip
    costs: dict[int, float] = {}  # cost does not depend on Δθ: timed on the first pair, reused for the second
    for a, b in pairs:
        pa, pb = thetas[a], thetas[b]
        step = {n: pb[n] - pa[n] for n in pa}
        rel_step = math.sqrt(sum(float(d.pow(2).sum()) for d in step.values())) / math.sqrt(
            sum(float(p.pow(2).sum()) for p in pa.values())
        )
        obs = observe(fn, pb, batch).logp - observe(fn, pa, batch).logp
        fwd(pa)  # warm-up
        denom_max = float(obs.abs().max())
        denom_mean = float(obs.abs().mean())
        rows = []
        for n in range(QUAD_MAX_NODES + 1):
            if n == 0:
                f = partial(lambda p, v: delta_lin(fn, p, batch, v, method="jvp").total, pa, step)
            else:
                f = partial(lambda p, v, k: delta_path(fn, p, batch, v, nodes=k, method="jvp").total, pa, step, n)
            pred = f()  # also the warm-up for the timing
            gap = (pred - obs).abs()
            if n not in costs:
                costs[n] = cost(f, pa)
            rows.append({"n": n, "max_rel": float(gap.max()) / denom_max, "mean_rel": float(gap.mean()) / denom_mean,
                         "cost": costs[n]})  # fmt: skip
        result["forward_s"] = min(fwd_best)
        result["pairs"].append({"a": a, "b": b, "rel_step": rel_step, "obs_max": denom_max, "obs_mean": denom_mean,
                                "rows": rows})  # fmt: skip
    return result


# --------------------------------------------------------------------------------------------------------------
# the driver (never imports torch)


MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**33)}


def _env(malloc_keep: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if malloc_keep:  # glibc keeps freed memory (no mmap per big tensor, no trimming): no page-fault zero-fill
        env.update(MALLOC_KEEP)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _common_args(args) -> list[str]:
    out = ["--device", args.device, "--repeat", str(args.repeat), "--layers", str(args.layers), "--embd", str(args.embd),
           "--heads", str(args.heads), "--vocab", str(args.vocab), "--probes", str(args.probes),
           "--responses", str(args.responses), "--seed", str(args.seed), "--quad-probes", str(args.quad_probes),
           "--quad-repeat", str(args.quad_repeat)]  # fmt: skip
    if args.chunk_size:
        out += ["--chunk-size", str(args.chunk_size)]
    return out


def run_worker(kind: str, args, timeout: int = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *_common_args(args)]
    busy0, own0 = cpu_busy_s(), children_cpu_s()
    t0 = time.perf_counter()
    env = _env(args.malloc_keep)
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_s(), children_cpu_s()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-8000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {kind!r} failed (exit {proc.returncode})")
    out = json.loads(lines[-1][len(MARKER) :])
    out["worker_wall_s"] = wall
    # the share of the machine's CPU time that other processes took while this worker ran (0 = it had them all)
    other = (busy1 - busy0) - (own1 - own0)
    out["other_load"] = max(0.0, other / (wall * (os.cpu_count() or 1))) if busy0 >= 0 and wall > 0 else float("nan")
    return out


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    scale = max((abs(y) for y in b), default=0.0)
    diff = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def check_jvp_vs_double_vjp(jvp: dict, dvjp: dict) -> dict[str, float]:
    if jvp.get("method_used") != "jvp" or dvjp.get("method_used") != "double_vjp":
        raise SystemExit(
            f"delta_lin used {jvp.get('method_used')!r} / {dvjp.get('method_used')!r}, asked for jvp / double_vjp"
        )
    rel = {}
    for key in ("total", "tok", "argmax"):
        a, b = jvp["values"][key], dvjp["values"][key]
        if len(a) != len(b):
            raise SystemExit(f"jvp and double vjp return different shapes for {key}: {len(a)} vs {len(b)}")
        if not all(math.isfinite(x) for x in a + b):
            raise SystemExit(f"non-finite Δ_lin values ({key})")
        rel[key] = _max_rel_diff(a, b)
    bad = {k: v for k, v in rel.items() if not v <= CHECK_REL}
    if bad:
        raise SystemExit("Δ_lin (jvp) and Δ_lin (double vjp) disagree: " + ", ".join(f"{k}: max|diff|/max = {v:.2e}" for k, v in bad.items())
                         + f" (allowed {CHECK_REL:g})")  # fmt: skip
    return rel


def ratio_of(r: dict) -> float:
    """Best time / best plain forward timed alongside it in the same worker (1 for the forward itself)."""
    return min(r["times"]) / min(r["fwd_times"]) if r["fwd_times"] else 1.0


def peak_mib(r: dict, base_kib: int, cuda: bool) -> float:
    """One call's peak: CUDA max_memory_allocated, or the worker's ru_maxrss above the import-only worker's."""
    return r["cuda_peak"] / MIB if cuda else (r["peak_kib"] - base_kib) / 1024


def fmt_measure(r: dict, forward: dict, base_kib: int, cuda: bool) -> str:
    """Two lines per measurement: times and ratio; then memory, rusage of the best run and CPU contention."""
    best = min(r["times"])
    times = " ".join(f"{t:.3f}" for t in r["times"])
    line = f"[{r['method']:10s}] best {best:7.3f} s = {_fmt_ratio(ratio_of(r)):>6s} forward   runs {times} (warm-up {r['warmup_s']:.3f})"
    if r["fwd_times"]:
        line += f"; forward alongside {min(r['fwd_times']):.3f} s (vs the forward worker's: {best / min(forward['times']):.2f}×)"
    spread = max(r["times"]) / best
    if spread > 1.5:
        line += f"  [spread {spread:.2f}×: CPUs busy?]"
    if cuda:
        mem = (f"peak allocated {r['cuda_peak'] / MIB:.1f} MiB (after setup {r['cuda_after_setup'] / MIB:.1f}, "
               f"after all runs {r['cuda_peak_all'] / MIB:.1f})")  # fmt: skip
    else:
        mem = (f"peak RSS above import {(r['peak_kib'] - base_kib) / 1024:.0f} MiB (above setup "
               f"{(r['peak_kib'] - r['maxrss_after_setup_kib']) / 1024:.0f}; after all runs "
               f"{(r['maxrss_kib'] - base_kib) / 1024:.0f}, VmHWM {r['vmhwm_kib'] / 1024:.0f} raw)")  # fmt: skip
    line += (
        f"\n{'':13s}{mem}; best run: user {r['user_s']:.2f} s, sys {r['sys_s']:.2f} s, {r['minflt'] / 1e3:.0f}k minor faults;"
        f" worker {r['worker_wall_s']:.0f} s, other processes {100 * r['other_load']:.0f}% of the CPUs"
    )
    return line


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:.1f}×"


def print_quad(q: dict, jvp_ratio: float | None) -> int | None:
    (p0, p1), (r0, r1) = q["prompt_len"], q["response_len"]
    print(f"\n[nodes] real run {SAMPLE_RUN.relative_to(REPO)} (checkpoints at steps {q['steps']}), float64, vocab "
          f"{q['vocab']}, context {q['context']}: {q['rows']} rows ({q['probes']} random probes × {q['responses']} responses,"
          f" prompt {p0}-{p1}, responses {r0}-{r1} tokens), T = {q['T']}, {q['response_tokens']} response tokens")  # fmt: skip
    print("  gap = |Δ_pred − Δ_obs| per row; max rel = max gap / max|Δ_obs|, mean rel = mean gap / mean|Δ_obs|;"
          " cost = best time / best plain forward of the same batch, timed alternately\n"
          f"  (forward {q['forward_s'] * 1e3:.0f} ms; costs timed on the first pair and shown for both; on a model this"
          " small, allocation and per-op overhead dominate;"
          f" worker {q['worker_wall_s']:.0f} s, other processes {100 * q['other_load']:.0f}% of the CPUs)")  # fmt: skip
    if jvp_ratio is not None:
        print(
            f"  'bench-size cost' ≈ n × the synthetic model's Δ_lin (jvp) ratio ({jvp_ratio:.2f}×): what n nodes cost there"
        )
    ok_nodes = None
    passing = {n: True for n in range(1, QUAD_MAX_NODES + 1)}
    for pair in q["pairs"]:
        print(f"\n  step {pair['a']} → {pair['b']}: ‖Δθ‖/‖θ‖ = {pair['rel_step']:.2e}, max|Δ_obs| = {pair['obs_max']:.3e}, "
              f"mean|Δ_obs| = {pair['obs_mean']:.3e}")  # fmt: skip
        head = f"  {'n':>2}  {'':14s} {'max rel':>10s} {'mean rel':>10s} {'cost':>8s}"
        print(head + ("  bench-size cost" if jvp_ratio is not None else ""))
        for r in pair["rows"]:
            name = "Δ_lin (tangent)" if r["n"] == 0 else "Δ_path"
            line = f"  {r['n']:>2}  {name:14s} {r['max_rel']:10.2e} {r['mean_rel']:10.2e} {_fmt_ratio(r['cost']):>8s}"
            if jvp_ratio is not None:
                line += f"  {_fmt_ratio(max(1, r['n']) * jvp_ratio):>8s}"
            print(line)
            if r["n"] >= 1 and not r["max_rel"] < QUAD_TOL:
                passing[r["n"]] = False
    ok = [n for n in sorted(passing) if passing[n]]
    ok_nodes = ok[0] if ok else None
    return ok_nodes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/forces.py",
        description=(
            "Cost and peak memory of ckptforce's force engine on a synthetic random-init GPT-2 (eager attention): "
            "observe, delta_lin by JVP and by double VJP, delta_path with --path-nodes nodes (and, with --by-tensor, "
            "contributions_by_tensor), each as a ratio to one plain no-grad forward of the same batch. Each "
            "measurement runs in a fresh subprocess: one warm-up, then --repeat timed runs, best reported. Checks "
            "that the JVP and the double VJP agree (max|diff|/max ≤ 1e-4). Then the accuracy/cost table for choosing "
            "the number of quadrature nodes on the real sample run sample_runs/tiny-gpt2-trainer (float64)."
        ),
        epilog=(
            "Peak memory: CPU = ru_maxrss of the measuring subprocess minus that of an import-only subprocess "
            "(torch + transformers + ckptforce); includes the model, batch and Δθ built in the worker. CUDA = "
            "torch.cuda.max_memory_allocated of the worker (all of it is above import). Goal: Δ_lin (jvp) ≤ 3.3× "
            "forward (the FLOP floor is 3×). Run from the repository root; profiles go to bench/out/forces/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--device",
        default="cpu",
        help="torch device: cpu or cuda (cuda[:k]); CUDA timings synchronize before and after each run",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="R",
        help="timed runs per measurement after one warm-up; the best is reported",
    )
    ap.add_argument("--layers", type=int, default=4, help="synthetic GPT-2: n_layer")
    ap.add_argument("--embd", type=int, default=256, help="synthetic GPT-2: n_embd (hidden size)")
    ap.add_argument("--heads", type=int, default=4, help="synthetic GPT-2: n_head (must divide --embd)")
    ap.add_argument(
        "--vocab", type=int, default=4096, help="synthetic GPT-2: vocab_size (the logits are rows × T × vocab)"
    )
    ap.add_argument("--probes", type=int, default=24,
                    help="synthetic probes (random token ids, prompt 12-20 and responses 6-16 tokens); rows = probes × responses")  # fmt: skip
    ap.add_argument(
        "--responses", type=int, default=8, help="response types per probe (also used for the quadrature table)"
    )
    ap.add_argument("--chunk-size", type=int, default=None, metavar="ROWS",
                    help="rows per call for forward, observe, delta_lin and delta_path alike (default: the whole batch at once)")  # fmt: skip
    ap.add_argument(
        "--path-nodes", default="2,4", metavar="N,N", help="quadrature node counts for the delta_path timings"
    )
    ap.add_argument("--by-tensor", action="store_true",
                    help="also time contributions_by_tensor (per-row gradients, chunk_size 16); off by default: it is slow")  # fmt: skip
    ap.add_argument(
        "--quad-probes", type=int, default=64, metavar="P", help="probes for the quadrature table on the sample run"
    )
    ap.add_argument("--quad-repeat", type=int, default=2, metavar="R",
                    help="timed runs per cost in the quadrature table, after the run that computes the values; best reported")  # fmt: skip
    ap.add_argument("--no-quad", action="store_true", help="skip the quadrature-node table on the sample run")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one forward and one delta_lin(jvp) with torch.profiler (printed; saved to bench/out/forces/profile_jvp.txt)")  # fmt: skip
    ap.add_argument(
        "--malloc-keep",
        action="store_true",
        help="run the workers with MALLOC_MMAP_THRESHOLD_=1GiB and MALLOC_TRIM_THRESHOLD_=8GiB: glibc then keeps freed "
        "memory instead of mapping every big tensor afresh, which removes the kernel's page-fault zero-fill from "
        "the timings (CPU; compare with a default run to see how much of a ratio is the allocator)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, probes and Δθ")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        if args.worker == "profile":
            out = worker_profile(args)
        elif args.worker == "quad":
            out = worker_quad(args)
        else:
            out = worker_measure(args)
        print(MARKER + json.dumps(out), flush=True)
        return 0

    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.embd % args.heads:
        ap.error(f"--heads {args.heads} must divide --embd {args.embd}")
    try:
        nodes = [int(x) for x in args.path_nodes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--path-nodes {args.path_nodes!r}: give node counts like 2,4")
    if any(n < 1 for n in nodes):
        ap.error("--path-nodes: every node count must be ≥ 1")
    cuda = args.device.startswith("cuda")

    t_start = time.perf_counter()
    load = os.getloadavg()[0]
    if args.malloc_keep:
        print("[setup] --malloc-keep: workers run with " + " ".join(f"{k}={v}" for k, v in MALLOC_KEEP.items()))
    print(f"[setup] device {args.device}; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load:.2f}; "
          f"each measurement in a fresh subprocess: 1 warm-up + {args.repeat} timed runs, best reported", flush=True)  # fmt: skip
    imp = run_worker("import", args)
    base_kib = imp["maxrss_kib"]
    if cuda:
        print(f"[device] {imp.get('device_name', '?')}", flush=True)
    mem_note = ("peak = torch.cuda.max_memory_allocated of the worker" if cuda else
                f"import-only peak RSS {base_kib / 1024:.0f} MiB (VmHWM {imp['vmhwm_kib'] / 1024:.0f}); "
                f"driver peak RSS {maxrss_kib() / 1024:.0f} MiB")  # fmt: skip
    print(
        f"[import] torch {imp['torch']}, torch threads {imp['torch_threads']}, import {imp['import_s']:.1f} s; {mem_note}",
        flush=True,
    )

    methods = (
        ["forward", "observe", "jvp", "double_vjp"]
        + [f"path{n}" for n in nodes]
        + (["by_tensor"] if args.by_tensor else [])
    )
    res: dict[str, dict] = {}
    for m in methods:
        r = run_worker(m, args)
        res[m] = r
        if m == "forward":
            print(f"[model] GPT-2 n_layer {args.layers}, n_embd {args.embd}, n_head {args.heads}, vocab {args.vocab}, "
                  f"{r['activation']}, eager attention, fp32, {r['params'] / 1e6:.2f} M params; batch {r['rows']} rows "
                  f"({args.probes} probes × {args.responses} responses) × T {r['T']} ({r['tokens']} real tokens, "
                  f"{r['response_tokens']} response tokens); "
                  + (f"chunks of {args.chunk_size} rows" if args.chunk_size else "whole batch in one call (no chunking)"),
                  flush=True)  # fmt: skip
        print(fmt_measure(r, res["forward"], base_kib, cuda), flush=True)

    rel = check_jvp_vs_double_vjp(res["jvp"], res["double_vjp"])
    print(f"[check] Δ_lin jvp vs double vjp agree: max|diff|/max|Δ| = total {rel['total']:.1e}, per token {rel['tok']:.1e}, "
          f"argmax {rel['argmax']:.1e} (allowed {CHECK_REL:g})", flush=True)  # fmt: skip

    prof_text = None
    if args.profile:
        prof_text = run_worker("profile", args)["text"]
        print("\n[profile]\n" + prof_text, flush=True)

    t_fwd = min(res["forward"]["times"])
    ratio = {m: ratio_of(r) for m, r in res.items()}
    suggested = None
    if not args.no_quad:
        q = run_worker("quad", args)
        suggested = print_quad(q, ratio["jvp"])

    mem = {m: peak_mib(r, base_kib, cuda) for m, r in res.items()}
    spread = [label(m) for m, r in res.items() if max(r["times"]) > 1.5 * min(r["times"])]
    busy = [f"{label(m)} {100 * r['other_load']:.0f}%" for m, r in res.items() if r["other_load"] > CONTENTION]
    print(f"\n[summary] best of {args.repeat}; forward {t_fwd:.3f} s; ratios divide by the forward timed in the same worker; "
          f"total bench time {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.2f}")  # fmt: skip
    if busy:
        print(
            f"[warn] other processes took > {100 * CONTENTION:.0f}% of the CPUs during: {', '.join(busy)}; with 2 OpenMP "
            "threads per worker a busy CPU slows the parallel regions unevenly, so times and ratios are unreliable: "
            "rerun on a quiet machine"
        )
    if spread:
        print(
            f"[warn] run times spread > 1.5× for {', '.join(spread)}: other processes were using the CPUs; rerun if in doubt"
        )
    paths = "  ".join(f"n={m[4:]}: {_fmt_ratio(ratio[m])}" for m in methods if m.startswith("path"))
    line = (f"Δ_lin (jvp): {ratio['jvp']:.2f}× forward  (goal ≤ {GOAL_JVP}×)   Δ_lin (double vjp): {ratio['double_vjp']:.2f}× forward"
            f"   Δ_path {paths}   observe: {ratio['observe']:.2f}× forward")  # fmt: skip
    if "by_tensor" in ratio:
        line += f"   by tensor (chunk 16): {_fmt_ratio(ratio['by_tensor'])} forward"
    print(line)
    what = "peak allocated (CUDA)" if cuda else "peak memory above import"
    print(f"{what}: " + ", ".join(f"{label(m)} {mem[m]:.0f} MiB" for m in methods))
    if not args.no_quad:
        print(f"suggested default nodes: {suggested}" if suggested is not None else
              f"suggested default nodes: none of 1..{QUAD_MAX_NODES} reaches max relative gap < {QUAD_TOL:g} on both pairs")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
