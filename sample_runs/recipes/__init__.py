"""Recipes for small real training runs, built on demand into a cache.

Each recipe is a module with ``build(out_dir) -> Path`` (trains into ``out_dir``), ``write_data(out_dir)``
(the probe / training-example files alone) and ``SOURCES`` (the files its result depends on); run one with
``python -m sample_runs.recipes.<name> OUT``. ``ensure(name)`` returns the cached build, training it first when
there is none::

    from sample_runs.recipes import ensure
    lm_dir = ensure("lm")          # ~/.cache/ckptforce/sample_runs/lm-<hash>/ (sft/, dpo/, probes.jsonl, ...)

The cache key hashes the recipe's source files and the versions of the libraries that train it, so an edit
to a recipe (or a new torch) builds afresh; a build goes to a temporary folder that is renamed into place
when complete, so an interrupted build is never mistaken for a finished one.

    python -m sample_runs.recipes [lm] [digits] [--cache DIR]      # build what is missing, print the folders
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

#: recipe name -> module (imported lazily: a recipe imports torch and its trainers)
RECIPES = {"lm": "sample_runs.recipes.lm", "digits": "sample_runs.recipes.digits", "compose": "sample_runs.recipes.compose"}
#: libraries whose version is part of the cache key
VERSIONED = ("torch", "transformers", "trl", "lightning", "scikit-learn", "numpy")
HERE = Path(__file__).resolve().parent


def cache_root() -> Path:
    """``$CKPTFORCE_SAMPLE_RUNS``, else ``$XDG_CACHE_HOME/ckptforce/sample_runs``, else ``~/.cache/...``."""
    if os.environ.get("CKPTFORCE_SAMPLE_RUNS"):
        return Path(os.environ["CKPTFORCE_SAMPLE_RUNS"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ckptforce" / "sample_runs"


def recipe(name: str):
    """The recipe module ``name``; a ValueError lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])


def source_hash(name: str) -> str:
    """12 hex digits over the recipe's source files (``SOURCES``) and the versions in ``VERSIONED``."""
    h = hashlib.sha256()
    for file in recipe(name).SOURCES:
        h.update(file.encode() + b"\0" + (HERE / file).read_bytes() + b"\0")
    for lib in VERSIONED:
        try:
            version = metadata.version(lib)
        except metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{lib}={version}\0".encode())
    return h.hexdigest()[:12]


def cached_path(name: str, cache: Path | None = None) -> Path:
    """Where the build of ``name`` lives (whether or not it exists): ``<cache>/<name>-<hash>``."""
    return Path(cache or cache_root()) / f"{name}-{source_hash(name)}"


def ensure(name: str, cache: Path | None = None) -> Path:
    """The finished build of recipe ``name`` in the cache, built first when missing."""
    final = cached_path(name, cache)
    if (final / "MANIFEST.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        recipe(name).build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same build first (or a broken one is in the way)
            if not (final / "MANIFEST.json").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str]) -> int:
    cache = None
    if "--cache" in argv:
        i = argv.index("--cache")
        cache, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    for name in argv or list(RECIPES):
        print(ensure(name, cache))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
