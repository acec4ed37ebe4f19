"""Build the `accelerate launch` command of one Slurm node from the job's environment.

Run by cluster/slurm/train_latent.sbatch and train_motion.sbatch (`-m vasa.cli`; the subcommand comes with the
arguments) inside `srun` (one task per node): the first host of SLURM_JOB_NODELIST is the rendezvous host, the
port is derived from the job id (so two jobs sharing a node do not collide), machine_rank is SLURM_NODEID and
the process count is nodes x GPUs per node. `--print` only prints the command (a dry run: what the tests
check); otherwise the node's process is replaced by it. Standard library only (it runs before anything is
imported).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence

PORT_BASE, PORT_SPAN = 20000, 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names, e.g. "gpu[001-003,007],login1" ->
    [gpu001, gpu002, gpu003, gpu007, login1]. One bracket group per host pattern."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", item)
        if match is None:
            if "[" in item or "]" in item:
                raise ValueError(f"unsupported host pattern {item!r} in {nodelist!r}")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{width}d}{suffix}")
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def launch_command(env: Mapping[str, str], config: str, cli_args: Sequence[str]) -> list[str]:
    """The `accelerate launch` argv for this node of the job described by `env` (Slurm variables)."""
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    nodes = int(env.get("SLURM_NNODES", len(hosts)))
    if nodes != len(hosts):
        raise ValueError(f"SLURM_NNODES={nodes} but the node list names {len(hosts)} hosts")
    gpus = int(env.get("SLURM_GPUS_ON_NODE", "8"))
    port = PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN
    return [
        "accelerate", "launch",
        "--config_file", config,
        "--num_machines", str(nodes),
        "--num_processes", str(nodes * gpus),
        "--machine_rank", env["SLURM_NODEID"],
        "--main_process_ip", hosts[0],
        "--main_process_port", str(port),
        "--rdzv_backend", "static",
        "-m", "vasa.cli",
        *cli_args,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cluster/accelerate/multinode.yaml", help="accelerate config file")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    parser.add_argument(
        "script_args",
        nargs=argparse.REMAINDER,
        help="`vasa` arguments (after --): [--params P] train-latent|train-motion ...",
    )
    args = parser.parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    command = launch_command(os.environ, args.config, script_args)
    if args.print:
        print(shlex.join(command))
        return 0
    os.execvp(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
