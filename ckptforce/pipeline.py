"""The only wiring: run → updates → forces → cube, resumable, serial or on a Dask cluster.

    analyze(config, out)        every checkpoint pair is one independent unit of work; each unit's result
                                is a small part file written atomically into ``OUT.parts/`` (temporary
                                name, then ``os.replace``); a re-run computes only the parts that are
                                missing and refuses parts made with other settings; at the end the parts
                                are merged into one cube that replaces ``OUT`` atomically.

Locally the pairs run in order; with ``workers`` (a local cluster) or ``scheduler`` (an existing one) the same
function is mapped over the pairs with Dask distributed. Each worker prepares the run once (probes, tokenizer,
model skeleton) and keeps it for all its tasks; it loads only its own pair of checkpoints; the client is the
only writer. Memory per unit: two checkpoints' parameters and their difference, whatever the run's length.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xarray as xr

from . import __version__, cube
from .errors import CkptforceError
from .budget import (HEAD_SHARE, attention_heads, default_memory_gb, duration, forwards_per_interval, head_chunks, model_shape,
                     rows_budget, rows_per_chunk, training_forwards)  # fmt: skip
from .forces import DEFAULT_NODES, interval_forces
from .forces.interval import SPLIT_PER_ROW
from .forces.features import drift, features
from .forces.head import SplitLM
from .forces.topk import response_topk
from .tensor_groups import groups
from .io import Run, open_run
from .model import BoundModel, bind
from .names import POOR_LINEARISATION
from .parts import (  # noqa: F401 - re-exported: the parts' API lives in parts.py
    ConfigMismatchError, check_or_write_config, check_parts_match, merge_parts, missing_parts, part_path, parts_dir,
)
from .config import AnalysisConfig  # noqa: F401 - re-exported: the analysis settings live in config.py
from .training_forces import PreparedTraining, focus_rows, prepare_training, source_coords, source_labels, training_part
from .datafiles import check_mapped
from .class_probes import CLASS_SUFFIXES, ClassBatch, load_class_probes, make_class_batch
from .probes import ARGMAX, TokenBatch, boundary_note, load_probe_set, load_tokenizer, make_batch, tokenize
from .sequences import Convention, as_text, consistency_notes, describe, files_sha256, is_ids, kinds, load_chat_template
from .updates import update_anatomy

#: The response type of a classification probe: its (given) label.
CLASS_LABEL = "label"
#: Probe rows computed together within an interval: bigger probe sets are taken in batches of this many rows,
#: with progress reported after each (the results do not depend on it: every quantity is per row).
PROBE_BATCH = 256


@dataclass
class Prepared:
    """What a worker builds once and keeps for all its tasks."""

    config: AnalysisConfig
    run: Run
    model: BoundModel
    batch: TokenBatch
    probe_ids: list[str]
    responses: list[str]  # response types incl. argmax
    splits: list[str]
    groups: list[str]
    device: str
    prompts: list[str] = field(default_factory=list)  # prompt text per probe ("" when given as ids)
    texts: list[list[str]] = field(default_factory=list)  # (probe, response) text ("" for ids and argmax)
    training: PreparedTraining | None = None  # with --train
    tokenization: dict = field(default_factory=dict)  # the convention text was tokenized with (sequences.describe)
    notes: list[str] = field(default_factory=list)  # warnings about how probes / training texts were tokenized
    z0: torch.Tensor | None = None  # (P, D) features of each probe's first response at the first checkpoint (--feature-layer)
    chunk_size: int | None = None  # rows per forward / JVP: --chunk-size, else from the memory budget (budget.py)
    logits_chunk_size: int | None = None  # the same where the full (rows, T, V) logits are formed (no streamed head)
    fn: Callable | None = None  # what the forces evaluate: ``forces_fn`` (the head streamed where it can be)
    rows_gb: float = 0.0  # GiB of the memory budget left for the probe (and training) rows once θ is held
    labels: dict[str, list[str]] = field(default_factory=dict)  # the probes' own labels (meta.*, extra columns)


_PREPARED: dict[tuple[str, str], Prepared] = {}


def prepare(config: AnalysisConfig, device: str = "cpu") -> Prepared:
    """Open the run, bind the model, tokenise the probes (cached per process and config)."""
    key = (config.to_json(), device)
    if key in _PREPARED:
        return _PREPARED[key]
    _check_device(device)
    run = open_run(config.run_dir, init=config.init, layout=config.layout, trust_pickles=config.trust_pickles, base_model=config.base_model)
    if len(run.checkpoints) < 2:
        raise CkptforceError(f"{run.root}: one checkpoint only; forces need two (add --init with the starting model)")
    first = run.checkpoints[-1]
    classifier = Path(config.probes).suffix in CLASS_SUFFIXES
    with run.open(first) as ckpt:
        model = bind(ckpt, model=config.model, kind="classifier" if classifier else "lm",
                     base_model=Path(config.base_model) if config.base_model else None, run_root=run.root)  # fmt: skip
    dtype = getattr(torch, config.dtype)
    model.to(device, dtype=dtype)
    if classifier and config.topk:
        raise CkptforceError(f"--topk {config.topk}: for language models; a classifier's cube holds its whole distribution (logp_class), "
                             "which export filter-kd reads: drop --topk")  # fmt: skip
    if classifier:
        prepared = _prepare_classifier(config, run, model, device, dtype)
        _PREPARED[key] = _finish(prepared, dtype)
        return prepared
    probe_set = load_probe_set(config.probes, config.columns)
    needs_text = any(p.prompt_ids is None or not all(is_ids(r) for r in p.responses.values()) for p in probe_set.probes)
    folder = first.path if first.path.is_dir() else first.path.parent
    tokenizer = None
    if needs_text:
        tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else None, [folder, run.root])
    template = load_chat_template(config.chat_template) if config.chat_template else None
    convention = Convention(config.special_tokens, config.probe_eos, template)
    tok = tokenize(probe_set, tokenizer, convention=convention, max_length=model.context, vocab_size=model.vocab_size)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    batch = make_batch(tok, pad_id=pad).to(device)
    responses = list(probe_set.response_types) + ([ARGMAX] if "chosen" in probe_set.response_types else [])
    prepared = Prepared(
        config, run, model, batch, [p.id for p in probe_set.probes], responses,
        [p.split or "" for p in probe_set.probes], [p.group or "" for p in probe_set.probes], device,
        [as_text(p.prompt) for p in probe_set.probes],
        [[as_text(p.responses.get(t)) for t in responses] for p in probe_set.probes],
    )  # fmt: skip
    prepared.notes = [n for n in [boundary_note(tok, tokenizer)] if n]
    prepared.chunk_size = _chunk_rows(config, model, batch, dtype, device)
    prepared.logits_chunk_size = _chunk_rows(config, model, batch, dtype, device, full_logits=True)
    prepared.labels = probe_set.labels
    train_convention = train_kinds = None
    if config.train:
        train_convention = Convention(config.special_tokens, config.train_eos, template)
        prepared.training = prepare_training(config, run, model, tokenizer, device, dtype, convention=train_convention)
        prepared.training.chunk_size = _chunk_rows(config, model, prepared.training.batch, dtype, device)
        prepared.training.logits_chunk_size = _chunk_rows(config, model, prepared.training.batch, dtype, device, full_logits=True)
        tokenizer = tokenizer or prepared.training.tokenizer
        train_kinds = kinds(prepared.training.tset.examples)
    seen = probe_set.columns | (prepared.training.tset.columns if prepared.training else set())
    check_mapped(config.columns, seen, [config.probes, *([config.train] if config.train else [])])
    if tokenizer is not None:
        own = files_sha256(folder) or files_sha256(run.root)
        prepared.notes += consistency_notes(tokenizer, probe=convention, probe_kinds=kinds(probe_set.probes), train=train_convention,
                                            train_kinds=train_kinds, own_tokenizer_sha256=own if config.tokenizer else "")  # fmt: skip
        source = f"--chat-template {config.chat_template}" if template else ("the tokenizer's" if getattr(tokenizer, "chat_template", None) else "none")
        prepared.tokenization = describe(tokenizer, probe=convention, train=train_convention, template_source=source)
    _prepare_features(prepared, dtype)
    _PREPARED[key] = _finish(prepared, dtype)
    return prepared


def _finish(p: Prepared, dtype) -> Prepared:
    """The forces' function and the rows' memory budget, once the rows are known."""
    p.fn = forces_fn(p)
    p.rows_gb = _rows_budget(p.config, p.model, dtype, p.device)
    return p


#: Half-precision analyses (``--dtype bfloat16|float16``, for GPUs): the model's arithmetic in half precision,
#: softmax and every reduction in float32 (observe.py ``_wide``), and Δθ formed in float32 before it is rounded.
HALF = (torch.bfloat16, torch.float16)


def read_pair(model: BoundModel, a, b, device: str, dtype: torch.dtype) -> tuple[dict, dict, dict | None]:
    """(θ_a, θ_b, Δθ or None) in ``dtype``, each checkpoint read once. For half precision Δθ = θ_b − θ_a is formed
    in float32 before the parameters are rounded (not θ_b − θ_a of two rounded checkpoints: bfloat16 keeps 8 bits,
    and an update 1/256 of a weight would vanish); the JVP rounds Δθ itself."""
    wide = torch.float32 if dtype in HALF else dtype
    before, after = (model.params_from(c, device=device, dtype=wide) for c in (a, b))
    if dtype not in HALF:
        return before, after, None
    step = {n: after[n] - before[n] for n, t in before.items() if t.is_floating_point()}
    narrow = lambda theta: {n: t.to(dtype) if t.is_floating_point() else t for n, t in theta.items()}  # noqa: E731
    return narrow(before), narrow(after), step


def _rows_budget(config: AnalysisConfig, model: BoundModel, dtype, device: str) -> float:
    """GiB of the memory budget (--memory, else from the machine) left for the probe rows once θ is held."""
    budget = config.memory_gb if config.memory_gb else default_memory_gb(device)
    parameters = sum(p.numel() for p in model.module.parameters())
    return rows_budget(budget, parameters=parameters, dtype_bytes=torch.finfo(dtype).bits // 8)


def _chunk_rows(config: AnalysisConfig, model: BoundModel, batch, dtype, device: str, *, full_logits: bool = False) -> int:
    """--chunk-size, else the most rows whose forward / JVP / backward fits the memory budget (budget.py); with a
    streamed head (``model.head()``) the rows hold no vocabulary-sized tensor and the head has its own share.
    ``full_logits``: rows for the paths that still form the model's (rows, T, V) logits (training-example forces,
    GRPO statistics, --topk), sized with the vocabulary term whatever the head."""
    if config.chunk_size:
        return config.chunk_size
    hidden, layers = model_shape(model.module)
    width = batch.input_ids.shape[1] if hasattr(batch, "input_ids") else 1
    budget = _rows_budget(config, model, dtype, device)
    streamed = model.kind == "lm" and model.head() is not None and not full_logits
    return rows_per_chunk(budget * (1 - HEAD_SHARE) if streamed else budget, width=width, vocab=None if streamed else model.vocab_size or 1,
                          hidden=hidden, layers=layers, heads=attention_heads(model.module), dtype_bytes=torch.finfo(dtype).bits // 8)  # fmt: skip


def forces_fn(p: Prepared) -> Callable:
    """The model function the forces take: a ``SplitLM`` that applies the head at the response positions only, in
    chunks of positions × vocabulary from the memory budget, when the model allows it; else ``model.logits``."""
    head = p.model.head() if p.model.kind == "lm" else None
    if head is None:
        return p.model.logits
    dtype = getattr(torch, p.config.dtype)
    budget = _rows_budget(p.config, p.model, dtype, p.device)
    vocab = p.model.module.get_output_embeddings().weight.shape[0]
    positions, vocab_chunk = head_chunks(budget, vocab=vocab, dtype_bytes=torch.finfo(dtype).bits // 8)
    return SplitLM(p.model.logits, p.model.body, *head, positions=positions, vocab=vocab_chunk)


def _prepare_classifier(config: AnalysisConfig, run: Run, model: BoundModel, device: str, dtype) -> Prepared:
    """Classification probes (arrays): one row per probe whose 'response' is its label; y* is the argmax class.
    Flipped labels (the zig-zag experiments) are the probe group 'flipped', the rest 'clean'."""
    probes = load_class_probes(config.probes)
    batch = make_class_batch(probes, dtype=dtype)
    batch = ClassBatch(batch.x, batch.targets, batch.target_mask, [(i, CLASS_LABEL) for i in batch.rows]).to(device)
    flipped = probes.flipped.tolist() if probes.flipped is not None else [False] * len(probes)
    groups = ["flipped" if f else "clean" for f in flipped]
    prepared = Prepared(config, run, model, batch, probes.ids, [CLASS_LABEL, ARGMAX], [""] * len(probes), groups, device,
                        [""] * len(probes), [["", ""] for _ in probes.ids])  # fmt: skip
    if config.train:
        prepared.training = prepare_training(config, run, model, None, device, dtype)
        prepared.training.chunk_size = _chunk_rows(config, model, prepared.training.batch, dtype, device)
        prepared.training.logits_chunk_size = _chunk_rows(config, model, prepared.training.batch, dtype, device, full_logits=True)
    prepared.chunk_size = _chunk_rows(config, model, batch, dtype, device)
    prepared.logits_chunk_size = _chunk_rows(config, model, batch, dtype, device, full_logits=True)
    _prepare_features(prepared, dtype)
    return prepared


def _prepare_features(p: Prepared, dtype) -> None:
    if p.config.feature_layer:
        with p.run.open(p.run.checkpoints[0]) as ckpt:
            theta0 = p.model.params_from(ckpt, device=p.device, dtype=dtype)
        p.z0 = features(p.model, theta0, focus_rows(p.batch, p.responses[0]), p.config.feature_layer)


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CkptforceError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CkptforceError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CkptforceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here; use cuda:0 … cuda:{torch.cuda.device_count() - 1}")


def compute_part(config_json: str, k: int, device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> xr.Dataset:
    """The part of interval k (checkpoints k and k+1): probes observed at both ends and the forces between.

    ``progress(done, total)`` is called after each batch of ``PROBE_BATCH`` probe rows and, with --train, each
    block of training examples (the fraction done/total of the interval's estimated work)."""
    config = AnalysisConfig(**json.loads(config_json))
    p = prepare(config, device)
    refs = p.run.checkpoints[k : k + 2]
    dtype = getattr(torch, config.dtype)
    with p.run.open(refs[0]) as a, p.run.open(refs[1]) as b:
        before, after, step = read_pair(p.model, a, b, device, dtype)
    share = 1.0  # of the interval's work done by the probe rows' forces; the training examples' forces do the rest
    if p.training is not None:
        probe_work = forwards_per_interval(config.by_tensor, config.nodes)
        share = probe_work / (probe_work + _training_forwards(p))
    probe_progress = progress if progress is None or share == 1.0 else (lambda rows, total: progress(share * rows / total, 1))
    res = interval_forces(forces_fn(p), before, after, p.batch, nodes=config.nodes, by_tensor=config.by_tensor, method=config.method,
                          chunk_size=p.chunk_size, batch_rows=PROBE_BATCH, progress=probe_progress, full=p.model.kind == "classifier",
                          module=p.model.module, step=step)  # fmt: skip
    grid = _Grid(p)
    data = {
        "logp": np.stack([grid.rows(res.before.logp, res.before.argmax_logp), grid.rows(res.after.logp, res.after.argmax_logp)]),
        "dlogp_obs": grid.rows(res.dlogp_obs, res.argmax_obs)[None],
        "dlogp_lin": grid.rows(res.dlogp_lin, res.argmax_lin)[None],
        "remainder_ratio": np.array([res.remainder_ratio]),
    }
    for name in ("logp_tok", "entropy", "top1", "peakiness"):
        # y* shares the chosen row's distributions; only its log-probability per token differs
        data[name] = np.stack(
            [grid.tokens(getattr(o, name), o.argmax_logp_tok if name == "logp_tok" else getattr(o, name)) for o in (res.before, res.after)]
        )
    data["dlogp_lin_tok"] = grid.tokens(res.dlogp_lin_tok, None)[None]
    if config.topk:  # y* is teacher-forced along chosen: the same next-token distributions
        tops = [response_topk(p.model.logits, theta, p.batch, config.topk, chunk_size=p.logits_chunk_size) for theta in (before, after)]
        as_float = lambda ids: torch.where(ids >= 0, ids.double(), torch.tensor(float("nan"), dtype=torch.float64))  # noqa: E731
        data["topk_token"] = np.stack([grid.tokens(as_float(ids), as_float(ids)) for ids, _ in tops])
        data["topk_logp"] = np.stack([grid.tokens(logp, logp) for _, logp in tops])
    if res.dlogp_path is not None:
        data["dlogp_path"] = grid.rows(res.dlogp_path, res.argmax_path)[None]
    index = {"checkpoint": [k, k + 1], "interval": [k], "probe": p.probe_ids, "response": p.responses, "token": list(range(grid.width))}
    if config.topk:
        index["topk"] = list(range(data["topk_logp"].shape[-1]))
    if res.before.logp_full is not None:  # classifiers: the whole distribution, probe rows in probe order
        index["class"] = list(range(res.before.logp_full.shape[-1]))
        data["logp_class"] = np.stack([o.logp_full.detach().double().cpu().numpy() for o in (res.before, res.after)])
    if config.by_tensor:
        labels, where = groups(res.tensor_names, config.split_by)
        dim, suffix = ("tensor", "tensor") if config.split_by == "tensor" else ("part", "part")
        summed = lambda v: v if v is None or dim == "tensor" else torch.zeros(v.shape[0], len(labels), dtype=v.dtype, device=v.device).index_add_(  # noqa: E731
            1, torch.tensor(where, device=v.device), v)  # fmt: skip
        index[dim] = labels
        data[f"dlogp_lin_{suffix}"] = grid.rows(summed(res.lin_by_tensor), summed(res.argmax_lin_by_tensor))[None]
        if res.path_by_tensor is not None:
            data[f"dlogp_path_{suffix}"] = grid.rows(summed(res.path_by_tensor), None)[None]
    attrs = {"jvp_method": res.method, **({"split_method": res.split_method} if res.split_method else {})}
    if p.z0 is not None:
        rows = focus_rows(p.batch, p.responses[0])
        where = [i for i, _ in rows.rows]
        stats = [drift(features(p.model, theta, rows, config.feature_layer), p.z0) for theta in (before, after)]
        for key, name in (("norm", "feature_norm"), ("drift", "feature_drift"), ("one_minus_cos", "feature_one_minus_cos"), ("dot", "feature_dot")):
            values = np.full((2, len(p.probe_ids)), np.nan)
            values[:, where] = np.stack([st[key].cpu().numpy() for st in stats])
            data[name] = values
        attrs["feature_layer"] = config.feature_layer
    if p.training is not None:
        on_examples = None if progress is None else (lambda done, total: progress(share + (1 - share) * done / max(1, total), 1))
        part = training_part(p, p.training, k, before, after, res.dlogp_lin, res.argmax_lin, grid, progress=on_examples)
        data.update(part["data"])
        index["source"] = p.training.sources
        index.update(part["index"])
        if "a_class" in data:
            index["class"] = index.get("class") or list(range(data["a_class"].shape[-1]))
            index["class_to"] = index["class"]
        attrs.update(training_notes=json.dumps(p.training.notes + part["notes"]), preconditioner=part["preconditioner"],
                     objective=p.training.tset.objective, kernel_method=part["kernel"]["method"],
                     kernel_approximate=int(part["kernel"]["approximate"]))  # fmt: skip
    coords = {
        "step": [r.step for r in refs], "step_source": [r.step_source for r in refs], "checkpoint_path": [str(r.path) for r in refs],
        "step_from": [refs[0].step], "step_to": [refs[1].step], "probe_split": p.splits, "probe_group": p.groups,
        "probe_prompt": p.prompts, "response_text": p.texts,
        **(source_coords(p.training) if p.training is not None else {}), **cube.label_coords("probe", p.labels),
        **(cube.label_coords("source", source_labels(p.training)) if p.training is not None else {}),
        **({"probe_label": p.batch.targets[:, 0].cpu().numpy()} if p.model.kind == "classifier" else {}),
    }  # fmt: skip
    return cube.build(index=index, data=data, coords=coords, attrs=attrs)


class _Grid:
    """Scatter batch rows (probe, response type) into (probe, response[, …]) arrays, NaN where absent."""

    def __init__(self, p: Prepared):
        self.p = p
        self.shape = (len(p.probe_ids), len(p.responses))
        self.where = [(i, p.responses.index(t)) for i, t in p.batch.rows]
        along = "chosen" if "chosen" in p.responses else CLASS_LABEL  # y* is read along this row of each probe
        self.chosen = [(i, b) for b, (i, t) in enumerate(p.batch.rows) if t == along]
        mask = p.batch.target_mask.cpu()
        self.positions = [mask[b].nonzero().flatten() for b in range(len(p.batch))]  # response positions per row
        self.width = max(len(x) for x in self.positions)

    def _empty(self, *extra: int) -> np.ndarray:
        return np.full((*self.shape, *extra), np.nan)

    def rows(self, values: torch.Tensor, argmax: torch.Tensor | None) -> np.ndarray:
        """(B,) or (B, K) per row -> (P, R) or (P, R, K); y* is read from the chosen row."""
        out = self._empty(*values.shape[1:])
        v = values.detach().double().cpu().numpy()
        for b, (i, j) in enumerate(self.where):
            out[i, j] = v[b]
        if argmax is not None and ARGMAX in self.p.responses:
            a = argmax.detach().double().cpu().numpy()
            for i, b in self.chosen:
                out[i, self.p.responses.index(ARGMAX)] = a[b]
        return out

    def tokens(self, values: torch.Tensor, argmax: torch.Tensor | None) -> np.ndarray:
        """(B, T[, K]) per response position -> (P, R, W[, K]); y* is read from the chosen row."""
        out = self._empty(self.width, *values.shape[2:])
        v = values.detach().double().cpu()
        for b, (i, j) in enumerate(self.where):
            pos = self.positions[b]
            out[i, j, : len(pos)] = v[b, pos].numpy()
        if argmax is not None and ARGMAX in self.p.responses:
            a = argmax.detach().double().cpu()
            for i, b in self.chosen:
                pos = self.positions[b]
                out[i, self.p.responses.index(ARGMAX), : len(pos)] = a[b, pos].numpy()
        return out



# --- parts on disk ---------------------------------------------------------------------------------------


def anatomy_dataset(run: Run) -> tuple[xr.Dataset, list[str]]:
    """Update statistics of the whole run (streamed), as cube variables, and their warnings."""
    anatomy = update_anatomy(run)
    names = anatomy.tensor_names
    stats = {name: np.array([[getattr(iv.tensors[n], name) for n in names] for iv in anatomy.intervals]) for name in ("update_norm", "param_norm", "update_cos", "zero_frac")}
    lr = np.array([iv.lr for iv in anatomy.intervals])
    ds = cube.build(index={"interval": list(range(len(anatomy.intervals))), "tensor": names}, data=stats, coords={"lr": lr})
    return ds, list(anatomy.warnings)


def fingerprint(path: Path, edge: int = 16 * 2**20) -> str:
    """size + sha256 of the first and last ``edge`` bytes of each file of a checkpoint (cheap for big files)."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in (f for f in files if f.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(edge))
            if size > 2 * edge:
                fh.seek(size - edge)
                h.update(fh.read(edge))
    return h.hexdigest()


def analyze(
    config: AnalysisConfig,
    out: str | Path,
    *,
    device: str = "cpu",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[float, int], None] | None = None,
    command: str = "",
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Compute every missing part, then consolidate the cube at ``out``. Returns its path.

    ``progress(done, intervals)`` counts finished intervals; run serially, it also moves within an interval
    (fractions, one step per batch of ``PROBE_BATCH`` probe rows). ``notify`` gets a one-line estimate of the
    time and memory before the work starts (``plan``)."""
    out = Path(out).resolve()
    if not out.parent.is_dir():
        what = "is a file, not a directory" if out.parent.exists() else "no such directory"
        raise CkptforceError(f"{out.parent}: {what} for the output; create it or choose another -o")
    if out.is_dir():
        raise CkptforceError(f"{out}: is a directory; give the cube's file name with -o, e.g. {out / 'cube.h5'}")
    if out == Path(config.probes).resolve():
        raise CkptforceError(f"{out}: -o is the probe file, which would be overwritten; choose another -o")
    prepared = prepare(config, device)
    run = prepared.run
    for folder in dict.fromkeys([Path(run.root).resolve(), Path(config.run_dir).resolve()]):  # the run, and the folder named
        if folder in out.parents or folder == out.parent:
            raise CkptforceError(f"{out}: the output would be written into the run directory {folder}; choose an -o outside it")
    n = len(run.checkpoints) - 1
    check_or_write_config(out, config)
    check_parts_match(out, run)
    todo = missing_parts(out, n)
    done = n - len(todo)
    if notify and todo:
        notify(plan(prepared, len(todo)))
    if progress:
        progress(done, n)
    within = None if progress is None else (lambda rows, total: progress(done + rows / total, n))
    for k, part in _map_parts(config, todo, device, workers, scheduler, within):
        cube.save(part, part_path(out, k))
        done += 1
        if progress:
            progress(done, n)
    anatomy_ds, warnings = anatomy_dataset(run)
    merged = merge_parts(out, n, anatomy_ds)
    if "kernel" in merged and "lr" in merged.coords:
        # TracIn: Σ_t η_t K_t over the checkpoints that start an interval, η_t that interval's learning rate
        starts = merged["kernel"].isel(checkpoint=slice(0, n)).rename(checkpoint="interval").assign_coords(interval=merged["interval"])
        merged["kernel_tracin"] = (starts * merged["lr"]).sum("interval", min_count=1).drop_vars("lr", errors="ignore")
    attrs = cube.provenance(
        tool_version=__version__, history=command, run_dir=str(run.root), layout=run.layout, config=config.to_json(),
        device=device, dtype=config.dtype, jvp_method=merged.attrs["jvp_method"], step_source=",".join(r.step_source for r in run.checkpoints),
        checkpoint_fingerprints={str(r.path): fingerprint(r.path) for r in run.checkpoints},
        warnings=run.notes + prepared.notes + warnings + _linearisation_warnings(merged) + _split_warnings(merged) + json.loads(merged.attrs["training_notes"]),
        **({"tokenization": prepared.tokenization} if prepared.tokenization else {}),
        attention=prepared.model.attention, **{k: merged.attrs[k] for k in ("objective", "preconditioner", "kernel_method", "kernel_approximate", "feature_layer", "split_method") if k in merged.attrs},
        model_source=prepared.model.source,
    )  # fmt: skip
    final = cube.save(cube.describe(merged.assign_attrs(attrs)), out)
    shutil.rmtree(parts_dir(out))
    return final


def plan(p: Prepared, intervals: int) -> str:
    """One line before a long analysis: what will be computed, one forward timed here, the time and memory."""
    import time

    rows = p.batch.select(list(range(min(len(p.batch), p.chunk_size or len(p.batch)))))
    with p.run.open(p.run.checkpoints[0]) as ckpt:
        theta = p.model.params_from(ckpt, device=p.device, dtype=getattr(torch, p.config.dtype))
    with torch.no_grad():
        start = time.perf_counter()
        p.model.logits(theta, rows)
        one = (time.perf_counter() - start) * len(p.batch) / max(1, len(rows))
    n = forwards_per_interval(p.config.by_tensor, p.config.nodes)
    budget = p.config.memory_gb or (default_memory_gb(p.device) if not p.config.chunk_size else None)
    extra, train = "", 0.0
    if p.training is not None:
        train = _training_forwards(p)
        extra = f" + ~{train:.0f} for the forces of {len(p.training.tset)} training examples"
    memory = f"chunks of {p.chunk_size} rows" + (f" (memory budget {budget:.1f} GiB)" if budget else "")
    return (f"estimate: {intervals} interval(s) × (~{n:.0f} forwards of {len(p.batch)} probe rows{extra}) "
            f"(one forward ≈ {one:.1f} s here): about {duration(intervals * (n + train) * one)}; {memory}")


def _training_forwards(p: Prepared) -> float:
    """The training forces of one interval in forwards over the probe rows (budget.py's costs)."""
    from .training_forces import APPROX_CHECK

    approximate = p.config.forces == "approximate"
    return training_forwards(len(p.training.tset), approximate=approximate, checked=APPROX_CHECK if approximate else 0)


def _linearisation_warnings(ds: xr.Dataset) -> list[str]:
    """One line per interval whose first-order prediction misses more than POOR_LINEARISATION of the change."""
    return [
        f"step {int(a)}→{int(b)}: first-order prediction misses {r:.0%} of the observed change "
        "(remainder ratio); attribute with dlogp_path, or use checkpoints closer together"
        for a, b, r in zip(ds["step_from"].values, ds["step_to"].values, ds["remainder_ratio"].values)
        if r > POOR_LINEARISATION
    ]


def _split_warnings(ds: xr.Dataset) -> list[str]:
    """One line when an interval's split by tensor fell back to per-row gradients (``forces.interval``)."""
    if SPLIT_PER_ROW not in str(ds.attrs.get("split_method", "")).split(","):
        return []
    return [f"split by tensor: on some interval the backprop factors did not add up to the JVP's Δ_lin, so the split there was taken "
            f"from {SPLIT_PER_ROW} (exact, but slower: memory rows × 2 × |θ|); some layer of this model is misread by the factored "
            "rule — please report the architecture"]  # fmt: skip


def _map_parts(config: AnalysisConfig, todo: list[int], device: str, workers: int | None, scheduler: str | None, within=None):
    """(k, part) as each is computed: in order locally (``within`` reports rows done), as completed on Dask."""
    if not todo:
        return
    if not workers and not scheduler:
        for k in todo:
            yield k, compute_part(config.to_json(), k, device, progress=within)
        return
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:
        raise CkptforceError("--workers / --scheduler need Dask distributed: pip install 'ckptforce[parallel]'") from e
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        import dask

        # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands every freed buffer
        # back to the kernel and zero-fills it again on the next allocation, which doubled the time of a
        # part here (measured: 15.6 s → 32 s per interval). Leave glibc's default.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = {client.submit(_remote_part, config.to_json(), k, device, pure=False): k for k in todo}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _remote_part(config_json: str, k: int, device: str) -> xr.Dataset:
    torch.set_num_threads(1)
    return compute_part(config_json, k, device)
