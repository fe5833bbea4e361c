"""The ``--train`` stage of the pipeline: training examples in, per-interval forces on the probes out.

``prepare_training`` reads and tokenises the training-examples file once per worker and evaluates the
reference model (the first checkpoint, or ``--init``) on it where the objective needs one. ``training_part``
then, for interval k, computes at θ_k the weights w of every response (objectives.py), the optimizer's
preconditioner from the states saved at both ends (attribution.py), the force of each example on each probe
row, the momentum and weight-decay terms, what none of them explains, and the G statistics; it returns plain
arrays keyed by cube names, which the pipeline scatters into the part.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import CkptforceError
from .forces.approx import approximate_forces, relative_error
from .forces.observe import chunks
from .budget import batched_elements
from .forces.attribution import ExampleForces, direction_force, example_forces, example_gradient, summed_tokens
from .forces.kernels import Projection, class_forces, gradient_kernel
from .forces.precondition import LoraFactor, lora_preconditioner, preconditioner
from .forces.objectives import DEFAULT_BETA, GRPO_DEFAULT_LOSS, NEEDS_REFERENCE, PREFERENCE, advantages, g_statistics, kd_loss, margin, response_weights
from .forces.objectives import loss as objective_loss
from .probes import TokenBatch, boundary_note, load_tokenizer, make_batch, tokenize
from .sequences import Convention, as_text, is_ids
from .class_probes import CLASS_SUFFIXES, ClassBatch, load_class_probes, make_class_batch
from .displacement import displacement_part
from .lld import completion_width, lld_part
from .names import OWN_RESPONSES
from .train_examples import TrainExample, TrainingSet, infer_objective, load_training_set

#: The full V×V matrices of a classifier are stored when the Jacobians (rows × V × |θ|) and K (P × U × V²) stay
#: under these sizes (entries); bigger runs keep the kernels, and a note says how to get the matrices.
CLASS_JACOBIAN_BUDGET = 50_000_000
CLASS_K_BUDGET = 4_000_000

#: Sources that are not training examples: their forces come from the optimizer state, and what is left.
MOMENTUM, WEIGHT_DECAY = "momentum", "weight_decay"


@dataclass
class PreparedTraining:
    tset: TrainingSet
    batch: TokenBatch  # one row per response of each example
    owners: list[int]  # example index of each row
    n_resp: int  # responses per example (1, 2, or the group size)
    lengths: torch.Tensor  # (U, R) response lengths in tokens
    ref_logp: torch.Tensor | None  # (U, R) log π_ref(y|x), for dpo / ipo
    teacher_logits: torch.Tensor | None  # (rows, T, V) for kd
    batch_size: int | None
    notes: list[str] = field(default_factory=list)
    tokenizer: object = None  # the tokenizer the texts went through (None for ids / arrays)
    token_norm: torch.Tensor | None = None  # (U,) GRPO dapo / bnpo: each group's share of its step's completion tokens
    advantages: torch.Tensor | None = None  # (U, n) GRPO: Â of every completion, scaled as the trainer did (scale_rewards)
    chunk_size: int | None = None  # training rows per forward / backward within the memory budget (set by the pipeline)
    logits_chunk_size: int | None = None  # the same where their full (rows, T, V) logits are formed

    @property
    def sources(self) -> list[str]:
        return [e.id for e in self.tset.examples] + [MOMENTUM, WEIGHT_DECAY]


def focus_rows(batch, response: str):
    """The rows of ``batch`` whose response type is ``response`` (each probe's chosen answer, or its label)."""
    return batch.select([b for b, (_, t) in enumerate(batch.rows) if t == response])


def _trainer_state(run) -> dict:
    for ref in reversed(run.checkpoints):
        folder = ref.path if ref.path.is_dir() else ref.path.parent
        state = folder / "trainer_state.json"
        if state.is_file():
            try:
                return json.loads(state.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
    return {}


def prepare_training(config, run, model, tokenizer, device: str, dtype: torch.dtype, *, convention: Convention = Convention(eos=True)) -> PreparedTraining:
    """Read, tokenize (as the trainer did: ``convention``, TRL's by default) and batch the training examples."""
    state = _trainer_state(run)
    arrays = Path(config.train).suffix in CLASS_SUFFIXES
    if arrays != (model.kind == "classifier"):
        probes = "classification arrays" if model.kind == "classifier" else "a JSONL file of language-model probes"
        raise CkptforceError(f"{config.train}: the probes are {probes}, so the training examples must be "
                             f"{'arrays (.npz with x, y)' if model.kind == 'classifier' else 'JSONL (prompt + completion, …)'} too")  # fmt: skip
    if arrays:
        return _prepare_class_training(config, state, device, dtype)
    tset = load_training_set(config.train, config.objective, record=infer_objective(state.get("log_history", [])), columns=config.columns)
    if tokenizer is None and any(x is not None and not is_ids(x) for e in tset.examples for x in [e.prompt, *e.responses.values()]):
        first = run.checkpoints[-1].path
        tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else None, [first if first.is_dir() else first.parent, run.root])
    tok = tokenize(tset.as_probe_set(), tokenizer, convention=convention, max_length=model.context, vocab_size=model.vocab_size)
    notes_tok = cap_completions(tset, tok) if tset.objective == "grpo" else []
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    roles = list(tset.examples[0].responses)
    if any(list(e.responses) != roles for e in tset.examples):
        raise CkptforceError(f"{tset.path}: examples have different numbers of responses; give every example the same shape")
    rows = [(u, r) for u in range(len(tset)) for r in roles]
    batch = make_batch(tok, rows, pad_id=pad).to(device)
    lengths = batch.target_mask.sum(1).view(len(tset), len(roles)).double().cpu()
    ref_logp = teacher = None
    notes = list(tset.notes) + notes_tok
    if tset.objective in NEEDS_REFERENCE:
        with run.open(run.checkpoints[0]) as ckpt:
            ref_params = model.params_from(ckpt, device=device, dtype=dtype)
        with torch.no_grad():
            logits = model.logits(ref_params, batch)
        if tset.objective == "kd":
            teacher = logits.detach()
        else:
            ref_logp = _row_logp(logits, batch).view(len(tset), len(roles)).double().cpu()
        who = "teacher" if tset.objective == "kd" else "reference model"
        notes.append(f"{who}: the first checkpoint (step {run.checkpoints[0].step}; give the run's start with --init)")
    batch_size = tset.batch_size or state.get("train_batch_size")
    if tset.objective == "grpo" and not tset.batch_size and batch_size:  # the trainer counts completions, we count groups
        batch_size = max(1, batch_size // len(roles))
    if tset.has_steps and not batch_size:
        raise CkptforceError(f"{tset.path}: 'steps' says when each example was used, but the batch size is unknown; "
                             'add a header line {"objective": "...", "batch_size": N}')  # fmt: skip
    if not tset.has_steps:
        notes.append("the training file has no 'steps': each example is counted as used n_steps × batch/U times per interval (uniform sampling)")
    notes += [n for n in [boundary_note(tok, tokenizer, "training examples")] if n]
    token_norm = adv = None
    if tset.objective == "grpo":
        token_norm, more = grpo_token_norm(tset, lengths, batch_size)
        notes += more
        rewards = torch.tensor([e.rewards for e in tset.examples], dtype=torch.float64)
        adv = advantages(rewards, tset.scale_rewards or "group", [e.steps[0] for e in tset.examples] if tset.scale_rewards == "batch" else None)
    return PreparedTraining(tset, batch, [u for u, _ in rows], len(roles), lengths, ref_logp, teacher, batch_size, notes, tokenizer, token_norm, adv)


def cap_completions(tset: TrainingSet, tok) -> list[str]:
    """GRPO completions given as text are scored as the trainer scored them: EOS appended (a completion that ended
    generated it, and TRL scores it), but none beyond ``max_completion_length`` tokens — a completion the trainer
    cut there has no EOS. Token ids are used as they are. Edits ``tok`` in place; returns a note."""
    cap = tset.max_completion_length
    text = [any(isinstance(r, str) for r in e.responses.values()) for e in tset.examples]
    if not any(text):
        return []
    if cap is None:
        return ["GRPO completions given as text are scored with EOS appended (as the trainer scores a completion that ended); "
                "give max_completion_length in the header so that the ones it cut there are scored without it"]  # fmt: skip
    cut = 0
    for i, has_text in enumerate(text):
        for name, value in tset.examples[i].responses.items():
            ids = tok.response_ids[i][name]
            if has_text and isinstance(value, str) and len(ids) > cap:
                tok.response_ids[i][name], cut = ids[:cap], cut + 1
    return [f"{cut} GRPO completion(s) given as text reached max_completion_length {cap}: scored without EOS, as the trainer did"] if cut else []


def grpo_token_norm(tset: TrainingSet, lengths: torch.Tensor, batch_size: int | None) -> tuple[torch.Tensor, list[str]]:
    """N_u (U,) of the token-normalised GRPO losses (dapo / bnpo, objectives.py): the completion tokens of the
    optimizer step that used group u, divided by the groups in that step — exactly the trainer's normaliser when
    the file holds every group of the step ('steps'); without 'steps', the mean group's tokens (uniform sampling)."""
    per_group = lengths.sum(1)  # (U,)
    kind = tset.loss_type or GRPO_DEFAULT_LOSS
    if kind not in ("dapo", "bnpo", "cispo"):
        return per_group, []
    if not tset.has_steps:
        return torch.full_like(per_group, float(per_group.mean())), [
            f"GRPO {kind}: each step's completion tokens are estimated as the mean group's times the groups per step (no 'steps' in the file)"]
    tokens: dict[int, list[float]] = {}
    for u, e in enumerate(tset.examples):
        for s in e.steps:
            tokens.setdefault(s, []).append(float(per_group[u]))
    norm = torch.tensor([sum(sum(tokens[s]) / len(tokens[s]) for s in e.steps) / max(1, len(e.steps)) if e.steps else float(per_group[u])
                         for u, e in enumerate(tset.examples)], dtype=torch.float64)  # fmt: skip
    short = sorted(s for s, v in tokens.items() if batch_size and len(v) < batch_size)
    notes = [f"GRPO {kind}: {len(short)} step(s) have fewer groups in the file than the {batch_size} per step; their token count is "
             "estimated from the groups given"] if short else []  # fmt: skip
    return norm, notes


def _prepare_class_training(config, state: dict, device: str, dtype: torch.dtype) -> PreparedTraining:
    """Classification training examples (arrays, as for class probes): cross-entropy on each label."""
    objective = config.objective or "ce"
    if objective not in ("ce", "sft"):
        raise CkptforceError(f"{config.train}: objective {objective} needs text examples; classification arrays train with ce")
    arrays = load_class_probes(config.train)
    batch = make_class_batch(arrays, dtype=dtype)
    batch = ClassBatch(batch.x, batch.targets, batch.target_mask, [(i, "label") for i in batch.rows]).to(device)
    examples = [TrainExample(uid, None, None, {"label": []}) for uid in arrays.ids]
    tset = TrainingSet(Path(config.train), "ce", examples, objective_source="command line" if config.objective else "examples")
    notes = ["the training file has no 'steps': each example is counted as used n_steps × batch/U times per interval (uniform sampling)"]
    lengths = torch.ones(len(examples), 1, dtype=torch.float64)
    return PreparedTraining(tset, batch, list(range(len(examples))), 1, lengths, None, None, state.get("train_batch_size"), notes)


def _row_logp(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return (logp * batch.target_mask).sum(-1)


def interval_lr(run, k: int) -> float:
    """Mean logged lr over (step_k, step_{k+1}]; else the lr the optimizer state at step_k holds for its next step."""
    a, b = run.checkpoints[k], run.checkpoints[k + 1]
    with run.open(b) as cb:
        logged = [lr for s, lr in cb.lr_log() if a.step < s <= b.step]
        if logged:
            return float(sum(logged) / len(logged))
    with run.open(a) as ca:
        state = ca.optimizer()
    if state is not None and state.groups and "lr" in state.groups[0]:
        return float(state.groups[0]["lr"])
    raise CkptforceError(f"{run.root}: no learning rate for steps {a.step}→{b.step} (no trainer log, no optimizer state); "
                         "the training-example forces need it")  # fmt: skip


def adapter_factors(ckpt, params: dict) -> dict[str, LoraFactor | None] | None:
    """What an adapter checkpoint trains, as ``LoraFactor``s on the device and dtype of ``params`` (None for a
    tensor trained whole); None when the checkpoint is not an adapter."""
    trained = getattr(ckpt, "trained", None)
    if trained is None:
        return None
    like = next(iter(params.values()))
    move = lambda t: t.to(device=like.device, dtype=like.dtype)  # noqa: E731
    return {n: None if f is None else LoraFactor(move(f[0].left), move(f[0].right), f[0].scale, f[1], f[2], f[3]) for n, f in trained().items()}


def clip_factors(log_history: list[dict], max_grad_norm: float, step_from: int, step_to: int) -> tuple[dict[int, float], float, str]:
    """Gradient clipping of the steps in (step_from, step_to]: ({step: min(1, max_grad_norm / grad_norm)} for the
    steps whose pre-clipping ``grad_norm`` the trainer logged, the mean factor for the others, a note).
    ``max_grad_norm`` 0: no clipping (factor 1)."""
    if not max_grad_norm:
        return {}, 1.0, ""
    logged = {int(h["step"]): float(h["grad_norm"]) for h in log_history if "grad_norm" in h and "step" in h and step_from < int(h["step"]) <= step_to}
    factors = {s: min(1.0, max_grad_norm / g) if g > 0 else 1.0 for s, g in logged.items() if math.isfinite(g)}
    if not factors:
        return {}, 1.0, ""
    mean = sum(factors.values()) / len(factors)
    clipped = sum(1 for f in factors.values() if f < 1)
    note = (f"gradient clipping (max_grad_norm {max_grad_norm:g}, the trainer's logged grad_norm): {clipped} of {len(factors)} logged steps "
            f"in {step_from}→{step_to} clipped, mean factor {mean:.3g}") if clipped else ""  # fmt: skip
    return factors, mean, note


def _coefficients(pt: PreparedTraining, lr: float, step_from: int, step_to: int, n_steps: int, clip: tuple[dict[int, float], float] = ({}, 1.0)) -> torch.Tensor:
    """c_u = η × Σ_{uses of u in the interval} clip_s / batch size (clip_s: the step's gradient-clipping factor);
    uniform sampling (η × Σ_s clip_s / U) without 'steps'."""
    n_ex = len(pt.tset)
    factors, mean = clip
    if not pt.tset.has_steps:
        total = sum(factors.get(s, mean) for s in range(step_from + 1, step_from + n_steps + 1))
        return torch.full((n_ex,), lr * total / n_ex, dtype=torch.float64)
    uses = [sum(factors.get(s, mean) for s in e.steps if step_from < s <= step_to) for e in pt.tset.examples]
    return torch.tensor(uses, dtype=torch.float64) * lr / float(pt.batch_size)


def _half(rows: int | None) -> int | None:
    """Probe rows per chunk when a block of training rows is held beside them: half of the rows' budget. The block
    takes the whole budget at its capture (``pt.chunk_size``); its factors, about half of that peak, then stay beside
    each probe chunk. Each probe row's G and each direction's δW are formed once per (block, chunk), so both are as
    large as the budget allows (a larger ``--memory`` is faster)."""
    return None if rows is None else max(1, rows // 2)


def _full_logits_rows(p, pt: PreparedTraining) -> int | None:
    """Rows per chunk on either side where probe and training rows both form their full logits (the kernels, the
    approximation): the smaller of the two chunks, so that the longer rows stay within the budget too."""
    sizes = [n for n in (p.logits_chunk_size, pt.logits_chunk_size) if n]
    return min(sizes) if sizes else None


def training_part(p, pt: PreparedTraining, k: int, before: dict, after: dict, dlogp_lin: torch.Tensor, dlogp_lin_star: torch.Tensor, grid,
                  progress=None) -> dict:  # fmt: skip
    """Arrays of the part of interval k keyed by cube names (``force``, ``force_pos``, ``force_neg``,
    ``dlogp_unexplained``, the G statistics; for preference pairs CHES and their forces on their own answers,
    displacement.py): see the module docstring."""
    config, run = p.config, p.run
    a, b = run.checkpoints[k], run.checkpoints[k + 1]
    n_steps = max(1, b.step - a.step) if a.step_source != "order" else 1
    lr = interval_lr(run, k)
    with run.open(a) as ca, run.open(b) as cb:
        start, end = ca.optimizer(), cb.optimizer()
        trained = adapter_factors(ca, before)
    if trained is None:
        pre = preconditioner(before, start=start, end=end, lr=lr, n_steps=n_steps)
    else:
        pre = lora_preconditioner(before, trained, start=start, end=end, lr=lr, n_steps=n_steps)
    del start, end  # the two optimizer states (mapped, but resident once read: Adam's are 2 × |θ| each) are not needed again
    tset, n_ex = pt.tset, len(pt.tset)
    row_logp, stats = training_rows_at(p, pt, before)
    logp, weights = _weights(p, pt, before, row_logp)
    factors, mean_clip, clip_note = clip_factors(_trainer_state(run).get("log_history", []), config.max_grad_norm, a.step, b.step)
    coeff = _coefficients(pt, lr, a.step, b.step, n_steps, (factors, mean_clip))
    pairs, groups = tset.objective in PREFERENCE, tset.objective == "grpo"
    approx_error = math.nan
    if config.forces == "approximate" and tset.objective != "kd" and pre.lora is None:
        forces, approx_error = approximate_part(p, pt, before, weights.flatten(), coeff, pre, progress=progress)
    else:
        forces = example_forces(p.fn or p.model.logits, before, p.batch, pt.batch, pt.owners, weights.flatten(), coeff, pre,
                                teacher_logits=pt.teacher_logits, method=config.method, chunk_size=_half(p.chunk_size), module=p.model.module,
                                own=pairs or groups, train_chunk=pt.chunk_size, elements=batched_elements(p.rows_gb, before),
                                progress=progress)  # fmt: skip
    fn = p.fn or p.model.logits
    mom, mom_star = direction_force(fn, before, p.batch, pre.momentum, method=config.method, chunk_size=p.chunk_size)
    dec, dec_star = direction_force(fn, before, p.batch, pre.decay, method=config.method, chunk_size=p.chunk_size)
    nan = torch.full((2, len(p.batch)), math.nan, dtype=torch.float64)
    total = torch.cat([forces.total, mom[None], dec[None]]).T  # (B, U + 2)
    total_star = torch.cat([forces.pos_argmax + forces.neg_argmax, mom_star[None], dec_star[None]]).T
    unexplained = dlogp_lin.double().cpu() - total.sum(1)
    unexplained_star = dlogp_lin_star.double().cpu() - total_star.sum(1)
    per_ex = {name: v.double().cpu().view(n_ex, pt.n_resp) for name, v in stats.items()}
    pushed_up, pushed_down = (weights > 0).double(), (weights < 0).double()
    mean_over = lambda v, m: torch.where(m.sum(1) > 0, (v * m).sum(1) / m.sum(1).clamp_min(1), torch.full((n_ex,), math.nan, dtype=torch.float64))  # noqa: E731
    g_stats = {
        "g_gap": mean_over(per_ex["gap"], pushed_up), "g_one_minus_p": mean_over(per_ex["one_minus_p"], pushed_up),
        "g_neg_rank": mean_over(per_ex["rank"], pushed_down),
    }  # fmt: skip
    if tset.objective in PREFERENCE and pt.ref_logp is not None:
        g_stats["dpo_margin"] = h = margin(logp, pt.ref_logp)
        if tset.objective == "dpo":  # σ(−βh) is DPO's weight; IPO and SimPO weigh pairs otherwise
            g_stats["dpo_weight"] = torch.sigmoid(-(tset.beta if tset.beta is not None else DEFAULT_BETA["dpo"]) * h)
    pad = lambda v: np.concatenate([v.numpy(), [math.nan, math.nan]])  # noqa: E731 - no G for momentum / decay
    data = {
        "force": grid.rows(total, total_star)[None],
        "force_pos": grid.rows(torch.cat([forces.pos, nan]).T, torch.cat([forces.pos_argmax, nan]).T)[None],
        "force_neg": grid.rows(torch.cat([forces.neg, nan]).T, torch.cat([forces.neg_argmax, nan]).T)[None],
        "dlogp_unexplained": grid.rows(unexplained, unexplained_star)[None],
        "force_pos_tok": grid.tokens(forces.pos_tok, None)[None], "force_neg_tok": grid.tokens(forces.neg_tok, None)[None],
        **{name: pad(v)[None] for name, v in g_stats.items()},
    }  # fmt: skip
    notes = [n for n in (pre.note, clip_note) if n]
    if forces.method.startswith("jvp ("):
        notes.append("the training examples' forces took one JVP each: the captured factors of a module did not sum to its JVP")
    index = {}
    data["force_approx_error"] = np.array([approx_error])
    if forces.method.startswith("approximate"):
        notes.append(f"training-example forces: {forces.method}; relative error {approx_error:.3g} against the exact forces of the first "
                     f"{APPROX_CHECK} examples (force_approx_error)")  # fmt: skip
    elif config.forces == "approximate":
        notes.append("--forces approximate applies to Adam-style P on full weights (not LoRA factors, not kd): the exact forces were computed")
    if (pairs or groups) and forces.own_pos is None:
        what = "(CHES, self_force)" if pairs else "(LLD, token forces, NTHR)"
        notes.append(f"likelihood displacement {what} is computed with the exact forces only: drop --forces approximate")
    elif groups:  # lazy likelihood displacement: each group's own force on its own correct completions, per token
        lazy, more = lld_part(p, pt, k, before, after, weights, coeff, forces.own_pos, forces.own_neg, pre)
        data.update(lazy)
        notes += more
        index["own_response"] = list(tset.examples[0].responses)
        index["completion_token"] = list(range(completion_width(pt)))
    elif pairs:  # likelihood displacement: each pair's own force on its own answers, beside CHES
        displaced, more = displacement_part(p, pt, k, before, after, forces.own_pos, forces.own_neg, coeff)
        data.update(displaced)
        notes += more
        index["own_response"] = list(OWN_RESPONSES)
    if p.model.kind == "classifier" and tset.objective == "ce":
        matrices, note = class_matrices(p, pt, before)
        data.update(matrices)
        notes += [note] if note else []
    # the kernel at the interval's start; the last interval also gives the run's last checkpoint its kernel
    ends = [before] + ([after] if k + 2 == len(run.checkpoints) else [])
    if tset.objective == "kd":  # the kernel's training side would need the teacher's distribution per row
        empty = {"kernel": np.full((len(p.probe_ids), n_ex + 2), np.nan), "approximate": False, "method": "not computed for kd"}
        empty["kernel_cos"] = empty["kernel"]
        kernels = [empty for _ in ends]
        notes.append("kernels are not computed for knowledge distillation (kd); the forces are")
    else:
        kernels = [probe_kernel(p, pt, theta, weights if theta is before else _weights(p, pt, theta)[1]) for theta in ends]
    absent = np.full_like(kernels[0]["kernel"], np.nan)  # the end checkpoint's kernel comes from the next part
    for name in ("kernel", "kernel_cos"):
        data[name] = np.stack([kernels[0][name], kernels[1][name] if len(kernels) > 1 else absent])
    kernel_info = {"approximate": any(x["approximate"] for x in kernels), "method": kernels[0]["method"]}
    return {"data": data, "index": index, "lr": lr, "notes": notes, "preconditioner": pre.kind, "coeff": coeff, "kernel": kernel_info}


#: Examples whose exact forces check ``--forces approximate`` on every interval (the error stored in the cube).
APPROX_CHECK = 8


def approximate_part(p, pt: PreparedTraining, before: dict, weights: torch.Tensor, coeff: torch.Tensor, pre, progress=None) -> tuple:
    """(ExampleForces, relative error): ``forces/approx.py``'s rank-one P with ghost products for every example;
    the per-token split exact (one backward per sign over all training rows, one JVP each); the error of the
    first APPROX_CHECK used examples against their exact forces. The probe rows' factors are held while they take
    at most half of the rows' budget, else captured again for each block of training rows."""
    fn, module = p.fn or p.model.logits, p.model.module
    frozen = pre.frozen
    names = [n for n, t in before.items() if t.is_floating_point() and n not in frozen]
    pos, neg, pos_star, neg_star, fitted = approximate_forces(p.model.logits, before, p.batch, pt.batch, pt.owners, weights, coeff, pre.scale,
                                                              module=module, names=names, chunk_size=_full_logits_rows(p, pt),
                                                              held_bytes=p.rows_gb * 2**30 / 2, progress=progress)  # fmt: skip
    tok = summed_tokens(fn, before, p.batch, pt.batch, pt.owners, weights, coeff, pre, names, method=p.config.method, chunk_size=p.chunk_size,
                        train_chunk=pt.chunk_size)  # fmt: skip
    used = [u for u in range(len(coeff)) if float(coeff[u]) != 0][:APPROX_CHECK]
    rows = [i for i, o in enumerate(pt.owners) if o in used]
    exact = example_forces(fn, before, p.batch, pt.batch.select(rows), [used.index(pt.owners[i]) for i in rows], weights[rows], coeff[used], pre,
                           method=p.config.method, chunk_size=_half(p.chunk_size), module=module, train_chunk=pt.chunk_size,
                           elements=batched_elements(p.rows_gb, before))  # fmt: skip
    error = relative_error((pos + neg)[used], exact.total) if used else math.nan
    method = f"approximate: Adafactor-style rank-one P on {len(fitted)} matrices, ghost products"
    return ExampleForces(pos, neg, pos_star, neg_star, tok[1], tok[-1], method), error


def probe_kernel(p, pt: PreparedTraining, params: dict, weights: torch.Tensor) -> dict:
    """K[o, u] = ⟨∇θ log π(y_o|x_o), ∇θ L_u⟩ and its cosine at θ = ``params`` for every probe o (its first
    response type: chosen, or a classifier's label) and training example u, L_u = Σ_r w_r (−log π(y_r|x_u)).

    Ghost inner products where the layers allow (kernels.py); rows of one example are summed (K is linear in
    L), and ‖∇L_u‖ of a multi-response example is taken from its own gradient (the cross terms count)."""
    config = p.config
    probes = focus_rows(p.batch, p.responses[0])
    weights = weights.flatten()  # (U·R,) one weight per training row
    projection = Projection(config.kernel_projection) if config.kernel_projection else None
    kern = gradient_kernel(p.model.logits, params, probes, pt.batch, module=p.model.module, train_loss=weights.to(torch.float64),
                           chunk_size=_full_logits_rows(p, pt), projection=projection)  # fmt: skip
    n_ex = len(pt.tset)
    owners = torch.tensor(pt.owners, device=kern.k.device)
    k = torch.zeros(kern.k.shape[0], n_ex, dtype=torch.float64).index_add_(1, owners.cpu(), kern.k.double().cpu())
    if pt.n_resp == 1:
        norm = kern.train_norm.double().cpu()
    else:
        norm = torch.empty(n_ex, dtype=torch.float64)
        for u in range(n_ex):
            rows = [i for i, o in enumerate(pt.owners) if o == u]
            parts = [g for g in example_gradient(p.model.logits, params, pt.batch.select(rows), weights[rows]) if g is not None]
            if not parts:  # every weight 0 (e.g. a GRPO group with equal rewards): no gradient
                norm[u] = 0.0
                continue
            total = {n: sum(g[n] for g in parts) for n in parts[0]}
            norm[u] = torch.sqrt(sum(t.double().pow(2).sum() for t in total.values()))
    den = kern.probe_norm.double().cpu()[:, None] * norm[None, :]
    cos = torch.where(den > 0, k / torch.where(den > 0, den, 1), torch.zeros_like(k))
    rows_of = [i for i, _ in probes.rows]  # probe index of each kernel row
    full_k = torch.full((len(p.probe_ids), n_ex + 2), math.nan, dtype=torch.float64)
    full_cos = full_k.clone()
    full_k[rows_of, :n_ex], full_cos[rows_of, :n_ex] = k, cos
    return {"kernel": full_k.numpy(), "kernel_cos": full_cos.numpy(), "approximate": kern.approximate, "method": kern.method}


def class_matrices(p, pt: PreparedTraining, params: dict) -> tuple[dict[str, np.ndarray], str]:
    """A (P, V, V), G (U + 2, V) and K (P, U + 2, V, V) at θ for a classifier (NaN for momentum / weight decay),
    or ({}, a note) when they would not fit the budgets above."""
    probes = focus_rows(p.batch, p.responses[0])
    n_params = sum(t.numel() for t in params.values() if t.is_floating_point())
    vocab = p.model.vocab_size or int(p.model.logits(params, probes.select([0])).shape[-1])
    rows = len(probes) + len(pt.batch)
    if rows * vocab * n_params > CLASS_JACOBIAN_BUDGET or len(probes) * len(pt.tset) * vocab**2 > CLASS_K_BUDGET:
        return {}, (f"the full A, K, G matrices are not stored ({len(probes)} probes × {len(pt.tset)} examples × {vocab}² classes, "
                    f"{n_params} parameters): analyze fewer probes or training examples to get them; the kernels are stored")  # fmt: skip
    cf = class_forces(p.model.logits, params, probes, pt.batch)
    n_ex, where = len(pt.tset), [i for i, _ in probes.rows]
    a = np.full((len(p.probe_ids), vocab, vocab), np.nan)
    a[where] = cf.a_term.double().cpu().numpy()
    g = np.full((n_ex + 2, vocab), np.nan)
    g[:n_ex] = cf.g_term.double().cpu().numpy()
    k = np.full((len(p.probe_ids), n_ex + 2, vocab, vocab), np.nan)
    k[where, :n_ex] = cf.k_term.double().cpu().numpy()
    return {"a_class": a[None], "g_class": g[None], "k_class": k[None]}, ""


def training_rows_at(p, pt: PreparedTraining, params: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(log π(y_r|x_r) (rows,) float64, the G statistics per row: ``objectives.g_statistics``) of the training rows
    at ``params``, ``pt.logits_chunk_size`` rows at a time: the (rows, T, V) logits of one chunk at most."""
    logp, stats = [], []
    with torch.no_grad():
        for sub in chunks(pt.batch, pt.logits_chunk_size):
            logits = p.model.logits(params, sub)
            logp.append(_row_logp(logits, sub).cpu())
            stats.append({k: v.double().cpu() for k, v in g_statistics(logits, sub.targets, sub.target_mask).items()})
            del logits
    return torch.cat(logp), {k: torch.cat([s[k] for s in stats]) for k in stats[0]}


def _weights(p, pt: PreparedTraining, params: dict, row_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (U, R), w (U, R)): the training responses' log-probabilities at θ and their weights −∂L/∂logπ
    (``row_logp``: the training rows' log π at θ when the caller has them)."""
    tset, n_ex = pt.tset, len(pt.tset)
    if row_logp is None:
        row_logp = training_rows_at(p, pt, params)[0]
    logp = row_logp.view(n_ex, pt.n_resp).cpu()
    if tset.objective == "kd":  # kd_loss already averages over the response tokens
        return logp, torch.ones_like(logp)
    return logp, response_weights(tset.objective, logp, **_objective_kw(pt))


def _objective_kw(pt: PreparedTraining) -> dict:
    kw = {"lengths": pt.lengths, "ref_logp": pt.ref_logp, "beta": pt.tset.beta, "gamma": pt.tset.gamma}
    if pt.tset.objective == "grpo":
        kw["rewards"] = torch.tensor([e.rewards for e in pt.tset.examples], dtype=torch.float64)
        kw.update(advantage=pt.advantages, loss_type=pt.tset.loss_type, token_norm=pt.token_norm, max_completion_length=pt.tset.max_completion_length)
    return kw


def example_losses(pt: PreparedTraining, model, params: dict) -> torch.Tensor:
    """L (U,) float64: each training example's loss at ``params`` on the token ids the trainer built
    (``objectives.loss``; for kd ``kd_loss``) — what the trainer's ``compute_loss`` gives on a batch of that
    example alone (tests/test_trainer_consistency.py checks it against TRL)."""
    with torch.no_grad():
        logits = model.logits(params, pt.batch)
    if pt.tset.objective == "kd":
        return kd_loss(logits.double(), pt.teacher_logits.double(), pt.batch.target_mask).view(len(pt.tset), pt.n_resp).sum(1).cpu()
    logp = _row_logp(logits, pt.batch).view(len(pt.tset), pt.n_resp).cpu()
    return objective_loss(pt.tset.objective, logp, **_objective_kw(pt))


def source_coords(pt: PreparedTraining) -> dict[str, list]:
    """Coordinates of the ``source`` dimension: kind (example / momentum / weight_decay) and prompt text."""
    kinds = ["example"] * len(pt.tset) + [MOMENTUM, WEIGHT_DECAY]
    text = [as_text(e.prompt) for e in pt.tset.examples] + ["", ""]
    return {"source_kind": kinds, "source_prompt": text}


def source_labels(pt: PreparedTraining) -> dict[str, list[str]]:
    """The examples' own labels along ``source`` (meta.*, extra columns), empty for the optimizer's sources."""
    return {name: values + ["", ""] for name, values in pt.tset.labels.items()}
