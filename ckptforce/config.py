"""The settings of an analysis: every one that changes the numbers, stored in the cube and checked on resume.

``AnalysisConfig.for_run(run_dir, probes, **options)`` resolves paths and hashes the input files (a data-set
folder by every file in it, ``datafiles.sha256``), so a re-run on changed inputs is refused, naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import datafiles
from .errors import CkptforceError, ProbeFileNotFoundError
from .forces.interval import DEFAULT_NODES
from .sequences import load_chat_template


def _help(text: str):
    return field(metadata={"help": text})


@dataclass(frozen=True)
class AnalysisConfig:
    """Every setting that changes the numbers; stored in the cube and checked when a run resumes."""

    run_dir: str = _help("the run directory")
    probes: str = _help("the probe file")
    probes_sha256: str = _help("hash of the probe file's bytes")
    init: str | None = dataclasses.field(default=None, metadata={"help": "model the run started from (--init)"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "package.module:factory (--model)"})
    base_model: str | None = dataclasses.field(default=None, metadata={"help": "base model under a LoRA adapter"})
    tokenizer: str | None = dataclasses.field(default=None, metadata={"help": "tokenizer folder (--tokenizer)"})
    layout: str | None = dataclasses.field(default=None, metadata={"help": "forced checkpoint layout"})
    nodes: int = dataclasses.field(default=DEFAULT_NODES, metadata={"help": "Gauss–Legendre nodes of Δ_path (0: none)"})
    by_tensor: bool = dataclasses.field(default=True, metadata={"help": "split Δ_lin and Δ_path by tensor"})
    split_by: str = dataclasses.field(default="tensor", metadata={"help": "what the split sums over: tensor, layer (module) or block (--split-by)"})
    method: str = dataclasses.field(default="auto", metadata={"help": "J·v by jvp, double_vjp or auto"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "arithmetic dtype of the forces"})
    chunk_size: int | None = dataclasses.field(default=None, metadata={"help": "probe rows per forward / JVP (None: from the memory budget)"})
    memory_gb: float | None = dataclasses.field(default=None, metadata={"help": "memory budget of the analysis in GiB: parameters held, then chunks (--memory; None: from the machine)"})
    trust_pickles: bool = dataclasses.field(default=False, metadata={"help": "allow full unpickling"})
    train: str | None = dataclasses.field(default=None, metadata={"help": "training-examples file (--train)"})
    train_sha256: str | None = dataclasses.field(default=None, metadata={"help": "hash of the training-examples file"})
    objective: str | None = dataclasses.field(default=None, metadata={"help": "training objective (--objective; else the file / trainer)"})
    feature_layer: str | None = dataclasses.field(default=None, metadata={"help": "submodule whose output is tracked (--feature-layer)"})
    topk: int = dataclasses.field(default=0, metadata={"help": "next-token distribution kept per response token and checkpoint: its top k (--topk; 0: none)"})
    forces: str = dataclasses.field(default="exact", metadata={"help": "training-example forces: exact, or approximate (--forces)"})
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "the trainer's gradient clipping (--max-grad-norm; 0: none)"})
    kernel_projection: int | None = dataclasses.field(default=None, metadata={"help": "sketch size of the approximate kernels (--kernel-projection; None: exact)"})
    special_tokens: bool = dataclasses.field(default=True, metadata={"help": "add the tokenizer's special tokens (BOS) to text, as the trainer did"})
    probe_eos: bool = dataclasses.field(default=False, metadata={"help": "append eos_token to probe responses (--probe-eos)"})
    train_eos: bool = dataclasses.field(default=True, metadata={"help": "append eos_token to training completions / chosen / rejected, as TRL does"})
    chat_template: str | None = dataclasses.field(default=None, metadata={"help": "Jinja chat template file (--chat-template; else the tokenizer's)"})
    chat_template_sha256: str | None = dataclasses.field(default=None, metadata={"help": "hash of the chat template file"})
    columns: dict[str, str] = dataclasses.field(default_factory=dict, metadata={"help": "the files' columns renamed to TRL's names (--prompt-column …): ours -> theirs"})

    @classmethod
    def for_run(cls, run_dir, probes, **kw) -> "AnalysisConfig":
        probes = Path(probes)
        if not datafiles.exists(probes):
            what = "is a directory, not a probe file" if probes.is_dir() else "no such probe file"
            raise ProbeFileNotFoundError(f"{probes}: {what}; give the JSONL file of probes with --probes (or a data set: "
                                         "JSON, parquet, arrow, a save_to_disk folder)")  # fmt: skip
        clean = {k: (str(Path(v).resolve()) if k in ("init", "base_model", "tokenizer", "train", "chat_template") and v else v) for k, v in kw.items()}
        clean["columns"] = {k: v for k, v in (clean.get("columns") or {}).items() if v}
        if clean.get("chat_template"):
            clean["chat_template_sha256"] = hashlib.sha256(load_chat_template(clean["chat_template"]).encode()).hexdigest()
        if clean.get("train"):
            if not datafiles.exists(Path(clean["train"])):
                raise CkptforceError(f"{clean['train']}: no such training-examples file; give the JSONL file (or data set) of "
                                     "training examples with --train")  # fmt: skip
            clean["train_sha256"] = datafiles.sha256(Path(clean["train"]))
        return cls(str(Path(run_dir).resolve()), str(probes.resolve()), datafiles.sha256(probes), **clean)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def differences(self, other: dict) -> list[str]:
        mine = dataclasses.asdict(self)
        return [f"{k}: {other.get(k)!r} (existing parts) vs {mine[k]!r} (now)" for k in mine if other.get(k) != mine[k]]
