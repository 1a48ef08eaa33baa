"""What a rank stands on, below any training logic: nothing here imports the model, the data,
a backend or the loop.

    process_group.py    joining the process group with the set-up allowance, then training's
                        collective timeout
    store_sync.py       barrier / share on the process group's store: waiting on one rank's long
                        work outside any collective
    filesystems.py      which ranks share a filesystem (probe files), so per-filesystem work runs
                        once on each
    node_memory.py      how much memory this node gives the job (RAM, or a cgroup's limit)
    signals.py          SIGTERM / SIGUSR1 held from a process's first line, agreed across ranks
    hang_detector.py    a rank that makes no progress ends the run, loudly, with its stack
    exits.py            exit codes and what they mean; how a failing rank leaves (never waiting
                        in a collective its peers will not join) and records why
    rank_env.py         the environment a rank is started with (RANK, WORLD_SIZE, MASTER_*)
"""
