"""Getting a job onto nodes: nothing here imports torch.

    node.py        the node launcher: starts this node's ranks, forwards signals, stops them all
                   when one fails, restarts them (`python -m pargo_dist.launch`,
                   `launchers/launch.py`, `pargo-dist train --nproc N`)
    restarts.py    the restart policy: which failures are restarted, which requeue, which end
    slurm.py       what a job learns from SLURM (node 0, this node, the rendezvous port) and the
                   batch script's requeue decision
    submit.py      `pargo-dist submit`: a recipe -> an sbatch script -> a job
    doctor.py      `pargo-dist doctor`: a node and a recipe checked before a job
"""
