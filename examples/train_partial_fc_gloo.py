"""Train a small embedding model with a class-sharded PartialFC head over 2 gloo processes
on the CPU (a few seconds), the way insightface's arcface_torch trains with PartialFC_V2:

* the backbone is replicated and wrapped in DistributedDataParallel (which averages its
  gradients over ranks);
* the head's classes are sharded: each rank holds ``pfc.weight`` [num_local, D] for its
  ``num_local`` classes and never communicates it;
* PartialFC gives the local embeddings world_size x the true gradient, so DDP's average
  is the true gradient.

    python examples/train_partial_fc_gloo.py [--world 2] [--steps 60] [--sample-rate 0.5]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import arcface_kernels as ak


def synthetic_batch(gen, protos, n, noise=0.6):
    """n samples of random classes: the class prototype plus Gaussian noise."""
    labels = torch.randint(0, protos.shape[0], (n,), generator=gen)
    x = protos[labels] + noise * torch.randn(n, protos.shape[1], generator=gen)
    return x, labels


def run(rank, args, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=args.world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)                       # same backbone init on every rank
    protos = torch.randn(args.classes, args.input_dim, generator=torch.Generator()
                         .manual_seed(1))      # the data set, shared
    backbone = nn.Sequential(nn.Linear(args.input_dim, 128), nn.ReLU(),
                             nn.Linear(128, args.embedding))
    backbone = nn.parallel.DistributedDataParallel(backbone)
    torch.manual_seed(100 + rank)              # each rank its own shard init
    pfc = ak.PartialFC(args.embedding, args.classes, sample_rate=args.sample_rate,
                       s=32.0, m2=0.3, backend=args.backend,
                       generator=torch.Generator().manual_seed(7 + rank))
    opt = torch.optim.SGD([{"params": backbone.parameters()},
                           {"params": pfc.parameters()}], lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"world={args.world} classes={args.classes} "
              f"(rank 0 holds {pfc.num_local}, class_start={pfc.class_start}) "
              f"sample_rate={args.sample_rate} backend={args.backend}", flush=True)
    data_gen = torch.Generator().manual_seed(1000 + rank)   # each rank its own samples
    t0, first, last = time.time(), None, None
    for step in range(args.steps):
        x, y = synthetic_batch(data_gen, protos, args.batch)
        loss = pfc(backbone(x), y)             # the same value on every rank
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {last:.4f}", flush=True)
    if rank == 0:
        print(f"loss {first:.4f} -> {last:.4f} in {time.time() - t0:.1f}s", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--classes", type=int, default=101)   # not a multiple of the world
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--embedding", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample-rate", type=float, default=1.0)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(args, os.path.join(tmp, "init")), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
