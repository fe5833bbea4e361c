"""A LoRA adapter's optimizer.pt mapped to lora_A / lora_B names equals the live Trainer optimizer's state."""

from __future__ import annotations

import pytest
import torch

from ckptforce import open_run
from fixtures.lora import write_lora_run


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_lora_run(tmp_path_factory.mktemp("lora"))


def test_adapter_optimizer_state_mapped_to_factor_names(lora):
    run = open_run(lora.root)
    live = lora.extra["optimizer_state"]
    with run.open(run.checkpoints[-1]) as ckpt:
        state = ckpt.optimizer()
        factors = ckpt.factor_names()
    assert state is not None and state.kind == "adam" and state.mapping.startswith("PeftModel's trainable parameters")
    assert set(state.per_param) == set(live) == {n for pair in factors.values() for n in pair}
    for n, want in live.items():
        torch.testing.assert_close(state.per_param[n]["exp_avg"], want["exp_avg"], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(state.per_param[n]["exp_avg_sq"], want["exp_avg_sq"], rtol=0, atol=0, msg=n)
    assert [len(g["names"]) for g in state.groups] == [len(live), 0]
