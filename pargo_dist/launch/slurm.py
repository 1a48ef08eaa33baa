"""What a job learns from SLURM: who is node 0, which node am I, and whether to requeue.

The sbatch template (slurm/train.sbatch) runs one launcher per node with `--slurm`; each
launcher derives the same rendezvous from the allocation's variables, without talking to the
others: the first host of SLURM_JOB_NODELIST is the master, SLURM_NODEID is the node rank,
and the port is a function of the job id and restart count (all nodes agree on it; a requeued
job does not meet its previous incarnation's socket in TIME_WAIT). MASTER_ADDR / MASTER_PORT,
if set, win: clusters with a dedicated fabric name its interface that way.

After the step ends, the batch script asks `python -m pargo_dist.slurm after-step --rc N`
whether to requeue: only exit 75 requeues (every rank saved after SIGUSR1/SIGTERM, or the
launcher spent its in-job restarts on faults: run.max_restarts, pargo_dist/launch/node.py), and at
most --max-requeues times; a real failure ends the job with its exit code, never a loop.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pargo_dist.errors import UserError
from pargo_dist.runtime.exits import EXIT_MEANINGS, REQUEUE_EXIT

def expand_hostlist(expr: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: "gpu[01-03,07],cpu-a1" ->
    gpu01, gpu02, gpu03, gpu07, cpu-a1. Zero padding of a range is kept (as SLURM does).
    Ours rather than `scontrol show hostnames` so that the launcher needs no SLURM binary."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*", expr):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        lo, dash, hi = part.partition("-")
        if not dash:
            values = [lo]
        else:
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise UserError(f"bad range {part!r} in host list {item!r}")
            values = [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
        out.extend(h for v in values for h in _expand_one(head + v + tail))
    return out


@dataclass(frozen=True)
class Rendezvous:
    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int

    @property
    def master(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


def port_for_job(job_id: str, restarts: int) -> int:
    """A port in 20000-59999 that every node of the job computes alike."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return 20000 + (digits * 97 + restarts * 7919) % 40000


def rendezvous_from_env(env: Mapping[str, str] | None = None) -> Rendezvous:
    """The rendezvous of this job step from SLURM's variables (see the module docstring)."""
    env = os.environ if env is None else env
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODEID") if k not in env]
    if missing:
        raise UserError(f"--slurm needs SLURM's job variables ({', '.join(missing)} not set): run it with srun "
                         "inside an allocation, or use --nnodes/--node-rank/--master on other clusters")
    hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if len(hosts) != nnodes:
        raise UserError(f"SLURM_JOB_NODELIST={env['SLURM_JOB_NODELIST']!r} names {len(hosts)} hosts, "
                         f"SLURM_JOB_NUM_NODES says {nnodes}")
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    port = int(env.get("MASTER_PORT") or port_for_job(env["SLURM_JOB_ID"], restarts))
    return Rendezvous(master_addr=env.get("MASTER_ADDR") or hosts[0], master_port=port, nnodes=nnodes,
                      node_rank=int(env["SLURM_NODEID"]))


# What a node's launcher prints when it exits REQUEUE_EXIT because its in-job restarts are spent
# (pargo_dist.launch.node); the batch script finds it in the job log (`asked_for_requeue`).
RESTARTS_SPENT = "pargo-dist launch: in-job restarts spent"


def job_start_line(job_id: str) -> str:
    """The line slurm/train.sbatch writes to the job log at each start (a requeue appends)."""
    return f"[pargo-dist] job {job_id} start"


def asked_for_requeue(log: Path, job_id: str) -> bool:
    """Whether a node's launcher of this start of the job (the log after its last start line)
    exited REQUEUE_EXIT for spent restarts. srun reports the highest of the nodes' exit codes,
    and `--kill-on-bad-exit` ends the other nodes' launchers when one exits 75: one killed
    meanwhile (137) or ended by the hang detector (124) hides that node's 75."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return RESTARTS_SPENT in text[text.rfind(job_start_line(job_id)):]


def after_step(rc: int, restarts: int, max_requeues: int, restarts_spent: bool = False) -> tuple[bool, str]:
    """(requeue?, the line the job log gets) for a job step that ended with exit code rc.
    `restarts_spent`: a node's launcher asked for a requeue (asked_for_requeue), whatever rc says,
    unless rc is a bad input (2) or the run finished."""
    meaning = EXIT_MEANINGS.get(rc, "training failed")
    if rc == 0:
        return False, "[pargo-dist] training finished (exit 0)"
    if rc not in (2, REQUEUE_EXIT) and restarts_spent:
        rc, meaning = REQUEUE_EXIT, f"srun's exit {rc} is another node's; a node's in-job restarts are spent"
    if rc != REQUEUE_EXIT:
        return False, (f"[pargo-dist] exit {rc} ({meaning}): not requeued; only exit {REQUEUE_EXIT} (checkpoint "
                       "saved after SIGUSR1/SIGTERM, or in-job restarts spent) requeues. The error is above in "
                       "this log.")
    if restarts >= max_requeues:
        return False, (f"[pargo-dist] exit {rc}, but this job was already requeued {restarts} times "
                       f"(max {max_requeues}): not requeuing again. Resubmit with --run-dir to continue.")
    why = f" ({meaning})" if restarts_spent else ""
    return True, f"[pargo-dist] exit {rc}{why}, the job asks to be requeued: requeuing (requeue {restarts + 1} of " \
                 f"at most {max_requeues})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pargo_dist.slurm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    step = sub.add_parser("after-step", help="exit 0 if the job should requeue itself, 1 if not (prints why)")
    step.add_argument("--rc", type=int, required=True, help="the job step's exit code")
    step.add_argument("--max-requeues", type=int, required=True)
    step.add_argument("--log", type=Path, help="the job log: a node's launcher asking for a requeue there counts "
                                               "whatever srun's exit code (see asked_for_requeue)")
    sub.add_parser("rendezvous", help="print the rendezvous this node derives (a debugging aid)")
    args = ap.parse_args(argv)
    if args.command == "rendezvous":
        r = rendezvous_from_env()
        print(f"master {r.master} nnodes {r.nnodes} node_rank {r.node_rank}")
        return 0
    spent = args.log is not None and asked_for_requeue(args.log, os.environ.get("SLURM_JOB_ID", ""))
    requeue, message = after_step(args.rc, int(os.environ.get("SLURM_RESTART_COUNT") or 0), args.max_requeues,
                                  restarts_spent=spent)
    print(message, flush=True)
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
