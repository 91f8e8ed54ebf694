"""Per-rank state: each rank saves and restores its own CUDA generator (and its data state),
not rank 0's list of every visible GPU's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.loop import Trainer


class _Stream:
    def __init__(self) -> None:
        self.loaded = None

    def state_dict(self):
        return {"carried": torch.arange(3)}

    def load_state_dict(self, state) -> None:
        self.loaded = state


def _fake_trainer(device: torch.device) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(train=_Stream()), device=device)


def test_each_rank_keeps_its_own_device_generator(monkeypatch):
    """Saved with the rank's own device index, restored onto that device: the rank-1 process of
    a restart (one visible GPU, or eight) gets back rank 1's generator."""
    generators = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    set_calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: generators[d.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: set_calls.append((int(s[0]), d.index)))
    rank1 = _fake_trainer(torch.device("cuda", 1))
    state = Trainer.rank_state(rank1)
    assert int(state["cuda_rng"][0]) == 1 and torch.equal(state["data"]["carried"], torch.arange(3))
    Trainer.load_rank_state(rank1, state)
    assert set_calls == [(1, 1)] and torch.equal(rank1.data.train.loaded["carried"], torch.arange(3))


def test_cpu_ranks_without_carried_state_save_nothing_and_old_files_still_load():
    cpu = SimpleNamespace(data=SimpleNamespace(train=object()), device=torch.device("cpu"))
    assert Trainer.rank_state(cpu) is None
    old = _fake_trainer(torch.device("cpu"))
    Trainer.load_rank_state(old, {"carried": torch.arange(3)})  # a file written before: the data state
    assert torch.equal(old.data.train.loaded["carried"], torch.arange(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_round_trip_on_the_device():
    device = torch.device("cuda", torch.cuda.current_device())
    t = _fake_trainer(device)
    state = Trainer.rank_state(t)
    first = torch.rand(4, device=device)
    Trainer.load_rank_state(t, state)
    assert torch.equal(torch.rand(4, device=device), first)
