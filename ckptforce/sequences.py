"""Texts in, the token ids the trainer fed the model out — for probes and training examples alike.

A number is right only for the sequence the run trained on, so text is tokenized by the trainer's rules, not by
ckptforce's own. The rules are TRL's (``SFTTrainer`` / ``DPOTrainer._prepare_dataset``, TRL ≥ 0.20), which
are also what ``transformers.Trainer`` runs see when their data was tokenized with the tokenizer's defaults:

    text rows            prompt_ids = tok(prompt)                          special tokens as the tokenizer adds
                         full_r     = tok(prompt + response_r [+ eos])      them (BOS); the EOS *text* appended
                                                                            unless already there (TRL: completion,
                                                                            chosen, rejected; probes: off)
    conversational rows  prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)
                         full_r     = apply_chat_template(prompt + response_r)   (no EOS: the template ends turns)
    boundary             n = min_r common_prefix(prompt_ids, full_r)        (TRL's ``common_prefix_length``; the
                         prompt = full_r[:n],  response_r = full_r[n:]       min over responses is DPO's rule)

Tokenizing the prompt and the response separately instead can split a BPE merge at the boundary and drops the
BOS; both change every number. Token ids given in a file are used as they are (a text response after a prompt
given as ids is tokenized on its own, without special tokens). A language-modeling row (TRL's ``messages`` or
``text``, no prompt) is trained on every token after the first, as TRL's default loss is.

* ``Convention``         the switches (frozen; stored in the cube);
* ``encode(tok, prompt, responses, convention, where=…)`` -> ``Encoded``;
* ``describe(tok, convention)``  -> what the cube records: BOS added, EOS appended, template and tokenizer hashes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import ProbeFileError, TokenizerError

#: Roles a chat message may have (TRL / transformers chat templates).
ROLES = ("system", "user", "assistant", "tool", "developer")
#: Files of a saved tokenizer that decide how text becomes ids (hashed into the cube).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")  # fmt: skip

Text = str
Messages = list  # [{"role": ..., "content": ...}, ...]
Ids = list  # [int, ...]


@dataclass(frozen=True)
class Convention:
    """How text becomes the ids the trainer saw. The defaults are TRL's."""

    special_tokens: bool = True  # add the special tokens the tokenizer adds by default (BOS), as tok(text) does
    eos: bool = False  # append the tokenizer's eos_token to text responses unless already there
    chat_template: str | None = None  # a Jinja chat template replacing the tokenizer's own (--chat-template)


@dataclass
class Encoded:
    prompt_ids: list[int]  # the shared prompt: full_r[:n]
    response_ids: dict[str, list[int]]  # response name -> full_r[n:]
    prompt_cut: list[int]  # prompt tokens left out because prompt and prompt+response diverge before its end


def is_messages(value) -> bool:
    """A conversational value: a non-empty list of {"role", "content"} objects."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def as_text(value) -> str:
    """A one-line display of a prompt or response for the cube and the report: text as is, messages as
    ``role: content`` joined by `` | ``, ids as ""."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        return " | ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    return ""


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Leading tokens ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(tokenizer, prompt, responses: dict, convention: Convention = Convention(), *, where: str = "") -> Encoded:
    """The trainer's ids for one row: ``prompt`` (text, messages or ids) and named ``responses`` (each text,
    messages or ids) in, the shared prompt and each response's ids out. ``where`` (``file:line``) prefixes errors.
    """
    if is_ids(prompt) and prompt:
        return Encoded(list(prompt), {k: _alone(tokenizer, v, convention, where, k) for k, v in responses.items()}, [])
    if tokenizer is None:
        raise TokenizerError(f"{where}: the prompt is text and no tokenizer is known; pass --tokenizer DIR, or give token ids")
    chat = is_messages(prompt)
    if chat:
        template = _template(tokenizer, convention, where)
        prompt_ids = _chat(tokenizer, prompt, template, where, generation=True)
    else:
        prompt_ids = _call(tokenizer, prompt, convention.special_tokens)
    fulls: dict[str, list[int]] = {}
    given: dict[str, list[int]] = {}
    for name, r in responses.items():
        if is_ids(r):
            given[name] = list(r)
        elif chat:
            turn = r if is_messages(r) else [{"role": "assistant", "content": r}]
            fulls[name] = _chat(tokenizer, list(prompt) + list(turn), template, where)
        elif isinstance(r, str):
            fulls[name] = _call(tokenizer, prompt + _with_eos(tokenizer, r, convention), convention.special_tokens)
        else:
            raise ProbeFileError(f"{where}: {name}: a conversational response (messages) needs a conversational prompt; "
                                 "give the prompt as messages too, or the response as text")  # fmt: skip
    n = min((common_prefix_length(prompt_ids, f) for f in fulls.values()), default=len(prompt_ids))
    out = {name: (fulls[name][n:] if name in fulls else given[name]) for name in responses}
    return Encoded(prompt_ids[:n], out, prompt_ids[n:])


def encode_language_modeling(tokenizer, row, convention: Convention = Convention(), *, where: str = "") -> Encoded:
    """A row without a prompt (TRL's ``text`` or ``messages``): the whole sequence is trained on, so the
    'prompt' is its first token and the 'completion' every token after it (labels = input_ids, shifted)."""
    if tokenizer is None:
        raise TokenizerError(f"{where}: the example is text and no tokenizer is known; pass --tokenizer DIR")
    if is_messages(row):
        ids = _chat(tokenizer, row, _template(tokenizer, convention, where), where)
    else:
        ids = _call(tokenizer, _with_eos(tokenizer, row, convention), convention.special_tokens)
    if len(ids) < 2:
        raise ProbeFileError(f"{where}: the example tokenizes to {len(ids)} token(s); a language-modeling example needs two or more")
    return Encoded(ids[:1], {"completion": ids[1:]}, [])


def _alone(tokenizer, value, convention: Convention, where: str, name: str) -> list[int]:
    """A response after a prompt given as ids: ids as they are; text tokenized on its own (no special tokens)."""
    if is_ids(value):
        return list(value)
    if not isinstance(value, str):
        raise ProbeFileError(f"{where}: {name}: messages need a conversational prompt, not prompt_ids; give the prompt as messages")
    if tokenizer is None:
        raise TokenizerError(f"{where}: {name}: the response is text and no tokenizer is known; pass --tokenizer DIR, or give token ids")
    return _call(tokenizer, _with_eos(tokenizer, value, convention), False)


def _with_eos(tokenizer, text: str, convention: Convention) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if convention.eos and eos and not text.endswith(eos):
        return text + eos
    return text


def _call(tokenizer, text: str, special_tokens: bool) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=special_tokens)["input_ids"]]


def _template(tokenizer, convention: Convention, where: str) -> str:
    template = convention.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise TokenizerError(f"{where}: the row is conversational (messages) but the tokenizer has no chat template; "
                             "pass --chat-template FILE (the Jinja template the run was trained with)")  # fmt: skip
    return template if isinstance(template, str) else template.get("default", next(iter(template.values())))


def _chat(tokenizer, messages: list, template: str, where: str, *, generation: bool = False) -> list[int]:
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ProbeFileError(f"{where}: a message must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}; "
                                 f"found {str(m)[:60]}")  # fmt: skip
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation,
                                            tokenize=True, return_dict=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- a user's Jinja template may fail in any way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise TokenizerError(f"{where}: the chat template cannot render this row ({first}); fix the template "
                             "(--chat-template FILE) or the messages") from e  # fmt: skip
    ids = out["input_ids"]
    return [int(i) for i in (ids[0] if ids and isinstance(ids[0], list) else ids)]


def adds_bos(tokenizer, convention: Convention = Convention()) -> bool:
    """Whether tok(text) starts with the BOS token under ``convention``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None or not convention.special_tokens:
        return False
    ids = _call(tokenizer, "a", True)
    return bool(ids) and ids[0] == bos


def files_sha256(folder: Path | None) -> str:
    """sha256 over the tokenizer files in ``folder`` (names and bytes), "" when there is none."""
    if folder is None or not Path(folder).is_dir():
        return ""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = Path(folder) / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest() if found else ""


def template_sha256(tokenizer, convention: Convention) -> str:
    template = convention.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return ""
    text = template if isinstance(template, str) else repr(sorted(template.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def describe(tokenizer, *, probe: Convention, train: Convention | None, template_source: str) -> dict:
    """The tokenization the cube records: rule, BOS added, EOS appended (probes / training examples), the chat
    template's source and hash, the tokenizer's folder and the hash of its files."""
    folder = getattr(tokenizer, "name_or_path", "") or ""
    return {
        "rule": "trl: prompt and prompt+response tokenized whole, response from the common prefix",
        "special_tokens": probe.special_tokens,
        "bos_added": adds_bos(tokenizer, probe),
        "bos_token": getattr(tokenizer, "bos_token", None) or "",
        "eos_token": getattr(tokenizer, "eos_token", None) or "",
        "probe_eos": probe.eos,
        "train_eos": train.eos if train is not None else None,
        "chat_template": template_source,
        "chat_template_sha256": template_sha256(tokenizer, probe) if tokenizer is not None else "",
        "tokenizer": str(folder),
        "tokenizer_sha256": files_sha256(Path(folder)) if folder else "",
    }


def load_chat_template(path) -> str:
    """A chat template from ``--chat-template FILE``: a Jinja file, or a JSON file (``tokenizer_config.json``,
    ``chat_template.json``) holding ``"chat_template"``."""
    import json

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"--chat-template {path}: no such file; give the Jinja template file (or a tokenizer_config.json holding one)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"--chat-template {path}: cannot be read as UTF-8 text ({e}); give the Jinja template file") from e
    if path.suffix == ".json":
        try:
            template = json.loads(text).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise TokenizerError(f"--chat-template {path}: not a JSON object; give a .jinja file or a JSON file with a 'chat_template' key") from e
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template.strip():
            raise TokenizerError(f"--chat-template {path}: no 'chat_template' text in it; give the Jinja template file")
        return template
    if not text.strip():
        raise TokenizerError(f"--chat-template {path}: the file is empty; give the Jinja template the run was trained with")
    return text


def kinds(rows) -> set[str]:
    """What the prompts of ``rows`` (objects with ``prompt`` / ``prompt_ids`` / ``responses``) are: "text",
    "messages", "ids" (a language-modeling row counts by its sequence)."""
    out = set()
    for r in rows:
        value = r.prompt_ids if r.prompt_ids is not None else (r.prompt if r.prompt is not None else r.responses.get("completion"))
        out.add("messages" if is_messages(value) else "ids" if is_ids(value) else "text")
    return out


def consistency_notes(tokenizer, *, probe: Convention, probe_kinds: set[str], train: Convention | None = None,
                      train_kinds: set[str] | None = None, own_tokenizer_sha256: str = "") -> list[str]:  # fmt: skip
    """Warnings where probes and training examples are tokenized differently from each other or from the
    trainer: BOS left out, chat template used on one side only, EOS on one side only, another tokenizer."""
    notes = []
    if tokenizer is not None and not probe.special_tokens and adds_bos(tokenizer, Convention()):
        notes.append(f"sequences are built without the special tokens the tokenizer adds ({tokenizer.bos_token} first), "
                     "which the trainer fed the model; drop --no-special-tokens unless the run was tokenized that way")  # fmt: skip
    if train_kinds:
        if "text" in probe_kinds and "messages" in train_kinds:
            notes.append("the probes are plain text but the training examples are conversations: the probes are scored "
                         "without the chat template the run trained with; write the probes' prompts as messages")  # fmt: skip
        if "messages" in probe_kinds and "text" in train_kinds:
            notes.append("the probes are conversations but the training examples are plain text: the probes are scored "
                         "with a chat template the run did not train with; write the probes as text")  # fmt: skip
        if train is not None and train.eos != probe.eos and "text" in probe_kinds | train_kinds:
            side = ("training responses end with the EOS the trainer appended; probe responses are scored without it "
                    "(pass --probe-eos to score them as trained)") if train.eos else ("probe responses end with EOS; "
                    "training responses do not (--no-train-eos)")  # fmt: skip
            notes.append(side)
    elif tokenizer is not None and "text" in probe_kinds and getattr(tokenizer, "chat_template", None) and not probe.chat_template:
        notes.append("the run's tokenizer has a chat template but the probes are plain text: if the run trained on "
                     "conversations, write the prompts as messages so that the probes are scored as the model saw them")  # fmt: skip
    mine = files_sha256(Path(getattr(tokenizer, "name_or_path", "") or "")) if tokenizer is not None else ""
    if own_tokenizer_sha256 and mine and mine != own_tokenizer_sha256:
        notes.append(f"the tokenizer used ({tokenizer.name_or_path}) differs from the one saved with the run: "
                     "token ids may not be the ones the model trained on; drop --tokenizer to use the run's own")  # fmt: skip
    return notes
