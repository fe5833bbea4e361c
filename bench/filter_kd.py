"""Filter-KD on the digits sample run (20 % flipped labels): a fresh student distilled on the soft targets that
``ckptforce export filter-kd`` writes, against the same student trained on the noisy labels, on the clean test labels.

The claim (Ren et al., ICLR 2022, "Better supervisory signals by observing learning paths"): the EMA of a network's
own predictions along its training path is a better target than the noisy labels it was trained on.

Steps, from the repository root, everything through ckptforce's command line as a user would run it:

    1. the digits sample run (``sample_runs.recipes.ensure("digits")``; trained once, cached)
    2. ckptforce analyze RUN/noisy --probes RUN/train_noisy.npz --model sample_runs.recipes.digits:model
                         --nodes 0 --no-by-tensor -o OUT/train.h5       (every training example is a probe; ~1.5 min)
    3. ckptforce export filter-kd OUT/train.h5 -o OUT/targets-A.npz --alpha A          for each --alpha
    4. students: the recipe's MLP from a fresh seeded init, the noisy run's settings (Adam lr 3e-3, 40 epochs,
       batch 32), a plain loop on one thread; cross-entropy against (a) the noisy labels, (b) the Filter-KD targets
       of each α, (c) α = 0: the teacher's last predictions (plain self-distillation), (d) the clean labels (a
       ceiling); --seeds students each.

Prints, per target: clean-test accuracy (mean ± sd over seeds) and the share of the flipped training examples the
student puts on their true class. Nothing is asserted: the numbers are the result.

    python bench/filter_kd.py                      # ~2 min on 2 cores the first time (the analysis), ~1 min after
    python bench/filter_kd.py --alpha 0.95 --alpha 0.8 --seeds 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def ckptforce(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ckptforce.cli", *args], check=True, cwd=REPO)


def train_student(x, target, epochs: int, lr: float, batch: int, seed: int, hidden: int):
    """The recipe's DigitsMLP trained with Adam on ``target``: (N,) labels or (N, V) soft targets."""
    import torch

    from sample_runs.recipes.digits import DigitsMLP

    torch.manual_seed(seed)
    net = DigitsMLP(hidden, 10)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x = torch.from_numpy(x)
    soft = target.ndim == 2
    t = torch.from_numpy(target.astype(np.float32) if soft else target.astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            logits = net(x[idx])  # (B, 10)
            loss = -(t[idx] * logits.log_softmax(-1)).sum(-1).mean() if soft else torch.nn.functional.cross_entropy(logits, t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def predict(net, x) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(x)).argmax(-1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, action="append", help="EMA α of the export (repeatable; default 0.95 and 0.8)")
    ap.add_argument("--seeds", type=int, default=3, help="students per target (seeds 0..N-1)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "filter_kd", help="where the cube and targets go")
    args = ap.parse_args()
    alphas = args.alpha or [0.95, 0.8]

    import torch

    from sample_runs.recipes import ensure
    from sample_runs.recipes.digits import CONFIG, dataset

    torch.set_num_threads(1)
    run = ensure("digits")
    args.out.mkdir(parents=True, exist_ok=True)
    cube_path = args.out / "train.h5"
    t0 = time.perf_counter()
    if not cube_path.is_file():
        ckptforce("analyze", str(run / "noisy"), "--probes", str(run / "train_noisy.npz"), "--model", "sample_runs.recipes.digits:model",
                  "--nodes", "0", "--no-by-tensor", "-q", "-o", str(cube_path))  # fmt: skip
    print(f"cube: {cube_path} ({time.perf_counter() - t0:.0f} s)")
    d = dataset(CONFIG)
    targets = {"noisy labels": d["y_noisy"], "clean labels (ceiling)": d["y_train"]}
    for alpha in [*alphas, 0.0]:
        path = args.out / f"targets-{alpha}.npz"
        ckptforce("export", "filter-kd", str(cube_path), "-o", str(path), "--alpha", str(alpha))
        with np.load(path) as z:
            order = {i: k for k, i in enumerate(z["ids"])}
            soft = z["targets"][[order[i] for i in d["ids_train"]]]  # the export's rows in the training order
        name = f"Filter-KD α = {alpha}" if alpha else "teacher's last predictions (α = 0)"
        targets[name] = soft
        agree = float((soft.argmax(1) == d["y_train"])[d["flipped"]].mean())
        print(f"  {name}: argmax on the true class for {agree:.1%} of the flipped examples")

    print(f"\nstudents: DigitsMLP({CONFIG.hidden}), Adam lr {CONFIG.noisy_lr}, {CONFIG.noisy_epochs} epochs, batch {CONFIG.batch}, "
          f"{args.seeds} seeds; {int(d['flipped'].sum())} of {len(d['flipped'])} training labels flipped; {len(d['y_test'])} clean test examples")  # fmt: skip
    print(f"{'target':40s} {'clean-test accuracy':>22s} {'flipped fixed':>15s}")
    for name, target in targets.items():
        acc, fixed = [], []
        for seed in range(args.seeds):
            net = train_student(d["x_train"], target, CONFIG.noisy_epochs, CONFIG.noisy_lr, CONFIG.batch, seed, CONFIG.hidden)
            acc.append(float((predict(net, d["x_test"]) == d["y_test"]).mean()))
            fixed.append(float((predict(net, d["x_train"][d["flipped"]]) == d["y_train"][d["flipped"]]).mean()))
        print(f"{name:40s} {np.mean(acc):>14.2%} ± {np.std(acc):.2%} {np.mean(fixed):>15.1%}")


if __name__ == "__main__":
    main()
