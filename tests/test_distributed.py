"""SyncBatchNorm across processes on CPU (gloo) under DDP, against exact single-process maths:
one process on the concatenation of the ranks' batches with loss = mean of the per-rank mean
losses (what DDP's gradient averaging computes)."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision

import fastres
from tests.utils import assert_close

SIZES = (3, 5)  # uneven per-rank batches
STEPS = 3


def _model(sync: bool) -> nn.Module:
    """resnet18 in float64: a few SGD steps of a BN net on 3-5 images amplify fp32 rounding to
    ~1e-3 (eager and fastres alike, against float64), which would drown what is tested here."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=4).double()
    return nn.SyncBatchNorm.convert_sync_batchnorm(m) if sync else m


def _data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(STEPS, n, 3, 64, 64, generator=g, dtype=torch.float64) for n in SIZES]
    ys = [torch.randint(0, 4, (STEPS, n), generator=g) for n in SIZES]
    return xs, ys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sync: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(fastres.convert(_model(sync)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        xs, ys = _data()
        for step in range(STEPS):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[rank][step]), ys[rank][step]).backward()
            opt.step()
        if rank == 0:
            out.update({k: v.clone() for k, v in model.module.state_dict().items()})
    finally:
        dist.destroy_process_group()


def _run_ddp(sync: bool) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(len(SIZES), _free_port(), sync, out), nprocs=len(SIZES), join=True)
        return dict(out)


def _reference(sync: bool) -> dict:
    """Exact maths in one process: SyncBN = BN over the concatenated batch; without SyncBN each
    rank's BN sees its own batch (run per rank, gradients averaged as DDP does)."""
    model = _model(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xs, ys = _data()
    for step in range(STEPS):
        opt.zero_grad()
        if sync:
            logits = model(torch.cat([x[step] for x in xs]))
            parts = logits.split(list(SIZES))
            loss = sum(nn.functional.cross_entropy(p, y[step]) for p, y in zip(parts, ys)) / len(SIZES)
            loss.backward()
        else:
            replicas = [copy.deepcopy(model) for _ in SIZES]
            for r, rep in enumerate(replicas):
                nn.functional.cross_entropy(rep(xs[r][step]), ys[r][step]).backward()
            for name, p in model.named_parameters():
                p.grad = sum(dict(rep.named_parameters())[name].grad for rep in replicas) / len(SIZES)
            model.load_state_dict({**model.state_dict(), **{k: v for k, v in replicas[0].state_dict().items()
                                                            if "running" in k or "num_batches" in k}})
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("sync", [True, False], ids=["syncbn", "plain-bn"])
def test_ddp_matches_exact_reference(sync):
    got, want = _run_ddp(sync), _reference(sync)
    assert got.keys() == want.keys()
    for k, v in want.items():
        if v.is_floating_point():
            assert_close(got[k], v, name=k)
        else:
            assert torch.equal(got[k], v), k


def test_converted_syncbn_is_not_torch_syncbn():
    model = fastres.convert(_model(True))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert model.state_dict().keys() == _model(True).state_dict().keys()
