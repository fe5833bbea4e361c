#!/usr/bin/env python
"""Benchmark: streamed update anatomy (ckptforce) against loading whole files (``safetensors.torch.load_file``,
or ``torch.load`` with ``--format pt``).

What is compared (both compute the same per-tensor statistics with ``ckptforce.updates.delta_stats``):

* streaming   ``update_anatomy(open_run(run_dir), optimizer=False)``: tensor-major, each tensor read lazily
              from every checkpoint in turn (ckptforce detects the layout itself).
* whole-file  the naive way: for each consecutive pair of checkpoints, load BOTH files whole, then
              ``delta_stats`` per tensor, keeping the previous interval's dict of deltas for the cosine.
              ``--format safetensors``: ``load_file``; ``--format pt``: ``torch.load(path, map_location="cpu",
              weights_only=True)`` (no mmap), taking the state dict under ``"model"``.

Setup: a synthetic, seeded fp32 run of ``--checkpoints`` files (k = 1..N) with a GPT-2-like mix of shapes, built
once and reused while the files are intact:

* ``--format safetensors`` (default): ``model_step{100k}.safetensors``, under ``--workdir`` (WORKDIR/run);
* ``--format pt``: nanoGPT-style ``torch.save({"model": state_dict, "iter_num": 100k}, "ckpt_{100k:06d}.pt")``,
  same tensors, sizes and seed, under WORKDIR/pt (WORKDIR/pt/run), so the two formats' caches don't clash.

Every file is read once before measuring, so both methods read from the page cache. Each measurement runs in a fresh
subprocess (clean peak RSS); the peak RSS of a subprocess that only imports torch + ckptforce + safetensors is
subtracted to give "above import" figures.

Throughput, identical for both methods: bytes covered = (N − 1) intervals × 2 × file size (each interval
needs θ_t and θ_{t+1}), divided by the best wall time of ``--repeat`` runs. GB = 1e9 bytes, MiB = 2**20.

Run from the repository root:  python bench/updates.py  [--format {safetensors,pt}] [--checkpoints 3] [--size-mb 256]
[--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import maxrss_kib, vmhwm_kib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO / "bench" / "out" / "updates"
MIB = 2**20
FORMAT_VERSION = 1  # bump when the synthetic run changes, so cached files are rebuilt
MARKER = "BENCH_RESULT "

HIDDEN, FFN, VOCAB, CONTEXT = 1024, 4096, 8192, 1024
FORMATS = ("safetensors", "pt")
LAYOUT_OF = {"safetensors": "safetensors", "pt": "torch"}  # the layout ckptforce must detect for each format
BASELINE_NAME = {"safetensors": "load_file", "pt": "torch.load"}


# --------------------------------------------------------------------------------------------------------------
# the synthetic run


def model_shapes(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-2-like tensor list, grown layer by layer (tensor by tensor in the last one) until ≥ target bytes."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.wte.weight", (VOCAB, HIDDEN)),
        ("transformer.wpe.weight", (CONTEXT, HIDDEN)),
    ]

    def layer(i: int) -> list[tuple[str, tuple[int, ...]]]:
        p = f"transformer.h.{i}."
        out = [(p + "ln_1.weight", (HIDDEN,)), (p + "ln_1.bias", (HIDDEN,))]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += [(p + f"attn.{proj}.weight", (HIDDEN, HIDDEN)), (p + f"attn.{proj}.bias", (HIDDEN,))]
        out += [(p + "ln_2.weight", (HIDDEN,)), (p + "ln_2.bias", (HIDDEN,))]
        out += [(p + "mlp.c_fc.weight", (HIDDEN, FFN)), (p + "mlp.c_fc.bias", (FFN,))]
        out += [(p + "mlp.c_proj.weight", (FFN, HIDDEN)), (p + "mlp.c_proj.bias", (HIDDEN,))]
        return out

    total = lambda: sum(4 * math.prod(s) for _, s in shapes)  # noqa: E731  (fp32)
    i = 0
    while total() < target_bytes:
        for item in layer(i):
            shapes.append(item)
            if total() >= target_bytes:
                break
        i += 1
    shapes += [("transformer.ln_f.weight", (HIDDEN,)), ("transformer.ln_f.bias", (HIDDEN,))]
    return shapes


def ckpt_files(run_dir: Path, n: int, fmt: str = "safetensors") -> list[Path]:
    if fmt == "pt":  # nanoGPT-style names
        return [run_dir / f"ckpt_{100 * k:06d}.pt" for k in range(1, n + 1)]
    return [run_dir / f"model_step{100 * k}.safetensors" for k in range(1, n + 1)]


def format_workdir(workdir: Path, fmt: str) -> Path:
    """Where a format's run, manifest and profiles live: WORKDIR itself for safetensors (as before), WORKDIR/pt."""
    return workdir if fmt == "safetensors" else workdir / fmt


def _want(fmt: str, n: int, size_mb: int, seed: int) -> dict:
    want = {"format": FORMAT_VERSION, "checkpoints": n, "size_mb": size_mb, "seed": seed}
    if fmt != "safetensors":  # safetensors manifests keep their old shape, so existing caches stay valid
        want["file_format"] = fmt
    return want


def _manifest_ok(workdir: Path, files: list[Path], want: dict) -> bool:
    try:
        manifest = json.loads((workdir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    sizes = manifest.get("sizes", {})
    return (
        manifest.get("params") == want
        and all(f.is_file() and f.stat().st_size == sizes.get(f.name) for f in files)
        # nothing else in the run directory: a stray file could change the layout ckptforce detects
        and sorted(p.name for p in (workdir / "run").iterdir()) == sorted(f.name for f in files)
    )


def ensure_run(workdir: Path, n: int, size_mb: int, seed: int, fmt: str = "safetensors") -> list[Path]:
    """Reuse the synthetic run when its files are intact, else build it in a subprocess.

    The build holds ~3 checkpoints in memory; doing it in this (driver) process would raise the driver's peak
    RSS, and on Linux a child's ru_maxrss starts from its parent's peak (it is carried across fork/exec), which
    would swamp every worker's measurement. So the driver never imports torch.
    """
    files = ckpt_files(workdir / "run", n, fmt)
    want = _want(fmt, n, size_mb, seed)
    if _manifest_ok(workdir, files, want):
        print(f"[setup] reusing the synthetic run in {workdir / 'run'} ({n} files)", flush=True)
        return files
    print(f"[setup] building {n} {fmt} checkpoints of ~{size_mb} MiB in {workdir / 'run'} (seed {seed})", flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "build", "--workdir", str(workdir),
           "--checkpoints", str(n), "--size-mb", str(size_mb), "--seed", str(seed), "--format", fmt]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not _manifest_ok(workdir, files, want):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"building the synthetic run failed (exit {proc.returncode})")
    print(f"[setup] built in {time.perf_counter() - t0:.1f} s", flush=True)
    return files


def build_run(workdir: Path, n: int, size_mb: int, seed: int, fmt: str = "safetensors") -> None:
    """Write the synthetic run and its manifest (runs in the ``build`` worker).

    ``workdir`` is the format's own folder (``format_workdir``). The tensors are the same for both formats.
    """
    import torch
    from safetensors.torch import save_file

    run_dir = workdir / "run"
    files = ckpt_files(run_dir, n, fmt)
    want = _want(fmt, n, size_mb, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (workdir / "manifest.json").unlink(missing_ok=True)
    for stale in run_dir.iterdir():  # only this benchmark writes here (bench/out is git-ignored)
        if stale.is_file():
            stale.unlink()
    shapes = model_shapes(size_mb * MIB)
    g = torch.Generator().manual_seed(seed)
    theta: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if len(shape) == 1:  # LayerNorm weights near 1, biases near 0
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            theta[name] = base + 0.02 * torch.randn(shape, generator=g)
        else:
            theta[name] = 0.02 * torch.randn(shape, generator=g)
    momentum: dict[str, torch.Tensor] = {}
    for k, path in enumerate(files):
        if k > 0:
            # θ_k = θ_{k−1} + Δ_k, Δ_k = 0.6 Δ_{k−1} + noise: non-trivial norms and cosines. Rare-token rows of
            # the embedding get no update (exact zeros, so zero_frac is non-trivial too).
            for name, t in theta.items():
                noise = 1e-3 * torch.randn(t.shape, generator=g)
                d = noise if name not in momentum else momentum[name].mul_(0.6).add_(noise)
                if name == "transformer.wte.weight":
                    d[VOCAB * 3 // 4 :] = 0
                momentum[name] = d
                t.add_(d)
        tmp = path.with_name(path.name + ".partial")
        if fmt == "pt":  # nanoGPT's layout (its checkpoints also hold optimizer/model_args; not needed here)
            torch.save({"model": theta, "iter_num": 100 * (k + 1)}, str(tmp))
        else:
            save_file(theta, str(tmp), metadata={"format": "pt", "step": str(100 * (k + 1))})
        tmp.replace(path)
    manifest = {"params": want, "sizes": {f.name: f.stat().st_size for f in files}, "tensors": len(shapes)}
    (workdir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def warm_page_cache(files: list[Path]) -> float:
    """Read every file once (so both methods read from the page cache); returns seconds."""
    t0 = time.perf_counter()
    buf = bytearray(16 * MIB)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------
# the worker (runs in a fresh subprocess)




def _imports():
    """The same imports for every worker, so the import-only baseline is comparable."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import ckptforce
    from ckptforce import open_run, update_anatomy  # the lazy __getattr__ pulls in ckptforce.io and .updates
    from ckptforce.updates import delta_stats

    return ckptforce, open_run, update_anatomy, delta_stats


def _step_of(path: Path) -> int:
    return int(re.search(r"(?:step|ckpt_)(\d+)", path.name).group(1))


def _streaming(run_dir: Path, open_run, update_anatomy, delta_stats):
    run = open_run(run_dir)
    anatomy = update_anatomy(run, optimizer=False)
    return [s for iv in anatomy.intervals for s in iv.tensors.values()], len(anatomy.intervals), run.layout


def _wholefile(run_dir: Path, open_run, update_anatomy, delta_stats):
    from safetensors.torch import load_file

    files = sorted(run_dir.glob("*.safetensors"), key=_step_of)
    return *_pairwise(files, lambda f: load_file(str(f)), delta_stats), "whole-file load_file"


def _wholefile_pt(run_dir: Path, open_run, update_anatomy, delta_stats):
    import torch

    files = sorted(run_dir.glob("*.pt"), key=_step_of)
    load = lambda f: torch.load(f, map_location="cpu", weights_only=True)["model"]  # noqa: E731  (no mmap)
    return *_pairwise(files, load, delta_stats), "whole-file torch.load"


def _pairwise(files: list[Path], load, delta_stats):
    """Load both files of each consecutive pair whole, then ``delta_stats`` per tensor."""
    stats = []
    prev = None  # previous interval's {name: delta}
    for a, b in zip(files, files[1:]):
        before = load(a)
        after = load(b)
        deltas = {}
        for name, t in before.items():
            s, d = delta_stats(t, after[name], None if prev is None else prev[name])
            stats.append(s)
            deltas[name] = d
        prev = deltas
        del before, after
    return stats, len(files) - 1


METHODS = {"streaming": _streaming, "wholefile": _wholefile}  # --format safetensors
METHODS_PT = {"streaming": _streaming, "wholefile": _wholefile_pt}  # --format pt


def _checksums(stats) -> dict[str, float]:
    finite = lambda x: x if math.isfinite(x) else 0.0  # noqa: E731  (cos/dot are NaN on the first interval)
    return {
        "sum_update_norm": math.fsum(s.update_norm for s in stats),
        "sum_param_norm": math.fsum(s.param_norm for s in stats),
        "sum_dot_prev": math.fsum(finite(s.dot_prev) for s in stats),
        "sum_update_cos": math.fsum(finite(s.update_cos) for s in stats),
        "sum_zero_frac": math.fsum(s.zero_frac for s in stats),
        "nonfinite": float(sum(s.nonfinite for s in stats)),
        "stats": float(len(stats)),
    }


def worker(method: str, run_dir: Path, profile_out: str | None, fmt: str = "safetensors") -> None:
    t_imp = time.perf_counter()
    mods = _imports()
    import torch

    out = {
        "method": method,
        "format": fmt,
        "import_s": time.perf_counter() - t_imp,
        "maxrss_after_import_kib": maxrss_kib(),
        "torch_threads": torch.get_num_threads(),
    }
    if method != "import":
        fn = (METHODS_PT if fmt == "pt" else METHODS)[method]
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        if profile_out:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            t0 = time.perf_counter()
            stats, intervals, layout = prof.runcall(fn, run_dir, *mods[1:])
            wall = time.perf_counter() - t0
            prof.dump_stats(profile_out + ".prof")
            text = io.StringIO()
            p = pstats.Stats(prof, stream=text).strip_dirs()
            p.sort_stats("tottime").print_stats(18)
            p.sort_stats("cumulative").print_stats(25)
            Path(profile_out + ".txt").write_text(text.getvalue())
        else:
            t0 = time.perf_counter()
            stats, intervals, layout = fn(run_dir, *mods[1:])
            wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        out.update(
            wall_s=wall,
            user_s=ru1.ru_utime - ru0.ru_utime,
            sys_s=ru1.ru_stime - ru0.ru_stime,
            minflt=ru1.ru_minflt - ru0.ru_minflt,
            majflt=ru1.ru_majflt - ru0.ru_majflt,
            intervals=intervals,
            layout=layout,
            checksums=_checksums(stats),
        )
    out["maxrss_kib"] = maxrss_kib()
    out["vmhwm_kib"] = vmhwm_kib()
    print(MARKER + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------------------------
# the driver


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_worker(method: str, run_dir: Path, profile_out: Path | None = None, fmt: str = "safetensors") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--workdir", str(run_dir.parent),
           "--format", fmt]  # fmt: skip
    if profile_out is not None:
        cmd += ["--profile-out", str(profile_out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {method!r} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARKER) :])


def check_agree(a: dict, b: dict, rel: float = 1e-5) -> list[str]:
    bad = []
    for key in a:
        x, y = a[key], b[key]
        if not math.isclose(x, y, rel_tol=rel, abs_tol=1e-12):
            bad.append(f"{key}: streaming {x!r} vs whole-file {y!r}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/updates.py",
        description=(
            "Throughput and peak memory of ckptforce's streamed Δθ statistics (update_anatomy) against the naive "
            "way (safetensors.torch.load_file, or torch.load(weights_only=True) with --format pt, of both whole "
            "files per consecutive pair, then the same delta_stats per tensor). Builds a seeded synthetic fp32 "
            "GPT-2-like run once, warms the page cache, then runs "
            "each method --repeat times, each run in a fresh subprocess, and reports the best time and the peak "
            "RSS (raw and above an import-only subprocess)."
        ),
        epilog=(
            "Throughput = (checkpoints − 1) × 2 × file size / best wall time, for both methods (GB = 1e9 B). "
            "Peak RSS = ru_maxrss of the worker process. Goals: throughput ratio ≥ 0.9, RSS ratio ≤ 0.3."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--format", choices=FORMATS, default="safetensors", dest="fmt",
        help="checkpoint files of the synthetic run: model_step{N}.safetensors, or nanoGPT-style torch.save dicts "
        "{'model': state_dict, 'iter_num': N} in ckpt_{N:06d}.pt (kept under WORKDIR/pt); the baseline loads them "
        "with load_file or torch.load respectively",
    )  # fmt: skip
    ap.add_argument("--checkpoints", type=int, default=3, metavar="N", help="number of checkpoints (N − 1 intervals)")
    ap.add_argument("--size-mb", type=int, default=256, metavar="MB", help="size of each checkpoint in MiB (≥ 200 advised)")
    ap.add_argument("--repeat", type=int, default=3, metavar="R", help="runs per method; the best time is reported")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic run")
    ap.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR,
        help="where the synthetic run (WORKDIR/run; WORKDIR/pt/run with --format pt), its manifest and profiles "
        "are kept; rebuilt only when stale",
    )  # fmt: skip
    ap.add_argument(
        "--profile", action="store_true",
        help="after the timed runs, run each method once more under cProfile (in its subprocess) and print the top "
        "functions; stats are saved as WORKDIR/profile_<method>.prof/.txt (profiled runs are not timed)",
    )  # fmt: skip
    ap.add_argument("--worker", choices=["streaming", "wholefile", "import", "build"], help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    workdir = args.workdir if args.workdir.is_absolute() else (Path.cwd() / args.workdir)
    fmt = args.fmt
    if args.worker == "build":  # workers are handed the format's own folder
        build_run(workdir, args.checkpoints, args.size_mb, args.seed, fmt)
        return 0
    if args.worker:
        worker(args.worker, workdir / "run", args.profile_out, fmt)
        return 0
    workdir = format_workdir(workdir, fmt)
    baseline = BASELINE_NAME[fmt]
    if args.checkpoints < 2:
        ap.error("--checkpoints must be at least 2 (one interval)")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    t_start = time.perf_counter()
    files = ensure_run(workdir, args.checkpoints, args.size_mb, args.seed, fmt)
    run_dir = workdir / "run"
    file_bytes = [f.stat().st_size for f in files]
    size = file_bytes[0]
    intervals = args.checkpoints - 1
    covered = sum(file_bytes[k] + file_bytes[k + 1] for k in range(intervals))  # 2 × file size per interval
    warm = warm_page_cache(files)
    driver_kib = maxrss_kib()
    print(
        f"[setup] page cache warmed: read all {len(files)} files ({sum(file_bytes) / MIB:.0f} MiB) once in {warm:.2f} s; "
        "both methods are measured reading from the page cache",
        flush=True,
    )
    print(
        f"[setup] {fmt} files, {intervals} intervals, {covered / 1e9:.3f} GB covered per run "
        f"(2 × {size / MIB:.1f} MiB per interval); whole-file baseline: {baseline}; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    imports = [run_worker("import", run_dir, fmt=fmt) for _ in range(args.repeat)]
    base_kib = min(r["maxrss_kib"] for r in imports)
    print(
        f"[import] torch+safetensors+ckptforce only: peak RSS {base_kib / 1024:.0f} MiB (min of {len(imports)}; "
        f"VmHWM {min(r['vmhwm_kib'] for r in imports) / 1024:.0f} MiB), torch threads {imports[0]['torch_threads']}; "
        f"driver peak RSS {driver_kib / 1024:.0f} MiB (a child's ru_maxrss starts from it)",
        flush=True,
    )

    runs: dict[str, list[dict]] = {"streaming": [], "wholefile": []}
    for r in range(args.repeat):
        for method in ("streaming", "wholefile") if r % 2 == 0 else ("wholefile", "streaming"):  # interleaved
            res = run_worker(method, run_dir, fmt=fmt)
            runs[method].append(res)
            print(
                f"[run {r + 1}/{args.repeat}] {method:9s} wall {res['wall_s']:6.3f} s  user {res['user_s']:6.2f} s  "
                f"sys {res['sys_s']:5.2f} s  minflt {res['minflt']:8d}  majflt {res['majflt']:4d}  "
                f"peak RSS {res['maxrss_kib'] / 1024:5.0f} MiB (VmHWM {res['vmhwm_kib'] / 1024:.0f}, "
                f"after import {res['maxrss_after_import_kib'] / 1024:.0f})",
                flush=True,
            )

    s_sum, w_sum = runs["streaming"][0]["checksums"], runs["wholefile"][0]["checksums"]
    detected = {r["layout"] for r in runs["streaming"]}
    if detected != {LAYOUT_OF[fmt]}:
        raise SystemExit(f"ckptforce read the {fmt} run as layout {sorted(detected)}, expected {LAYOUT_OF[fmt]!r}")
    for method, rs in runs.items():  # each method agrees with itself across repeats
        for other in rs[1:]:
            bad = check_agree(rs[0]["checksums"], other["checksums"], rel=1e-9)
            if bad:
                raise SystemExit(f"{method} is not deterministic across repeats: {'; '.join(bad)}")
    bad = check_agree(s_sum, w_sum)
    if bad or runs["streaming"][0]["intervals"] != runs["wholefile"][0]["intervals"]:
        raise SystemExit("streaming and whole-file disagree (rel 1e-5): " + "; ".join(bad or ["interval counts differ"]))
    print(
        f"[check] both methods agree to rel 1e-5: {int(s_sum['stats'])} tensor-interval statistics, "
        f"Σ‖Δθ‖ = {s_sum['sum_update_norm']:.6f} (whole-file {w_sum['sum_update_norm']:.6f}), "
        f"Σ‖θ‖ = {s_sum['sum_param_norm']:.4f}, Σcos = {s_sum['sum_update_cos']:.4f}, Σzero_frac = {s_sum['sum_zero_frac']:.4f}; "
        f"ckptforce detected layout {LAYOUT_OF[fmt]!r}",
        flush=True,
    )

    if args.profile:
        for method in ("streaming", "wholefile"):
            out = workdir / f"profile_{method}"
            res = run_worker(method, run_dir, profile_out=out, fmt=fmt)
            print(f"\n[profile] {method}: wall {res['wall_s']:.3f} s under cProfile; full stats in {out}.prof / {out}.txt")
            print(Path(str(out) + ".txt").read_text())

    best = {m: min(r["wall_s"] for r in rs) for m, rs in runs.items()}
    for m, rs in runs.items():
        worst = max(r["wall_s"] for r in rs)
        if worst > 1.5 * best[m]:
            print(
                f"[warn] {m}: wall times range {best[m]:.2f}–{worst:.2f} s; something else is using the CPUs "
                f"(load average now {os.getloadavg()[0]:.2f}) — the best of {len(rs)} is reported, rerun if in doubt"
            )
    rss = {m: statistics.median(r["maxrss_kib"] for r in rs) for m, rs in runs.items()}
    above = {m: (rss[m] - base_kib) / 1024 for m in runs}
    gbps = {m: covered / best[m] / 1e9 for m in runs}
    print(
        f"\n[summary] best of {args.repeat}: streaming {best['streaming']:.3f} s, whole-file {best['wholefile']:.3f} s; "
        f"peak RSS (median) raw: streaming {rss['streaming'] / 1024:.0f} MiB, whole-file {rss['wholefile'] / 1024:.0f} MiB, "
        f"import-only {base_kib / 1024:.0f} MiB; raw ratio {rss['streaming'] / rss['wholefile']:.2f}; "
        f"total bench time {time.perf_counter() - t_start:.0f} s"
    )
    print(
        f"streaming Δθ: {gbps['streaming']:.2f} GB/s  whole-file {baseline}: {gbps['wholefile']:.2f} GB/s  "
        f"throughput ratio (streaming / whole-file): {gbps['streaming'] / gbps['wholefile']:.2f}  (goal ≥ 0.9)"
    )
    ratio = above["streaming"] / above["wholefile"] if above["wholefile"] > 0 else math.nan
    print(
        f"peak RSS above import: streaming {above['streaming']:.0f} MiB, whole-file {above['wholefile']:.0f} MiB, "
        f"ratio A/B = {ratio:.2f}  (goal ≤ 0.3); checkpoint size {size / MIB:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
