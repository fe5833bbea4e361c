"""forces/batched.head_forces against brute force (float64): a streamed LM head with a bias, tied to the input
embedding or not, under an elementwise P, in vocabulary chunks, with the probe rows' π kept or recomputed.

The oracle forms every probe row's gradient of log π(y_b) (and of log π(y*_b)) with respect to W and b by
autograd on the full logits, every direction's step V_d = P ⊙ Σ_{r ∈ d} a_r ∇ log π(y_r), and their inner product."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ckptforce.forces.batched import head_forces
from ckptforce.forces.factored import capture, owners
from ckptforce.forces.head import SplitLM, head_probs

V, H = 37, 6


class Tiny(nn.Module):
    def __init__(self, *, tied: bool):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=True)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids, hidden_only=False):
        h = torch.tanh(self.mix(self.emb(ids))).cumsum(1)  # every position reads the earlier ones
        return h if hidden_only else self.head(h)


class Rows:
    def __init__(self, ids, mask):
        self.input_ids, self.target_mask = ids, mask
        self.targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)

    def select(self, i):
        return Rows(self.input_ids[i], self.target_mask[i])

    def __len__(self):
        return len(self.input_ids)


def _rows(n, t, gen):
    ids = torch.randint(0, V, (n, t), generator=gen)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        mask[i, 1 + i % 3 : t - 1 - i % 2] = True  # responses of different lengths
    return Rows(ids, mask)


def _scores(module, params, rows, star_ids=None):
    """(B,) Σ_t log π(y_t) at the response positions (of ``star_ids`` instead of the targets when given)."""
    logp = torch.log_softmax(functional_call(module, params, (rows.input_ids,)), -1)
    ys = rows.targets if star_ids is None else star_ids
    return (logp.gather(-1, ys.unsqueeze(-1)).squeeze(-1) * rows.target_mask).sum(-1)


@pytest.mark.parametrize("tied,with_bias", [(True, True), (False, True), (True, False)])
def test_head_forces_equal_brute_force(tied, with_bias):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    module = Tiny(tied=tied).double()
    params = {n: p.detach() for n, p in module.named_parameters()}
    w_name = "emb.weight" if tied else "head.weight"
    probes, train = _rows(5, 7, gen), _rows(6, 6, gen)
    direction = torch.tensor([0, 1, 0, 2, 1, 2])  # training row r adds to direction[r]
    factor = torch.randn(6, generator=gen, dtype=torch.float64)
    scale = {w_name: torch.rand(V, H, generator=gen, dtype=torch.float64), "head.bias": torch.rand(V, generator=gen, dtype=torch.float64)}

    names = [w_name, "head.bias"] if with_bias else [w_name]  # without: b frozen (it still shapes π)
    found = owners(module, params, names)
    emb = next(i for i, (m, own, _) in enumerate(found) if isinstance(m, nn.Embedding) and own) if tied else None
    hidden = lambda p, rows: functional_call(module, p, (rows.input_ids,), {"hidden_only": True})  # noqa: E731
    for positions, vocab, keep, elements in ((None, None, True, 10**6), (4, 5, False, 150)):
        fn = SplitLM(lambda p, rows: functional_call(module, p, (rows.input_ids,)), hidden, w_name, "head.bias", positions=positions, vocab=vocab)
        probe = capture(fn, found, params, probes)
        tr = capture(fn, found, params, train, star=False)
        if keep:
            lm, h, _, _, st = probe.head
            probe.probs = head_probs(h, params[w_name], params["head.bias"], st.lse)
        c, c_star, covered = head_forces(probe, tr, params, direction, factor, 3, scale, embedding=None if emb is None else (emb, emb),
                                         bias=with_bias, elements=elements)  # fmt: skip
        assert covered == set(names)

        leaves = {n: p.clone().requires_grad_(n in names) for n, p in params.items()}
        star_ids = functional_call(module, params, (probes.input_ids,)).argmax(-1)
        grads = {key: [torch.autograd.grad(_scores(module, leaves, probes, ids)[b], [leaves[n] for n in names]) for b in range(len(probes))]
                 for key, ids in (("y", None), ("star", star_ids))}  # fmt: skip
        steps = [[torch.zeros_like(params[n]) for n in names] for _ in range(3)]
        for r in range(len(train)):
            g = torch.autograd.grad(_scores(module, leaves, train)[r], [leaves[n] for n in names])
            for k, n in enumerate(names):
                steps[int(direction[r])][k] += float(factor[r]) * g[k] * scale[n]
        for got, key in ((c, "y"), (c_star, "star")):
            want = torch.tensor([[sum(float((gb * s).sum()) for gb, s in zip(grads[key][b], steps[d])) for d in range(3)] for b in range(len(probes))],
                                dtype=torch.float64)  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
        assert float(c.abs().min()) > 0

