"""End-to-end `ckptforce analyze`: serial against `--workers 2`, and peak memory against checkpoint size.

Builds (once, cached) a real Hugging Face Trainer run of a small GPT-2 with many checkpoints, writes a probe
file of token ids, then runs the installed CLI as a user would:

    ckptforce analyze RUN --probes P -o serial.h5
    ckptforce analyze RUN --probes P -o workers.h5 --workers N

Wall time is measured around each command; peak memory is the largest sum of RSS over the whole process
tree (the CLI and, with --workers, the Dask scheduler, nanny and worker processes), sampled every 20 ms with
psutil. The two cubes must agree (rel 1e-5) or the script fails.

    python bench/pipeline.py                 # 9 checkpoints (8 intervals), ~2-4 minutes on 2 cores
    python bench/pipeline.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_run(root: Path, *, layers: int, embd: int, vocab: int, steps: int, every: int) -> None:
    """A real Trainer run: GPT-2 on random token sequences, a checkpoint every `every` steps (cached)."""
    manifest = root / "bench_manifest.json"
    want = {"layers": layers, "embd": embd, "vocab": vocab, "steps": steps, "every": every}
    if manifest.is_file() and json.loads(manifest.read_text()) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    code = f"""
import os, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed
set_seed(0)
cfg = GPT2Config(n_layer={layers}, n_head=4, n_embd={embd}, n_positions=64, vocab_size={vocab}, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                 bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(cfg)
g = torch.Generator().manual_seed(0)
data = [{{"input_ids": ids, "labels": ids}} for ids in torch.randint(0, {vocab}, (128, 32), generator=g)]
args = TrainingArguments(output_dir="{root}", max_steps={steps}, save_steps={every}, logging_steps=1, learning_rate=1e-3,
                         per_device_train_batch_size=8, use_cpu=True, report_to="none", disable_tqdm=True, save_total_limit=None)
Trainer(model=model, args=args, train_dataset=data).train()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    manifest.write_text(json.dumps(want))


def write_probes(path: Path, *, probes: int, vocab: int) -> None:
    import random

    rng = random.Random(0)

    def ids(k):
        return [rng.randrange(vocab) for _ in range(k)]

    types = ("chosen", "rejected", "other_trained", "random")
    lines = [{"id": f"p{i}", "prompt_ids": ids(12), "responses": {t: ids(rng.randint(4, 12)) for t in types}} for i in range(probes)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS of the process tree in MiB)."""
    import psutil

    peak = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    ps = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    t.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "pipeline", help="where the run and cubes go")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16, help="training steps of the built run")
    ap.add_argument("--every", type=int, default=2, help="a checkpoint every this many steps")
    ap.add_argument("--probes", type=int, default=32, help="probes (4 response types each)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    exe = shutil.which("ckptforce") or sys.exit("install ckptforce first: pip install -e '.[parallel]'")
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.workdir / "run"
    build_run(run, layers=args.layers, embd=args.embd, vocab=args.vocab, steps=args.steps, every=args.every)
    probes = args.workdir / "probes.jsonl"
    write_probes(probes, probes=args.probes, vocab=args.vocab)
    ckpts = sorted(run.glob("checkpoint-*"))
    size = sum(f.stat().st_size for f in (ckpts[0]).glob("model.safetensors")) / 2**20
    print(f"[run] {run}: {len(ckpts)} checkpoints ({len(ckpts) - 1} intervals), model.safetensors {size:.1f} MiB each; "
          f"{args.probes} probes × 4 responses; {os.cpu_count()} cores")  # fmt: skip

    outs = {k: args.workdir / f"{k}.h5" for k in ("serial", "serial1", "workers")}
    for out in outs.values():
        out.unlink(missing_ok=True)
        shutil.rmtree(str(out) + ".parts", ignore_errors=True)
    _, m_import = measure([sys.executable, "-c", "import ckptforce.pipeline, ckptforce.model, transformers, xarray"])
    print(f"[import]  peak RSS {m_import:.0f} MiB (python, torch, transformers, xarray: the floor of any analyze)")
    base = [exe, "analyze", str(run), "--probes", str(probes), "-q"]
    t_serial, m_serial = measure([*base, "-o", str(outs["serial"])])
    print(f"[serial]  {t_serial:.1f} s, peak RSS {m_serial:.0f} MiB")
    t_serial1, _ = measure([*base, "-o", str(outs["serial1"])], env={"OMP_NUM_THREADS": "1"})
    print(f"[serial, 1 thread]  {t_serial1:.1f} s (OMP_NUM_THREADS=1: what one worker has)")
    t_workers, m_workers = measure([*base, "-o", str(outs["workers"]), "--workers", str(args.workers)])
    print(f"[workers] {t_workers:.1f} s, peak RSS {m_workers:.0f} MiB (process tree: client, scheduler, {args.workers} workers)")

    import xarray as xr

    with xr.open_dataset(outs["serial"], engine="h5netcdf") as a, xr.open_dataset(outs["workers"], engine="h5netcdf") as b:
        xr.testing.assert_allclose(a.drop_attrs(deep=False), b.drop_attrs(deep=False), rtol=1e-5, atol=1e-6)
    print("[check] the serial and parallel cubes agree (rel 1e-5)")
    print(f"analyze serial: {t_serial:.1f} s  --workers {args.workers}: {t_workers:.1f} s  speed-up {t_serial / t_workers:.2f}×  (goal ≥ 1.6×)")
    print(f"parallel efficiency: serial on 1 thread {t_serial1:.1f} s / --workers {args.workers} = {t_serial1 / t_workers:.2f}× "
          f"on {os.cpu_count()} cores (the serial run already uses every core through torch's threads)")  # fmt: skip
    print(f"peak RSS: serial {m_serial:.0f} MiB ({m_serial - m_import:.0f} MiB above import = "
          f"{(m_serial - m_import) / size:.1f}× one checkpoint of {size:.1f} MiB), --workers {args.workers} {m_workers:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
