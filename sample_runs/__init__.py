"""Small real training runs for trying ckptforce: the bundled ``tiny-gpt2-trainer/`` and the ``recipes``."""
