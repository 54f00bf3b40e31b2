#!/usr/bin/env python3
"""torch.distributed allreduce on CUDA tensors, 2 processes on one GPU.

The comparison point for Chorus's same-GPU path (docs/benchmarks.md):
  python3 bench/python/torch_baseline.py --backend gloo
  python3 bench/python/torch_baseline.py --backend nccl
Prints one line per size: bytes, time (us, median), algbw and busbw (GB/s),
the nccl-tests convention (busbw = algbw * 2(n-1)/n).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, args, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(0)
    try:
        dist.init_process_group(args.backend, rank=rank, world_size=world)
        sizes = [1 << s for s in range(args.min_log2, args.max_log2 + 1, 2)]
        for nbytes in sizes:
            n = nbytes // 4
            x = torch.rand(n, device="cuda")
            iters = args.iters if nbytes <= (16 << 20) else max(3, args.iters // 4)
            for _ in range(2):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                dist.barrier()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                dist.all_reduce(x)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            if rank == 0:
                algbw = nbytes / t / 1e9
                busbw = algbw * 2 * (world - 1) / world
                print(f"{args.backend} {nbytes:>11} B  {t * 1e6:12.1f} us  algbw {algbw:8.3f}  busbw {busbw:8.3f} GB/s",
                      flush=True)
        dist.destroy_process_group()
    except Exception as e:  # NCCL's "Duplicate GPU detected" lands here
        print(f"rank {rank}: {args.backend} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
        sys.exit(3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="gloo")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--min-log2", type=int, default=20)
    p.add_argument("--max-log2", type=int, default=28)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    print(f"torch {torch.__version__}, nccl {torch.cuda.nccl.version()}, {torch.cuda.get_device_name(0)}",
          flush=True)
    mp.spawn(worker, args=(args.world, args, args.port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
