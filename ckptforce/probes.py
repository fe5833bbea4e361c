"""Probe files in, validated and tokenised teacher-forcing batches out.

Language-model probes (DESIGN §3) are JSONL, one object per line, checked against
``schemas/probe_set.schema.json`` (the authority on the format)::

    {"id": "q17", "prompt": "Q: where does Alice live?\\nA:", "split": "train",
     "responses": {"chosen": " Alice lives in Paris.", "rejected": " Alice lives in Rome."}}

* ``load_probe_set(path)``          file -> ``ProbeSet`` (``LmProbe`` per line; JSONL or a ``datasets`` file; in
  ``probe_file.py``, re-exported here); errors name file:line: field;
* ``load_tokenizer(explicit, dirs)`` ``--tokenizer`` or the first checkpoint / run directory holding one;
* ``tokenize(probe_set, tokenizer)`` -> ``TokenizedProbes``: prompt and each response tokenised separately,
  so the prompt/response boundary is exact; ids given in the file are used as they are;
* ``make_batch(tokenized, rows)``    -> ``TokenBatch``: right-padded [prompt ; response] rows with the
  next-token targets of the response positions.

Classification probes are arrays (``.npz`` / ``.pt`` / ``.safetensors``): ``load_class_probes(path)``.
Every user-facing error is a ``ProbeFileError`` / ``TokenizerError`` with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ProbeFileError, TokenizerError
from .names import ARGMAX, RESPONSE_TYPES
from .probe_file import FIELDS, LmProbe, ProbeSet, load_probe_set, schema_path  # noqa: F401 - re-exported
from .sequences import Convention, encode, encode_language_modeling, is_messages

_IDS_HINT = "pass --tokenizer DIR, or give token ids in the probe file (prompt_ids, responses as lists of ids)"

# --- tokenizer --------------------------------------------------------------------------------------------


def _holds_tokenizer(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file())


def load_tokenizer(explicit: Path | None, candidates: list[Path]):
    """The tokenizer for probe text: ``explicit`` (``--tokenizer``: a directory, or a ``tokenizer.json`` file)
    when given, else the first of ``candidates`` (checkpoint directory, run root) holding ``tokenizer.json``
    or ``tokenizer_config.json``. Loaded offline with ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``.

    Raises ``TokenizerError`` listing the places looked when none is found or the one found cannot be loaded.
    """
    if explicit is not None:
        explicit = Path(explicit)
        if explicit.is_file() and explicit.suffix == ".json":
            return _load_tokenizer_at(explicit)
        if not _holds_tokenizer(explicit):
            raise TokenizerError(f"--tokenizer {explicit}: no tokenizer.json or tokenizer_config.json there; "
                                 "give the directory a tokenizer was saved to (save_pretrained), "
                                 "or give token ids in the probe file")  # fmt: skip
        return _load_tokenizer_at(explicit)
    candidates = [Path(c) for c in candidates]
    for d in candidates:
        if _holds_tokenizer(d):
            return _load_tokenizer_at(d)
    looked = ", ".join(dict.fromkeys(str(d) for d in candidates)) or "nowhere: no directory was given"
    raise TokenizerError(f"no tokenizer found (looked in: {looked}); {_IDS_HINT}")


def _load_tokenizer_at(where: Path):
    try:
        if where.is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(where))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- any loader failure becomes one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"{where}: the tokenizer there cannot be loaded ({first}); {_IDS_HINT}") from e


# --- tokenisation and batches -----------------------------------------------------------------------------


@dataclass
class TokenizedProbes:
    probe_set: ProbeSet
    prompt_ids: list[list[int]]  # per probe
    response_ids: list[dict[str, list[int]]]  # per probe: response type -> ids
    prompt_cut: list[list[int]] = field(default_factory=list)  # per probe: prompt tokens left out at the boundary

    def __len__(self) -> int:
        return len(self.prompt_ids)


def tokenize(probe_set: ProbeSet, tokenizer=None, *, convention: Convention = Convention(), max_length: int | None = None,
             vocab_size: int | None = None) -> TokenizedProbes:  # fmt: skip
    """Token ids for every prompt and response: ``ProbeSet`` (+ tokenizer) in, ``TokenizedProbes`` out.

    Text and conversations become the ids the trainer fed the model (``sequences.encode``: TRL's rules — the
    tokenizer's special tokens such as BOS, the EOS text appended when ``convention.eos``, the prompt and
    prompt+response tokenized whole and the response taken from their common prefix, chat templates for
    messages); ids given in the file are kept as they are. With ``max_length`` (the model's context) a prompt +
    response longer than it is an error: responses are never truncated; with ``vocab_size`` so is a token id
    the model's embedding does not have.
    """
    prompts: list[list[int]] = []
    responses: list[dict[str, list[int]]] = []
    cuts: list[list[int]] = []
    for p in probe_set.probes:
        where = f"{probe_set.path}:{p.line}"
        if tokenizer is None:
            _needs_no_tokenizer(p, where)
        if p.prompt is None and p.prompt_ids is None:  # a language-modeling training row (text / messages)
            enc = encode_language_modeling(tokenizer, p.responses["completion"], convention, where=where)
        else:
            enc = encode(tokenizer, p.prompt_ids if p.prompt_ids is not None else p.prompt, p.responses, convention, where=where)
        pids = enc.prompt_ids
        if not pids:
            why = (" (prompt and response merge into one token at the boundary: end the prompt on a token boundary)"
                   if enc.prompt_cut else "")  # fmt: skip
            raise ProbeFileError(f"{where}: prompt: tokenizes to no tokens (probe '{p.id}'){why}; give a prompt of at "
                                 "least one token: something must predict the first response token")  # fmt: skip
        _check_vocab(pids, vocab_size, where, "prompt", p.id)
        rids: dict[str, list[int]] = {}
        for rtype, ids in enc.response_ids.items():
            field_name = f"responses.{rtype}"
            if not ids:
                raise ProbeFileError(f"{where}: {field_name}: tokenizes to no tokens (probe '{p.id}'); "
                                     "give text of at least one token, or token ids")  # fmt: skip
            _check_vocab(ids, vocab_size, where, field_name, p.id)
            if max_length is not None and len(pids) + len(ids) > max_length:
                raise ProbeFileError(
                    f"{where}: {field_name}: probe '{p.id}' prompt + response is {len(pids) + len(ids)} tokens "
                    f"({len(pids)} + {len(ids)}), the model's context is {max_length}; "
                    "shorten it — responses are never truncated silently")  # fmt: skip
            rids[rtype] = ids
        prompts.append(list(pids))
        responses.append(rids)
        cuts.append(enc.prompt_cut)
    return TokenizedProbes(probe_set, prompts, responses, cuts)


def _needs_no_tokenizer(p: LmProbe, where: str) -> None:
    """A TokenizerError naming the first field of ``p`` that is text (or messages): it needs a tokenizer."""
    fields = [("prompt", p.prompt)] + [(f"responses.{t}", r) for t, r in p.responses.items()]
    for name, value in fields:
        if value is not None and not (isinstance(value, list) and not is_messages(value)):
            raise TokenizerError(f"{where}: {name}: probe '{p.id}' is text and no tokenizer is known; {_IDS_HINT}")


def boundary_note(tok: TokenizedProbes, tokenizer, what: str = "probes") -> str | None:
    """One line when some prompts lost tokens at the prompt/response boundary (TRL warns of the same), else None."""
    cut = [(p, c) for p, c in zip(tok.probe_set.probes, tok.prompt_cut) if c]
    if not cut:
        return None
    probe, ids = cut[0]
    shown = tokenizer.decode(ids) if tokenizer is not None else str(ids)
    return (f"{len(cut)} of {len(tok)} {what}: the tokenized prompt is not a prefix of prompt + response (tokens merge "
            f"across the boundary, or the chat template renders the prompt differently); as the trainer does, the "
            f"response starts where they diverge and the prompt's end is left out (e.g. {probe.id}: {shown!r})")  # fmt: skip


def _check_vocab(ids: list[int], vocab_size: int | None, where: str, field: str, probe_id: str) -> None:
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise ProbeFileError(f"{where}: {field}: token id {max(ids)} of probe '{probe_id}' is outside the model's "
                             f"vocabulary (ids 0 … {vocab_size - 1}); give ids of the run's tokenizer, or pass it "
                             "with --tokenizer")  # fmt: skip


@dataclass
class TokenBatch:
    """Rows of teacher-forced sequences; row b is [prompt ; response] of one probe and one response type.

    With prompt length Lp and response length Lr, the response tokens sit at positions Lp .. Lp+Lr-1, so the
    logits at t = Lp-1 .. Lp+Lr-2 predict them: there ``target_mask`` is True and ``targets[b, t] =
    input_ids[b, t+1]``. log π(y|x) of row b = Σ_t target_mask · log_softmax(logits)[b, t, targets[b, t]].
    """

    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    targets: torch.Tensor  # (B, T) long: next token where target_mask, else 0
    target_mask: torch.Tensor  # (B, T) bool: True where the NEXT token is a response token
    rows: list[tuple[int, str]]  # (probe index, response type) of each row

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> "TokenBatch":
        """The same batch with every tensor on ``device``."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                          self.target_mask.to(device), list(self.rows))  # fmt: skip

    def select(self, index: list[int] | slice) -> "TokenBatch":
        """Rows ``index`` (a list of row numbers or a slice), padding trimmed to the longest row kept."""
        every = range(len(self.rows))
        picked = list(every[index]) if isinstance(index, slice) else [every[int(i)] for i in index]  # IndexError
        at = torch.tensor(picked, dtype=torch.long, device=self.input_ids.device)
        mask = self.attention_mask.index_select(0, at)  # (b, T)
        width = int(mask.sum(1).max()) if picked else 0
        cut = lambda t: t.index_select(0, at)[:, :width]  # noqa: E731
        return TokenBatch(cut(self.input_ids), mask[:, :width], cut(self.targets), cut(self.target_mask),
                          [self.rows[i] for i in picked])  # fmt: skip


def _types_in_order(tok: TokenizedProbes) -> list[str]:
    """``probe_set.response_types``, then types only in ``response_ids`` (e.g. an ``argmax`` added later)."""
    order = tok.probe_set.response_types
    extra = dict.fromkeys(t for r in tok.response_ids for t in r if t not in order)
    return order + list(extra)


def make_batch(tok: TokenizedProbes, rows: list[tuple[int, str]] | None = None, *, pad_id: int = 0) -> TokenBatch:
    """Pack (probe index, response type) rows into one right-padded ``TokenBatch``.

    ``rows=None`` takes every response present, probe-major, types in ``response_types`` order.
    """
    if rows is None:
        order = _types_in_order(tok)
        rows = [(i, t) for i, r in enumerate(tok.response_ids) for t in order if t in r]
    rows = [(int(i), t) for i, t in rows]
    seqs: list[tuple[list[int], list[int]]] = []
    for i, t in rows:
        if not 0 <= i < len(tok.prompt_ids):
            raise IndexError(f"row ({i}, {t!r}): probe index out of range (there are {len(tok.prompt_ids)} probes)")
        if t not in tok.response_ids[i]:
            raise KeyError(f"row ({i}, {t!r}): probe {i} has no response '{t}' (it has: "
                           f"{', '.join(tok.response_ids[i])})")  # fmt: skip
        if not tok.prompt_ids[i]:
            p = tok.probe_set.probes[i]
            raise ProbeFileError(f"{tok.probe_set.path}:{p.line}: prompt: probe '{p.id}' has no prompt tokens; "
                                 "give at least one: something must predict the first response token")  # fmt: skip
        seqs.append((tok.prompt_ids[i], tok.response_ids[i][t]))
    B, T = len(seqs), max((len(p) + len(r) for p, r in seqs), default=0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    targets = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    target_mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    for b, (p, r) in enumerate(seqs):
        lp, lr = len(p), len(r)
        input_ids[b, : lp + lr] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[b, : lp + lr] = 1
        targets[b, lp - 1 : lp + lr - 1] = torch.tensor(r, dtype=torch.long)
        target_mask[b, lp - 1 : lp + lr - 1] = True
    return TokenBatch(input_ids, attention_mask, targets, target_mask, rows)


# Classification probes live in their own module; re-exported so ``ckptforce.probes`` is the one place to look.
from .class_probes import ClassBatch, ClassProbeSet, load_class_probes, make_class_batch  # noqa: E402

__all__ = [
    "ARGMAX", "RESPONSE_TYPES", "ClassBatch", "ClassProbeSet", "LmProbe", "ProbeSet", "TokenBatch", "TokenizedProbes",
    "load_class_probes", "load_probe_set", "load_tokenizer", "make_batch", "make_class_batch", "tokenize",
]  # fmt: skip
