"""``ckptforce demo``: build (or reuse) the bundled sample runs, audit each, and say where the reports are.

The runs are trained on demand by the recipes in ``sample_runs/recipes`` (a tiny GPT-2 pretrained on a world
of facts, then SFT with TRL, then DPO and GRPO from the SFT model; a Lightning MLP on scikit-learn's digits with 20 % flipped labels and
a head-probing → fine-tuning pair; the same tiny GPT-2 trained on a compositional mapping and on a permuted one)
and cached (``~/.cache/ckptforce/sample_runs``). Each audit is exactly ``ckptforce audit`` with the probe and
training-example files the recipes write; audits that share a ``compare`` key are also compared from their cubes
(``compare_support``: mutual support and learning speed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import CkptforceError


@dataclass(frozen=True)
class DemoAudit:
    name: str
    recipe: str
    what: str
    run: str  # folder inside the recipe's build
    probes: str
    train: str | None = None
    init: str | None = None
    model: str | None = None
    feature_layer: str | None = None
    shows: str = "trajectories"  # the report section whose verdict the demo prints for this run
    group_by: str | None = None  # the report's --group-by
    compare: str | None = None  # audits with the same key are compared side by side (mutual support, learning speed)
    settings: tuple[tuple[str, object], ...] = ()  # further AnalysisConfig settings, e.g. (("nodes", 0),)


#: The comparison of mutual support reads forces and log-likelihoods only: no path quadrature, no per-tensor split
#: (they would double the time of an analysis with every training example as a probe).
FORCES_ONLY = (("nodes", 0), ("by_tensor", False))

#: What the demo audits, in order (paths relative to the recipe's build folder).
AUDITS = (
    DemoAudit("sft", "lm", "SFT with TRL on a world of facts (hallucination: other_trained rises)", "sft", "probes.jsonl", "train_sft.jsonl",
              shows="hallucination"),
    DemoAudit("dpo", "lm", "DPO with TRL from the SFT model (squeezing: rejected falls, y* rises)", "dpo", "probes.jsonl", "train_dpo.jsonl",
              init="sft/checkpoint-40", shows="squeezing"),
    DemoAudit("grpo", "lm", "GRPO with TRL from the SFT model (lazy likelihood displacement, harmful tokens)", "grpo", "probes.jsonl",
              "train_grpo.jsonl", init="sft/checkpoint-40", shows="lazy_displacement"),
    DemoAudit("digits-noisy", "digits", "Lightning MLP on digits with 20% flipped labels (zig-zag learning paths)", "noisy",
              "probes_noisy.npz", model="sample_runs.recipes.digits:model", shows="learning_paths"),
    DemoAudit("digits-finetune", "digits", "Lightning: fine-tuning after head probing (feature adaptation)", "ft", "probes_test.npz",
              init="hp/epoch=9-step=410.ckpt", model="sample_runs.recipes.digits:model", feature_layer="backbone",
              shows="feature_adaptation"),
    DemoAudit("compose-compositional", "compose", "tiny GPT-2 on a compositional mapping (colour, shape → one word each): "
              "examples of one colour support each other", "compositional", "train_compositional.jsonl", "train_compositional.jsonl",
              init="init", shows="mutual_support", group_by="meta.colour", compare="compose", settings=FORCES_ONLY),
    DemoAudit("compose-permuted", "compose", "the same GPT-2 on the same inputs and outputs, permuted (no shared structure)",
              "permuted", "train_permuted.jsonl", "train_permuted.jsonl", init="init", shows="mutual_support", group_by="meta.colour",
              compare="compose", settings=FORCES_ONLY),
)  # fmt: skip


def recipes_module():
    """``sample_runs.recipes`` from the source tree beside the package (the recipes ship with the repository)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "sample_runs" / "recipes" / "__init__.py").is_file():
        raise CkptforceError(f"{root}: the sample-run recipes are not here (they ship with the source tree); "
                             "clone the repository and install it with pip install -e .")  # fmt: skip
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import sample_runs.recipes as recipes

    return recipes


def run_demo(out: Path, *, only: list[str] | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Build or reuse the sample runs and audit each into ``out/<name>/``; returns one summary per audit."""
    from .pipeline import AnalysisConfig, analyze
    from .report import output_dir, write_report

    recipes = recipes_module()
    out = output_dir(out)
    chosen = [a for a in AUDITS if not only or a.name in only]
    builds = {}
    for name in dict.fromkeys(a.recipe for a in chosen):
        cached = recipes.cached_path(name)
        echo(f"sample run {name}: " + ("cached at " if cached.is_dir() else "training (first time, ~10-20 s) into ") + str(cached))
        builds[name] = recipes.ensure(name)
    summaries = []
    for a in chosen:
        base = builds[a.recipe]
        folder = output_dir(out / a.name)
        start = time.perf_counter()
        echo(f"auditing {a.name}: {a.what}")
        config = AnalysisConfig.for_run(
            base / a.run, base / a.probes, train=str(base / a.train) if a.train else None,
            init=str(base / a.init) if a.init else None, model=a.model, feature_layer=a.feature_layer, **dict(a.settings),
        )  # fmt: skip
        cube_path = analyze(config, folder / "cube.h5", command=f"ckptforce demo ({a.name})")
        paths = write_report(cube_path, folder, group_by=a.group_by)
        summaries.append({"name": a.name, "what": a.what, "shows": a.shows, "cube": str(cube_path), "html": str(paths[0]), "pdf": str(paths[1]),
                          "seconds": round(time.perf_counter() - start, 1), "verdicts": _verdicts(cube_path, a.group_by)})  # fmt: skip
    _compare(chosen, summaries, echo)
    (out / "demo.json").write_text(json.dumps(summaries, indent=1))
    return summaries


def _verdicts(cube_path: Path, group_by: str | None = None) -> dict[str, str]:
    from .cube import open_cube
    from .report.sections import SECTIONS

    ds = open_cube(cube_path)
    results = {s.key: s.diagnostic(ds, by=group_by) if s.grouped and group_by else s.diagnostic(ds) for s in SECTIONS}
    return {key: r.verdict for key, r in results.items() if not r.missing}


def _compare(audits: list[DemoAudit], summaries: list[dict], echo: Callable[[str], None]) -> None:
    """For each ``compare`` key with two or more audits: their mutual support and learning speed side by side, from
    their cubes, as ``comparison`` in each of their summaries."""
    from .cube import open_cube
    from .report.diagnostics_support import compare_support

    by_name = {s["name"]: s for s in summaries}
    for key in dict.fromkeys(a.compare for a in audits if a.compare):
        members = [a for a in audits if a.compare == key]
        if len(members) < 2:
            continue
        runs = {a.run: open_cube(by_name[a.name]["cube"]) for a in members}
        d = compare_support(runs, by=members[0].group_by)
        line = d.verdict or d.missing
        echo(f"comparing {key}: {line}")
        for a in members:
            by_name[a.name]["comparison"] = line
