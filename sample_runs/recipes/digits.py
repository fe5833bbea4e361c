"""Recipe ``digits``: a small MLP (backbone + head) on scikit-learn's digits, trained by ``lightning.Trainer``.

``build(out)`` writes, deterministically (seeded, CPU, one thread)::

    out/noisy/epoch=E-step=S.ckpt     all of the MLP on the training split with 20% of the labels flipped
                                      (Adam); a checkpoint at the start and after every epoch
    out/source.ckpt                   the backbone's source task: the same MLP with a 5-way head on digits 0-4
    out/hp/epoch=E-step=S.ckpt        head probing: the source backbone frozen, a new 10-way head trained alone
    out/ft/epoch=E-step=S.ckpt        fine-tuning: everything trained, from the last head-probing checkpoint
    out/probes_noisy.npz              class probes of the noisy run: training examples, half of them flipped
    out/probes_test.npz               class probes: held-out examples with their true labels
    out/train_noisy.npz               exactly what the noisy run trained on (x, y as trained, flipped, ids)
    out/train_target.npz              exactly what head probing and fine-tuning trained on (clean labels)
    out/MANIFEST.json                 settings, seconds per stage, library versions

Arrays follow ``ckptforce.class_probes`` (keys ``x`` (N, 64) float32 in [0, 1], ``y`` (N,) int64, ``flipped``
(N,) bool, ``ids`` (N,) str). Checkpoint tensors are ``model.backbone.*`` / ``model.head.*`` (a LightningModule
wrapping the plain module as ``model``); the model for ckptforce is ``--model sample_runs.recipes.digits:model``,
which builds the plain module from the checkpoint's ``hyper_parameters``.

    python -m sample_runs.recipes.digits OUT
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._common import fresh_dir, one_thread, quiet, write_manifest

SEED = 1234
#: the files this recipe's result depends on (the cache key of ``sample_runs.recipes.ensure``)
SOURCES = ("digits.py", "_common.py")
N_FEATURES = 64  # 8x8 images


@dataclass(frozen=True)
class DigitsConfig:
    hidden: int = dataclasses.field(default=128, metadata={"help": "width of the two backbone layers"})
    test_size: int = dataclasses.field(default=497, metadata={"help": "held-out examples (the rest are trained on)"})
    flip_fraction: float = dataclasses.field(default=0.2, metadata={"help": "share of training labels flipped"})
    batch: int = dataclasses.field(default=32, metadata={"help": "examples per step"})
    noisy_epochs: int = dataclasses.field(default=40, metadata={"help": "epochs of the noisy-label run"})
    noisy_lr: float = dataclasses.field(default=3e-3, metadata={"help": "Adam lr of the noisy-label run"})
    source_epochs: int = dataclasses.field(default=15, metadata={"help": "epochs on the source task (digits 0-4)"})
    hp_epochs: int = dataclasses.field(default=10, metadata={"help": "head-probing epochs"})
    ft_epochs: int = dataclasses.field(default=10, metadata={"help": "fine-tuning epochs"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Adam lr of source, head probing, fine-tuning"})
    n_probes: int = dataclasses.field(default=100, metadata={"help": "probes per file (noisy: half flipped)"})


CONFIG = DigitsConfig()


class DigitsMLP(nn.Module):
    """backbone: Linear(64, h), ReLU, Linear(h, h), ReLU; head: Linear(h, n_classes)."""

    def __init__(self, hidden: int = 128, n_classes: int = 10):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, n_classes)
        return self.head(self.backbone(x))


def model(hparams: dict | None = None) -> nn.Module:
    """The ``--model`` factory for ckptforce: the plain module, sized from the checkpoint's hyper_parameters."""
    hparams = hparams or {}
    return DigitsMLP(int(hparams.get("hidden", CONFIG.hidden)), int(hparams.get("n_classes", 10)))


def _classifier_cls():
    import lightning as L

    class DigitsClassifier(L.LightningModule):
        """Cross-entropy on DigitsMLP; ``head_only`` freezes the backbone and optimises the head alone."""

        def __init__(self, hidden: int = 128, n_classes: int = 10, lr: float = 1e-3, head_only: bool = False):
            super().__init__()
            self.save_hyperparameters()
            self.model = DigitsMLP(hidden, n_classes)
            self.model.backbone.requires_grad_(not head_only)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            params = self.model.head.parameters() if self.hparams.head_only else self.model.parameters()
            return torch.optim.Adam(params, lr=self.hparams.lr)

    return DigitsClassifier


def _save_at_start_cls():
    import lightning as L

    class SaveAtStart(L.Callback):
        """Write the model the run starts from as ``epoch=0-step=0.ckpt``, with the trainer's own writer."""

        def __init__(self, dirpath: Path):
            self.dirpath = Path(dirpath)

        def on_train_start(self, trainer, pl_module):
            trainer.save_checkpoint(self.dirpath / "epoch=0-step=0.ckpt")

    return SaveAtStart


# --- data -------------------------------------------------------------------------------------------------


def dataset(cfg: DigitsConfig = CONFIG) -> dict[str, np.ndarray]:
    """The digits, split and noised once, seeded: x_train/x_test (N, 64) float32 in [0, 1], y_train (true
    labels), y_noisy (20% flipped to another class), flipped (bool), y_test, ids_train / ids_test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(d.target))
    test, train = order[: cfg.test_size], order[cfg.test_size :]
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    y_train = y[train]
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), round(cfg.flip_fraction * len(train)), replace=False)] = True
    y_noisy = y_train.copy()
    y_noisy[flipped] = (y_train[flipped] + rng.integers(1, 10, int(flipped.sum()))) % 10  # always another class
    return {
        "x_train": x[train], "y_train": y_train, "y_noisy": y_noisy, "flipped": flipped,
        "x_test": x[test], "y_test": y[test],
        "ids_train": np.array([f"digit-{i}" for i in train]), "ids_test": np.array([f"digit-{i}" for i in test]),
    }  # fmt: skip


def _savez(path: Path, x, y, flipped, ids) -> str:
    np.savez(path, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64), flipped=np.asarray(flipped, bool), ids=np.asarray(ids, str))
    return path.name


def write_data(out: Path, cfg: DigitsConfig = CONFIG) -> dict[str, str]:
    """The class-probe and training-example arrays (no training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = dataset(cfg)
    rng = np.random.default_rng(SEED + 1)
    half = cfg.n_probes // 2
    pick = np.concatenate([rng.choice(np.flatnonzero(d["flipped"]), half, replace=False),
                           rng.choice(np.flatnonzero(~d["flipped"]), cfg.n_probes - half, replace=False)])  # fmt: skip
    pick.sort()
    test = np.arange(min(cfg.n_probes, len(d["y_test"])))
    files = {
        "probes_noisy": _savez(out / "probes_noisy.npz", d["x_train"][pick], d["y_noisy"][pick], d["flipped"][pick], d["ids_train"][pick]),
        "probes_test": _savez(out / "probes_test.npz", d["x_test"][test], d["y_test"][test], np.zeros(len(test), bool), d["ids_test"][test]),
        "train_noisy": _savez(out / "train_noisy.npz", d["x_train"], d["y_noisy"], d["flipped"], d["ids_train"]),
        "train_target": _savez(out / "train_target.npz", d["x_train"], d["y_train"], np.zeros(len(d["y_train"]), bool), d["ids_train"]),
    }  # fmt: skip
    return files


# --- training ---------------------------------------------------------------------------------------------


def _loader(x, y, batch: int, shuffle: bool = True):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(SEED)
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch, shuffle=shuffle, generator=g, num_workers=0)


def _fit(module, loader, epochs: int, run_dir: Path | None):
    """lightning.Trainer on CPU; with ``run_dir``: a checkpoint at the start and after every epoch."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = []
    if run_dir is not None:
        callbacks = [_save_at_start_cls()(run_dir),
                     ModelCheckpoint(dirpath=run_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)]  # fmt: skip
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, enable_checkpointing=run_dir is not None,
                        num_sanity_val_steps=0, deterministic=True, default_root_dir=str(run_dir or "."))  # fmt: skip
    trainer.fit(module, loader)
    return trainer


def train_noisy(out: Path, cfg: DigitsConfig = CONFIG) -> Path:
    """The whole MLP on the noisy labels."""
    import lightning as L

    L.seed_everything(SEED, verbose=False)
    d = dataset(cfg)
    module = _classifier_cls()(hidden=cfg.hidden, n_classes=10, lr=cfg.noisy_lr)
    _fit(module, _loader(d["x_train"], d["y_noisy"], cfg.batch), cfg.noisy_epochs, out)
    return out


def train_source(path: Path, cfg: DigitsConfig = CONFIG) -> Path:
    """The MLP with a 5-way head on the training examples of digits 0-4 (true labels); one checkpoint file."""
    import lightning as L

    L.seed_everything(SEED, verbose=False)
    d = dataset(cfg)
    keep = d["y_train"] < 5
    module = _classifier_cls()(hidden=cfg.hidden, n_classes=5, lr=cfg.lr)
    trainer = _fit(module, _loader(d["x_train"][keep], d["y_train"][keep], cfg.batch), cfg.source_epochs, None)
    trainer.save_checkpoint(path)
    return path


def head_probe(out: Path, source: Path, cfg: DigitsConfig = CONFIG) -> Path:
    """A new 10-way head on the source backbone (frozen), trained on the target task (all ten digits)."""
    import lightning as L

    L.seed_everything(SEED, verbose=False)
    d = dataset(cfg)
    module = _classifier_cls()(hidden=cfg.hidden, n_classes=10, lr=cfg.lr, head_only=True)
    state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    backbone = {k: v for k, v in state.items() if k.startswith("model.backbone.")}
    missing, _ = module.load_state_dict(backbone, strict=False)
    assert all(k.startswith("model.head.") for k in missing), missing  # only the new head starts fresh
    _fit(module, _loader(d["x_train"], d["y_train"], cfg.batch), cfg.hp_epochs, out)
    return out


def fine_tune(out: Path, init: Path, cfg: DigitsConfig = CONFIG) -> Path:
    """Everything trained on the target task, from the last head-probing checkpoint."""
    import lightning as L

    L.seed_everything(SEED, verbose=False)
    d = dataset(cfg)
    module = _classifier_cls()(hidden=cfg.hidden, n_classes=10, lr=cfg.lr, head_only=False)
    module.load_state_dict(torch.load(init, map_location="cpu", weights_only=True)["state_dict"])
    _fit(module, _loader(d["x_train"], d["y_train"], cfg.batch), cfg.ft_epochs, out)
    return out


def checkpoints(run: Path) -> list[Path]:
    """A run's ``epoch=E-step=S.ckpt`` files in step order."""
    return sorted(Path(run).glob("*.ckpt"), key=lambda p: int(p.stem.rsplit("step=", 1)[1].split("-")[0]))


def build(out, cfg: DigitsConfig = CONFIG) -> Path:
    """Train the noisy-label run and the head-probing → fine-tuning pair into ``out``; returns ``out``."""
    out = fresh_dir(out)
    seconds: dict[str, float] = {}
    with quiet(preimport=("lightning",)), one_thread():
        files = write_data(out, cfg)
        stages = (("noisy", lambda: train_noisy(out / "noisy", cfg)),
                  ("source", lambda: train_source(out / "source.ckpt", cfg)),
                  ("hp", lambda: head_probe(out / "hp", out / "source.ckpt", cfg)),
                  ("ft", lambda: fine_tune(out / "ft", checkpoints(out / "hp")[-1], cfg)))  # fmt: skip
        for stage, fn in stages:
            t0 = time.perf_counter()
            fn()
            seconds[stage] = round(time.perf_counter() - t0, 2)
    files.update(noisy="noisy", source="source.ckpt", hp="hp", ft="ft", ft_init=str(checkpoints(out / "hp")[-1].relative_to(out)),
                 model="sample_runs.recipes.digits:model")  # fmt: skip
    write_manifest(out, "digits", dataclasses.asdict(cfg), seconds, files)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sample_runs.recipes.digits OUT")
    print(build(sys.argv[1]))
