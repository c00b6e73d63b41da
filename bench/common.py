"""What every benchmark script sets up the same way: its machine options and a synchronised clock."""

from __future__ import annotations

import argparse

import torch


def add_machine_args(parser, *, threads: int = 0, device: str | None = "cpu", seed: bool = True) -> None:
    """--threads (0: torch's default), --device (None: the GPU if any, else the CPU), --seed."""
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default=device, help="cpu, cuda, cuda:1 (none given: the GPU if any)")
    if seed:
        parser.add_argument("--seed", type=int, default=0)


def machine(args) -> torch.device:
    """Apply --threads; the --device to run on."""
    from embdistill.distributed import default_device

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device) if args.device else default_device()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a timer around CUDA work measures nothing otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def study_parser(doc: str, *, out: str, out_help: str) -> argparse.ArgumentParser:
    """A study's parser: its docstring as help, --base-dir (the pipeline's, required) and --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", required=True, help="the pipeline's base directory (data, runs, results)")
    parser.add_argument("--out", default=out, help=out_help)
    return parser


def family_scores(table: dict) -> dict[str, dict[str, float]]:
    """An evaluation's table.json -> model label -> {task family: its mean score in %, "mean":
    the mean over families in %}, as stage 6 computed them (family_means, mean_over_families)."""
    return {m["label"]: {**{f: 100 * v for f, v in m["family_means"].items()}, "mean": 100 * m["mean_over_families"]}
            for m in table["models"]}
