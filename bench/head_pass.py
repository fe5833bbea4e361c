"""The streamed LM head's passes in a factored split: ∂ log π/∂h (the capture's backward) and δ log π along the
interval's δW (the head's column), as two passes over positions × vocabulary against one pass that takes both.

The head of ``--model llama-143m`` in bench/scale.py by default (a 128k vocabulary, hidden 512), random h, W and δW,
the chunks of positions × vocabulary that ``analyze`` would choose at the default memory budget. Prints each pass's
seconds (best of ``--repeat``), the ratio of the two passes to the one, the largest difference of their outputs,
and the peak RSS of the process.

    python bench/head_pass.py                       # N = 6,144 positions (12 rows × 512 tokens), V = 128,256, H = 512
    python bench/head_pass.py --vocab 50257 --hidden 768   # GPT-2 small's head
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from ckptforce.budget import default_memory_gb, head_chunks, rows_budget
from ckptforce.forces.head import head_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--positions", type=int, default=6144, help="response positions N (default: 12 rows × 512 tokens)")
    ap.add_argument("--parameters", type=int, default=143_000_000, help="the model's size, for the budget's chunks")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.vocab, args.hidden, generator=g) * 0.02
    dw = torch.randn(args.vocab, args.hidden, generator=g) * 1e-4
    h = torch.randn(args.positions, args.hidden, generator=g)
    y = torch.randint(0, args.vocab, (args.positions,), generator=g)
    positions, vocab = head_chunks(rows_budget(default_memory_gb("cpu"), parameters=args.parameters), vocab=args.vocab)
    chunks = {"positions": positions, "vocab": vocab}

    def best(**kw):
        times, out = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = head_stats(h, w, None, y, **chunks, **kw)
            times.append(time.perf_counter() - t0)
        return min(times), out

    t_grad, grad = best(grad=True)
    t_tan, tan = best(tangent=(None, dw, None))
    t_both, both = best(grad=True, tangent=(None, dw, None))
    diff = max(float((both.grad - grad.grad).abs().max()), float((both.dlogp - tan.dlogp).abs().max()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[head] N = {args.positions} positions, V = {args.vocab}, H = {args.hidden}; chunks of {positions} positions × {vocab}")
    print(f"[two passes]  ∂ log π/∂h {t_grad:.1f} s + δ log π along δW {t_tan:.1f} s = {t_grad + t_tan:.1f} s")
    print(f"[one pass]  {t_both:.1f} s: {(t_grad + t_tan) / t_both:.2f}× faster; outputs equal to {diff:.1e}; peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
