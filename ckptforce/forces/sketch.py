"""Kronecker sketches of per-row gradients from their ghost factors, for ``--forces approximate --force-projection K``
(the factored projection of LoGra: Choe et al. 2024, "What is your data worth to GPT?").

For a matrix W (R, C) whose per-row gradient is G_b = Σ_t u_bt v_btᵀ (ghost.py, in W's own layout), two seeded
maps S (K, R) and T (K, C) with independent N(0, 1/K) entries, so that E[SᵀS] = I and E[TᵀT] = I, give

    sk(G_b) = S G_b Tᵀ = Σ_t (S u_bt)(T v_bt)ᵀ                 (K, K), without forming G_b (R·C numbers)
    E[⟨sk(G_i), sk(G_j)⟩] = tr(G_iᵀ E[SᵀS] G_j E[TᵀT]) = ⟨G_i, G_j⟩  (unbiased)

An embedding's u is one-hot (ids): S u = S[:, id]. Vectors (biases, norms) and tensors of at most K² numbers are
kept exactly; a dense per-row gradient (B, R·C) of a larger matrix is sketched the same way as its factors
would be, and a larger tensor of another shape by a CountSketch to K². The maps depend only on the tensor's name,
its shape, K and the seed, so probe and training rows land in the same K² coordinates per tensor, and the forces
become one (probe rows, D) × (D, training rows) product.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from .ghost import RowGrads, materialise


class KronSketch:
    """Seeded Kronecker maps of dimension ``dim`` per tensor (cached), and ``rows(grads) -> (B, D)``."""

    def __init__(self, dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError(f"KronSketch(dim={dim}): need dim ≥ 1")
        self.dim, self.seed = dim, seed
        self._maps: dict[tuple, Tensor] = {}

    def _map(self, name: str, side: str, size: int, like: Tensor) -> Tensor:
        """(K, size) with N(0, 1/K) entries, drawn from the name, the side ("rows" / "cols") and the seed."""
        key = (name, side, size, like.dtype, like.device)
        if key not in self._maps:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{name}:{side}".encode()))
            self._maps[key] = (torch.randn(self.dim, size, generator=gen, dtype=torch.float64) / math.sqrt(self.dim)).to(like)
        return self._maps[key]

    def kept(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor is kept exactly: a vector, or at most K² numbers."""
        return len(shape) < 2 or math.prod(shape) <= self.dim**2

    def width(self, shape: tuple[int, ...]) -> int:
        """Columns of one tensor in the sketch: its size when kept, else K²."""
        return math.prod(shape) if self.kept(shape) else self.dim**2

    def rows(self, grads: RowGrads) -> Tensor:
        """(B, D): every tensor of ``grads.shapes`` (in sorted order) kept or sketched, D = Σ ``width``."""
        return torch.cat([self.tensor(grads, name) for name in sorted(grads.shapes)], 1)

    def tensor(self, grads: RowGrads, name: str) -> Tensor:
        """(B, width) for one tensor: exact when small, else S G Tᵀ from its factors (or its dense rows)."""
        shape = grads.shapes[name]
        if name not in grads.factors and name not in grads.dense:  # the tensor never reached the scores
            return torch.zeros(grads.n, self.width(shape), dtype=grads.dtype, device=grads.device)
        if self.kept(shape):
            return grads.dense[name] if name in grads.dense else materialise(grads, name)
        if len(shape) != 2:  # a larger tensor of another shape (a convolution's kernel): CountSketch of its rows
            from .kernels import Projection, _project

            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            rows = grads.dense[name] if name in grads.dense else materialise(grads, name)
            return _project(rows, Projection(self.dim**2, self.seed), gen)
        if name in grads.dense:  # (B, R·C) -> S G Tᵀ
            g = grads.dense[name].reshape(-1, *shape)
            s, t = self._map(name, "rows", shape[0], g), self._map(name, "cols", shape[1], g)
            return torch.einsum("kr,brc,lc->bkl", s, g, t).flatten(1)
        out = torch.zeros(grads.n, self.width(shape), dtype=grads.dtype, device=grads.device)
        for u, v in grads.factors[name]:  # a matrix's uses all have columns (a bias is 1-D)
            s, t = self._map(name, "rows", shape[0], v), self._map(name, "cols", shape[1], v)
            su = s.T[u] if not u.is_floating_point() else u @ s.T  # (B, T, K): S u_t (an embedding: S[:, id_t])
            out += torch.einsum("btk,btl->bkl", su, v @ t.T).flatten(1)  # Σ_t (S u_t)(T v_t)ᵀ
        return out
