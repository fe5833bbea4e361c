"""The ``ckptforce`` command line: thin click commands over the library.

A ``CkptforceError`` (bad input the user can fix) is printed as one line on stderr with exit code 2 and no
traceback; ``--debug`` shows the traceback. The tool only reads the run directory; it never writes into it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .datafiles import COLUMNS
from .demo import AUDITS
from .errors import CkptforceError

#: The names of ckptforce.io.LAYOUTS (spelt out so that --help does not import torch; a test keeps them equal).
LAYOUT_NAMES = ["fsdp", "deepspeed", "dcp", "peft", "hf", "lightning", "safetensors", "torch"]

EXIT_USER_ERROR = 2
GROUP_BY_HELP = ("Group the forgetting and hallucination views by this probe label: split, group, or a field of the probe "
                 "file's own (meta.attr for {\"meta\": {\"attr\": …}}, or an extra column's name).")


class _Group(click.Group):
    """Turns user errors into one line and an exit code; ``--debug`` keeps the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CkptforceError as e:
            if ctx.meta.get("ckptforce.debug"):
                raise
            one_line = str(e).replace("\r", "\\r").replace("\n", "\\n")  # user text in a message stays on one line
            click.echo(f"ckptforce: error: {one_line}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("ckptforce: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckptforce")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Audit a training run from its saved checkpoints.

    ckptforce reads the checkpoints a trainer wrote (Hugging Face Trainer / TRL, PEFT, Lightning,
    torch.save loops, safetensors, torch.distributed.checkpoint), reconstructs each update between
    consecutive checkpoints, and explains how the model's predictions moved.

    It only reads: nothing is written into the run directory, nothing is downloaded, and pickled files
    that could run code are refused unless you pass --trust-pickles.
    """
    ctx.meta["ckptforce.debug"] = debug


def _run_options(f):
    f = click.option("--trust-pickles", is_flag=True, help="Allow full unpickling of files that need it (only for files you trust: a pickle can run code).")(f)
    f = click.option("--layout", type=click.Choice(LAYOUT_NAMES), help="Force a checkpoint layout instead of detecting it.")(f)
    f = click.option("--init", "init", type=click.Path(path_type=Path), help="The model the run started from (file or folder, any layout), added as the first checkpoint.")(f)
    return f


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@_run_options
@click.option("--json", "as_json", is_flag=True, help="Print the scan as JSON (schemas/scan.schema.json) instead of a table.")
@click.option("--no-optimizer", is_flag=True, help="Skip reading saved optimizer state (faster on big runs).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def scan(run_dir: Path, init: Path | None, layout: str | None, trust_pickles: bool, as_json: bool, no_optimizer: bool, quiet: bool) -> None:
    """Show what RUN_DIR holds: checkpoints, layout, steps and where they came from, dtypes, sizes,
    parameter counts, and the update between consecutive checkpoints (norm, relative size, cosine with
    the previous update, share of exactly-zero entries, learning rate). No model or probes needed.

    \b
    Examples:
      ckptforce scan out/                      # a Hugging Face Trainer output dir
      ckptforce scan dpo_out/ --init sft_out/checkpoint-500
      ckptforce scan lightning_logs/version_0/checkpoints --json > scan.json
    """
    from rich.console import Console

    from .io import open_run
    from .scan import render, summarise
    from .updates import update_anatomy

    run = open_run(run_dir, init=init, layout=layout, trust_pickles=trust_pickles)
    progress = None if (quiet or as_json or not sys.stderr.isatty()) else _progress_bar()
    try:
        anatomy = update_anatomy(run, optimizer=not no_optimizer, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    summary = summarise(run, anatomy)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        render(summary, Console(width=None if sys.stdout.isatty() else 160))


def _analysis_options(f):
    """The options of an analysis, shared by ``analyze`` and ``audit``."""
    options = [
        click.option("--probes", required=True, type=click.Path(path_type=Path), help="Probe file (JSONL, schemas/probe_set.schema.json; "
                     "or a data set: JSON, parquet, arrow, a save_to_disk folder)."),
        click.option("--train", type=click.Path(path_type=Path), help="Training examples the run used (JSONL in TRL's format, "
                     "schemas/train_set.schema.json, or a data set as for --probes): adds the force of each example on each probe."),
        *[click.option(f"--{c}-column", metavar="NAME", help=f"The column of --train / --probes that holds '{c}' (default: {c}, "
                       "TRL's name).") for c in COLUMNS],
        click.option("--objective", type=click.Choice(["sft", "ce", "unlearn", "dpo", "ipo", "simpo", "grpo", "kd"]),
                     help="Training objective of --train (default: the file's header, the trainer's record, else the examples' shape)."),
        click.option("--feature-layer", metavar="NAME", help="Track the output of this submodule (e.g. backbone, transformer.ln_f) "
                     "for every probe at every checkpoint: feature adaptation (drift, cosine with the first checkpoint)."),
        click.option("--forces", "forces_mode", type=click.Choice(["exact", "approximate"]), default="exact", show_default=True,
                     help="Training-example forces: exact (one contraction per example), or approximate for large training sets "
                          "(Adam's P fitted rank-one per matrix, ghost products; its error against the exact forces of 8 examples "
                          "is stored as force_approx_error)."),
        click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True, metavar="X",
                     help="The trainer's gradient clipping (TrainingArguments.max_grad_norm; 0 for none): each step's examples are "
                          "scaled by min(1, X / grad_norm) with the grad_norm the trainer logged for that step."),
        click.option("--kernel-projection", type=click.IntRange(1), metavar="DIM",
                     help="Approximate the probe × training-example kernels by a seeded random sketch of DIM coordinates per "
                          "tensor (for very large training sets); the cube labels them approximate. Default: exact."),
        click.option("--topk", type=click.IntRange(0), default=0, show_default=True, metavar="K", help="Keep the top K of the "
                     "next-token distribution at every response token and checkpoint (for export filter-kd on language models; "
                     "one forward per checkpoint more; 0: off)."),
        _run_options,
        click.option("--model", "model", help="package.module:factory returning the nn.Module (default: the run's config.json)."),
        click.option("--base-model", type=click.Path(path_type=Path), help="Base model folder under a LoRA adapter (default: the local folder adapter_config.json names)."),
        click.option("--tokenizer", type=click.Path(path_type=Path), help="Tokenizer folder (default: the checkpoint's, then the run root's)."),
        click.option("--chat-template", type=click.Path(path_type=Path), help="Jinja chat template for conversational probes / "
                     "examples (messages), or a tokenizer_config.json holding one (default: the tokenizer's own)."),
        click.option("--probe-eos", is_flag=True, help="Append the tokenizer's eos_token to probe responses (default: scored "
                     "without it, as the papers' probes are)."),
        click.option("--train-eos/--no-train-eos", default=True, show_default=True, help="Append eos_token to the training "
                     "examples' completion / chosen / rejected / text, as TRL does; --no-train-eos for runs tokenized without it."),
        click.option("--special-tokens/--no-special-tokens", default=True, show_default=True, help="Add the special tokens "
                     "the tokenizer adds by default (BOS), as the trainer's tokenizer(text) did."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, or cuda:N."),
        click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]), default="float32", show_default=True,
                     help="Arithmetic dtype of the model: float64 for exact checks, bfloat16 / float16 for large models on a GPU "
                          "(softmax, reductions and Δθ stay float32; the cube records it)."),
        click.option("--nodes", type=click.IntRange(0, 16), default=None, help="Gauss–Legendre nodes of the path attribution (0: skip it).  [default: 2]"),
        click.option("--no-by-tensor", is_flag=True, help="Skip the split of the changes by parameter tensor (faster)."),
        click.option("--split-by", type=click.Choice(["tensor", "layer", "block"]), default="tensor", show_default=True,
                     help="What the split sums over: each parameter tensor, each module (layer: weight and bias together), or "
                          "each transformer block (block: model.layers.N); a smaller cube for deep models, the same sums."),
        click.option("--method", type=click.Choice(["auto", "jvp", "double_vjp"]), default="auto", show_default=True, help="How J·Δθ is computed."),
        click.option("--memory", "memory_gb", type=click.FloatRange(min=0.05), metavar="GB", help="Memory budget of the analysis "
                     "in GiB: the parameters it holds (θ_t, θ_t+1, Δθ, the model), then chunks of probe rows, and of response "
                     "positions × vocabulary in the LM head, sized to fit it whatever the response length and vocabulary "
                     "(default: a quarter of RAM, at most 8; half the GPU's free memory on cuda)."),
        click.option("--chunk-size", type=click.IntRange(1), default=None, help="Probe rows per forward / JVP, instead of sizing chunks from --memory."),
        click.option("--workers", type=click.IntRange(1), help="Run checkpoint pairs on a local Dask cluster of N worker processes."),
        click.option("--scheduler", help="Run checkpoint pairs on an existing Dask cluster (tcp://host:8786)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _run_analysis(run_dir, out, *, probes, train, objective, feature_layer, topk, forces_mode, max_grad_norm, kernel_projection, init, layout, trust_pickles, model, base_model, tokenizer, chat_template, probe_eos, train_eos, special_tokens, device, dtype, nodes, no_by_tensor, split_by, method, chunk_size, memory_gb, workers, scheduler, quiet, **column_options) -> Path:
    import shlex

    from .forces import DEFAULT_NODES
    from .pipeline import AnalysisConfig
    from .pipeline import analyze as run_analysis

    if no_by_tensor and split_by != "tensor":
        raise CkptforceError(f"--split-by {split_by} and --no-by-tensor: the split is what --no-by-tensor skips; drop one of them")
    if workers and scheduler:
        raise CkptforceError(f"--workers {workers} and --scheduler {scheduler}: both given; give --workers N for a local "
                             "cluster or --scheduler ADDRESS to join one, not both")  # fmt: skip
    config = AnalysisConfig.for_run(
        run_dir, probes, init=init, model=model, base_model=base_model, tokenizer=tokenizer, layout=layout,
        nodes=DEFAULT_NODES if nodes is None else nodes, by_tensor=not no_by_tensor, split_by=split_by, method=method, dtype=dtype,
        chunk_size=chunk_size, memory_gb=memory_gb, trust_pickles=trust_pickles, train=train, objective=objective, forces=forces_mode, max_grad_norm=max_grad_norm, kernel_projection=kernel_projection,
        feature_layer=feature_layer, topk=topk, chat_template=chat_template, probe_eos=probe_eos, train_eos=train_eos, special_tokens=special_tokens,
        columns={c: column_options[f"{c}_column"] for c in COLUMNS},
    )  # fmt: skip
    bar = None if (quiet or not sys.stderr.isatty()) else _progress_bar("analysing", "intervals")
    try:
        notify = None if quiet else (lambda line: click.echo(line, err=True))
        return run_analysis(config, out, device=device, workers=workers, scheduler=scheduler, progress=bar,
                            command=shlex.join(["ckptforce", *sys.argv[1:]]), notify=notify)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="The cube to write (HDF5, e.g. cube.h5); parts go to OUT.parts/ until it is done.")
@_analysis_options
def analyze(run_dir, out, **options):
    """Measure how every probe's log-probability moves between consecutive checkpoints of RUN_DIR, and why:
    the observed change, the first-order prediction A·J·Δθ, the path-integrated attribution and its split
    by parameter tensor, plus the update anatomy. Writes one labelled cube (open it with
    xarray.open_dataset(OUT, engine="h5netcdf")).

    Each checkpoint pair is saved as a part as soon as it is done: rerun the same command after an
    interruption and it resumes. Nothing is written into RUN_DIR.

    \b
    Examples:
      ckptforce analyze out/ --probes probes.jsonl -o cube.h5
      ckptforce analyze dpo/ --init sft/checkpoint-500 --probes probes.jsonl -o dpo.h5 --workers 2
    """
    final = _run_analysis(run_dir, out, **options)
    if not options["quiet"]:
        click.echo(f"wrote {final}")


def _report_formats(html: bool, pdf: bool) -> tuple[bool, bool]:
    return (True, True) if not (html or pdf) else (html, pdf)


@main.command()
@click.argument("cube_path", metavar="CUBE.h5", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder for report.html / report.pdf (created if its parent exists).")
@click.option("--html", is_flag=True, help="Write report.html (self-contained, works offline).")
@click.option("--pdf", is_flag=True, help="Write report.pdf (a page per section).")
@click.option("--group-by", "group_by", metavar="NAME", help=GROUP_BY_HELP)
def report(cube_path: Path, out: Path, html: bool, pdf: bool, group_by: str | None) -> None:
    """Write the diagnostic report of a cube: warnings first, then each diagnostic of the learning dynamics
    (trajectories per response type, squeezing, hallucination, forgetting, first-order validity, where the
    change comes from, update anatomy) with a figure, how to read it and a verdict computed from the numbers.
    Without --html / --pdf both are written.

    \b
    Examples:
      ckptforce report cube.h5 -o report/
      ckptforce report cube.h5 -o report/ --html
      ckptforce report cube.h5 -o report/ --group-by meta.attr
    """
    from .report import write_report

    html, pdf = _report_formats(html, pdf)
    for path in write_report(cube_path, out, html=html, pdf=pdf, group_by=group_by):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder for cube.h5, report.html and report.pdf (created if its parent exists).")
@_analysis_options
@click.option("--html", is_flag=True, help="Write only report.html (with --pdf: both; default: both).")
@click.option("--pdf", is_flag=True, help="Write only report.pdf (with --html: both; default: both).")
@click.option("--group-by", "group_by", metavar="NAME", help=GROUP_BY_HELP)
def audit(run_dir, out, html, pdf, group_by, **options):
    """Analyze RUN_DIR and report on it in one go: OUT/cube.h5, then OUT/report.html and OUT/report.pdf.
    Takes every option of `ckptforce analyze`; rerun the same command after an interruption and the
    analysis resumes from the parts already computed.

    \b
    Examples:
      ckptforce audit out/ --probes probes.jsonl -o audit/
    """
    from .report import check_group_by, output_dir, write_report

    if group_by:  # before the analysis, which may take long: the probes' own labels are known from the file
        check_group_by(group_by, _probe_groupings(options["probes"], {c: options[f"{c}_column"] for c in COLUMNS}))
    folder = output_dir(out, str(run_dir))
    final = _run_analysis(run_dir, folder / "cube.h5", **options)
    html, pdf = _report_formats(html, pdf)
    for path in [final, *write_report(final, folder, html=html, pdf=pdf, group_by=group_by)]:
        click.echo(f"wrote {path}")


def _probe_groupings(probes: Path, columns: dict) -> list[str]:
    """What the report can group probes by: split, group, and the probe file's own labels."""
    from .class_probes import CLASS_SUFFIXES
    from .probe_file import load_probe_set

    own = [] if probes.suffix in CLASS_SUFFIXES else list(load_probe_set(probes, {k: v for k, v in columns.items() if v}).labels)
    return ["split", "group", *own]


@main.command()
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("ckptforce-demo"), show_default=True,
              help="Folder for the audits (one sub-folder per sample run).")
@click.option("--only", multiple=True, type=click.Choice([a.name for a in AUDITS]), help="Audit only these sample runs (repeatable).")
def demo(out: Path, only: tuple[str, ...]) -> None:
    """Train (first time, cached after) the sample runs of sample_runs/recipes with real trainers — a tiny
    GPT-2 pretrained on a world of facts, then SFT, DPO and GRPO with TRL; a Lightning MLP on scikit-learn's
    digits with flipped labels, and a head-probing → fine-tuning pair; the same tiny GPT-2 on a compositional and on a
    permuted mapping — audit each, compare the last two, and print where the reports are. About 9 minutes on 2
    CPU cores; nothing is downloaded.

    \b
    Examples:
      ckptforce demo
      ckptforce demo -o /tmp/demo --only sft --only dpo
    """
    from .demo import run_demo

    summaries = run_demo(out, only=list(only) or None, echo=lambda line: click.echo(line, err=True))
    for s in summaries:
        click.echo(f"\n{s['name']}: {s['what']}  ({s['seconds']} s)")
        click.echo(f"  report: {s['html']}")
        click.echo(f"          {s['pdf']}")
        for key in dict.fromkeys(("trajectories", s["shows"])):
            if key in s["verdicts"]:
                click.echo(f"  {key}: {s['verdicts'][key]}")
        if "comparison" in s:
            click.echo(f"  comparison: {s['comparison']}")


@main.command(short_help="Sample GRPO rollouts at a checkpoint with your reward function: a --train file.")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_run_options
@click.option("--prompts", required=True, type=click.Path(path_type=Path), help="The prompts (JSONL or a data set: 'prompt' as text or "
              "chat messages; other columns are passed to the reward function).")  # fmt: skip
@click.option("--reward", "reward", required=True, metavar="package.module:function", help="The reward function, TRL's signature: "
              "f(prompts=, completions=, completion_ids=, **columns) -> one float per completion.")  # fmt: skip
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="The --train file to write (JSONL).")
@click.option("--step", "step", type=int, help="Sample at the checkpoint of this step (default: the first, the run's start with --init).")
@click.option("--num-generations", "-G", type=click.IntRange(2), default=8, show_default=True, help="Completions per prompt (a group).")
@click.option("--max-completion-length", type=click.IntRange(1), default=256, show_default=True, help="Tokens per completion at most.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling cut (1: none).")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Top-k cut (0: none, as TRL).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: the same seed gives the same file.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Tokenizer folder (default: the checkpoint's, then the run root's).")
@click.option("--chat-template", type=click.Path(path_type=Path), help="Jinja chat template for conversational prompts, or a "
              "tokenizer_config.json holding one (default: the tokenizer's own).")  # fmt: skip
@click.option("--no-special-tokens", is_flag=True, help="Tokenize prompts without the tokenizer's special tokens (BOS); TRL's "
              "GRPOTrainer adds them, as tokenizer(text) does.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def rollouts(run_dir: Path, init, layout, trust_pickles, prompts: Path, reward: str, out: Path, step, num_generations, max_completion_length,
             temperature, top_p, top_k, seed, tokenizer, chat_template, no_special_tokens, device, quiet) -> None:  # fmt: skip
    """For a GRPO run whose rollouts were not saved: sample a group of completions per prompt from the policy
    at one checkpoint (transformers' generate, as TRL's GRPOTrainer does), score them with your reward
    function, and write a --train file (prompt, completions as token ids, rewards) whose header records the
    checkpoint, the reward function, the prompts' SHA-256 and every sampling setting. Nothing is written
    into RUN_DIR. These are fresh rollouts, not the trainer's: analyze says so in its notes.

    \b
    Examples:
      ckptforce rollouts grpo/ --init sft/final --prompts prompts.jsonl --reward my_rewards:correct -o rollouts.jsonl
      ckptforce analyze grpo/ --init sft/final --probes probes.jsonl --train rollouts.jsonl -o grpo.h5
    """
    from .rollouts import Sampling, sample_rollouts

    sampling = Sampling(num_generations, temperature, top_p, top_k, max_completion_length, seed)
    bar = None if quiet else _progress_bar("sampling", "prompts")
    try:
        header = sample_rollouts(run_dir, prompts, reward, out, checkpoint=step, init=init, layout=layout, sampling=sampling, tokenizer=tokenizer,
                                 chat_template=chat_template, special_tokens=not no_special_tokens, device=device, trust_pickles=trust_pickles, progress=bar)  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    click.echo(f"wrote {out}: {num_generations} completions per prompt sampled at step {header['sampled']['step']}, scored by {reward}")


@main.group(cls=_Group, short_help="Write a remedy as a file a trainer reads (filter-kd, dpo-filter, dpo-extend, grpo-weights).")
def export() -> None:
    """Write a remedy the cube's numbers justify, as a file a trainer reads: soft targets for distillation
    (filter-kd), a preference data set without the pairs that hurt (dpo-filter), an SFT file of the pairs DPO
    would squeeze, to train first (dpo-extend), or GRPO rollouts with their harmful tokens down-weighted
    (grpo-weights). Every file records the
    cube (path, SHA-256, run, command) and the settings it came from.
    """


def _training_export(train: str, output: str):
    """The arguments every export built from a training file takes: the cube, --train, -o."""

    def apply(f):
        f = click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help=output)(f)
        f = click.option("--train", required=True, type=click.Path(path_type=Path), help=f"The JSONL {train} the cube was analysed with (--train of analyze).")(f)
        return click.argument("cube_path", metavar="CUBE.h5", type=click.Path(path_type=Path))(f)

    return apply


@export.command("filter-kd", short_help="Soft targets for distillation: the EMA of each example's predictions (.npz).")
@click.argument("cube_path", metavar="CUBE.h5", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="The .npz to write (ids, targets, labels, steps, provenance).")
@click.option("--alpha", type=float, default=0.95, show_default=True, help="EMA weight of the past: q̄ ← α·q̄ + (1 − α)·q_t at each "
              "checkpoint (0: the last prediction alone).")  # fmt: skip
def export_filter_kd(cube_path: Path, out: Path, alpha: float) -> None:
    """Filter-KD soft targets (Ren et al., ICLR 2022): each example's predictions over the checkpoints,
    filtered by an exponential moving average, q̄_0 = q_0, q̄_t = α·q̄_{t−1} + (1 − α)·q_t. On noisy or hard
    labels the path zig-zags towards what the rest of the data supports before it memorises the label;
    q̄ keeps that, and a fresh student distilled on it (cross-entropy against q̄) generalises better than
    one trained on the labels.

    Classifiers: analyze the run with the training arrays as probes (--probes train.npz with x, y, ids); the
    .npz holds ids (N,), targets (N, V) float32, labels (N,) as in the probe file, steps (C,) and provenance
    (a JSON string). Language models: analyze with the training file as probes and --topk K; the filter runs
    per token of each example's completion on the top-K next-token distributions, and the .npz holds ids,
    token_ids (N, W, K), token_probs (N, W, K), rest (N, W: the mass of every other id), lengths (N,), steps
    and provenance.

    \b
    Examples:
      ckptforce analyze run/ --probes train.npz --model pkg.mod:factory -o train.h5
      ckptforce export filter-kd train.h5 -o targets.npz --alpha 0.9
      ckptforce analyze sft/ --probes train_sft.jsonl --topk 20 -o sft.h5
      ckptforce export filter-kd sft.h5 -o token_targets.npz
    """
    from .remedies import write_filter_kd

    path, arrays = write_filter_kd(cube_path, out, alpha)
    if "targets" in arrays:
        n, v = arrays["targets"].shape
        what = f"{n} examples over {v} classes"
    else:
        n, w, k = arrays["token_ids"].shape
        what = f"{n} examples, the top {k} ids at each of up to {w} response tokens"
    click.echo(f"wrote {path}: soft targets of {what}, EMA α = {alpha} over {len(arrays['steps'])} checkpoints")


@export.command("dpo-filter", short_help="The preference file without the pairs that displace or squeeze their answers.")
@_training_export("training file", "The filtered copy to write (JSONL); the reasons go to OUT.reasons.jsonl.")
@click.option("--ches-top", type=click.IntRange(0), default=0, show_default=True, metavar="K", help="Also drop the K pairs with the "
              "highest CHES at the first checkpoint (Razin et al.'s filter; 0: off).")  # fmt: skip
def export_dpo_filter(cube_path: Path, train: Path, out: Path, ches_top: int) -> None:
    """The preference pairs to drop from a DPO / IPO / SimPO training file, from the cube of its run
    (analyze --train FILE): a pair is dropped when its own updates lower its own chosen answer
    (likelihood displacement; when the push on its rejected answer outweighs the pull on chosen, that is
    squeezing), when they raise its own rejected answer, or (--ches-top K) when its CHES is among the K
    highest. The numbers are the cube's self_force / displaces_chosen / ches, summed over the intervals
    that used the pair.

    OUT is the training file without the dropped pairs: every kept line is copied byte for byte (header,
    extra fields, blank lines). OUT.reasons.jsonl starts with the provenance (cube, settings, training
    file and hashes), then one line per pair: id, line, action (drop / keep), reasons, the numbers.

    \b
    Examples:
      ckptforce analyze dpo/ --init sft/checkpoint-40 --probes probes.jsonl --train train_dpo.jsonl -o dpo.h5
      ckptforce export dpo-filter dpo.h5 --train train_dpo.jsonl -o train_dpo.filtered.jsonl
    """
    from .remedies import DpoFilterConfig, write_dpo_filter

    path, sidecar, records = write_dpo_filter(cube_path, train, out, DpoFilterConfig(ches_top=ches_top))
    _echo_pairs(records, "drop", sidecar, lambda n, total: f"wrote {path}: kept {total - n} of {total} pairs; reasons in {sidecar}")


@export.command("dpo-extend", short_help="An SFT file of the pairs whose rejected answers DPO would squeeze: train it before DPO.")
@_training_export("preference file", "The SFT file to write (JSONL, prompt + completion); the reasons go to OUT.reasons.jsonl.")
@click.option("--valley-rank", type=click.FloatRange(min=1), default=10.0, show_default=True, help="Extend the pairs whose rejected "
              "tokens have at least this mean rank under π as DPO starts (1 = the argmax).")  # fmt: skip
def export_dpo_extend(cube_path: Path, train: Path, out: Path, valley_rank: float) -> None:
    """The squeezing mitigation of Ren & Sutherland (ICLR 2025): before DPO, train SFT on both answers of
    the pairs whose rejected answer sits in a valley of π — DPO's push on such an answer moves probability
    mass onto the argmax instead of lowering it, and the chosen answer falls with the rest. A pair is
    extended when the mean rank of its rejected tokens under π at the run's first checkpoint (the cube's
    g_neg_rank) is at least --valley-rank, or when its push on the rejected answer outweighed the pull on
    the chosen one over the run (self_force).

    OUT has two lines per extended pair, x → chosen and x → rejected, in TRL's prompt + completion columns
    (values copied from the preference file, no header: TRL's SFTTrainer reads it as it is).
    OUT.reasons.jsonl starts with the provenance, then one line per pair with its action and numbers.

    \b
    Examples:
      ckptforce analyze dpo/ --init sft/checkpoint-40 --probes probes.jsonl --train train_dpo.jsonl -o dpo.h5
      ckptforce export dpo-extend dpo.h5 --train train_dpo.jsonl -o sft_extend.jsonl
    """
    from .remedies import DpoExtendConfig, write_dpo_extend

    path, sidecar, records = write_dpo_extend(cube_path, train, out, DpoExtendConfig(valley_rank=valley_rank))
    _echo_pairs(records, "extend", sidecar, lambda n, total: f"wrote {path}: both answers of {n} of {total} pairs as SFT examples; reasons in {sidecar}")


@export.command("grpo-weights", short_help="The GRPO rollouts with down-weighted harmful negative tokens (token_weights).")
@_training_export("rollouts file", "The weighted copy to write (JSONL); the evidence goes to OUT.reasons.jsonl.")
@click.option("--min-share", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True, help="A negative token is harmful "
              "when it alone cancels this share of its group's pull on its correct completions.")  # fmt: skip
@click.option("--weight", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True, help="The weight of a harmful token's "
              "gradient (0: dropped).")  # fmt: skip
def export_grpo_weights(cube_path: Path, train: Path, out: Path, min_share: float, weight: float) -> None:
    """Token weights for a GRPO run's harmful negative tokens, from the cube of its run (analyze --train
    FILE): a token of a negative-advantage completion is harmful when its push — its exact first-order force
    on its group's correct completions, the cube's token_force — cancels at least --min-share of the pull
    the group's positive completions give them (lazy likelihood displacement, Deng et al. arXiv 2505.18830,
    whose NTHR score chooses such tokens from the last layer; the sidecar gives it beside the exact harm).

    OUT is the rollouts file with "token_weights" added to the groups that have a harmful token: per
    completion, one weight per token the trainer scored (EOS included), --weight on the harmful ones and 1
    elsewhere, for a GRPO loss that scales each token's term; every other line is copied byte for byte.
    OUT.reasons.jsonl starts with the provenance, then one line per harmful token with its numbers.

    \b
    Examples:
      ckptforce analyze grpo/ --init sft/checkpoint-40 --probes probes.jsonl --train train_grpo.jsonl -o grpo.h5
      ckptforce export grpo-weights grpo.h5 --train train_grpo.jsonl -o train_grpo.weighted.jsonl
    """
    from .remedies import GrpoWeightsConfig, write_grpo_weights

    path, sidecar, records = write_grpo_weights(cube_path, train, out, GrpoWeightsConfig(min_share=min_share, weight=weight))
    click.echo(f"wrote {path}: {len(records)} harmful tokens in {len({r['id'] for r in records})} groups weighted {weight}; evidence in {sidecar}")
    _echo_some([f"{r['id']} completion {r['completion']} token {r['position']} {r['token']!r}: cancels {r['share']:.0%} of the pull "
                f"({r['harm']:.3g} nats)" for r in records], sidecar)  # fmt: skip


def _echo_pairs(records: list[dict], action: str, sidecar: Path, summary) -> None:
    """The summary line of a preference-pair export (``summary(acted on, pairs)``), then the pairs ``action`` applies to."""
    acted = [r for r in records if r["action"] == action]
    click.echo(summary(len(acted), len(records)))
    _echo_some([f"{action} {r['id']} (line {r['line']}): " + "; ".join(x["why"] for x in r["reasons"]) for r in acted], sidecar)


def _echo_some(lines: list[str], sidecar: Path, shown: int = 10) -> None:
    """The first ``shown`` lines of an export's evidence, indented, and where the rest are."""
    for line in lines[:shown]:
        click.echo(f"  {line}")
    if len(lines) > shown:
        click.echo(f"  … and {len(lines) - shown} more (see {sidecar})")


class _progress_bar:
    """A rich progress bar with ETA, on stderr, as a progress callback."""

    def __init__(self, what: str = "reading updates", unit: str = "tensors"):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # fractions (the pipeline's rows within an interval) move the bar; the count shows whole units
        columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn())
        self._p = Progress(*columns, console=Console(stderr=True), transient=True)
        self._task = None

    def __call__(self, done: int, total: int, name: str = "") -> None:
        if self._task is None:
            self._p.start()
            self._task = self._p.add_task("", total=total)
        self._p.update(self._task, completed=done)

    def close(self) -> None:
        if self._task is not None:
            self._p.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
