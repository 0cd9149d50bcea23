"""What the tests share, beside the fixtures in tests/conftest.py:

    run            TINY (the real config shrunk), run_train (`python -m pipeline.train` in a subprocess), a run's
                   metrics rows and weights, the exact-resume comparison
    processes      start, signal and watch training processes and their loader workers
    data           small synthetic shard datasets and DataModules over them; DDP rank mains
    slurm_cluster  a real local SLURM cluster (one node or several) for the SLURM tests
    wandb_records  W&B's own records of a run, read back with `wandb leet inspect --json`
    sync_probe     `python -m tests.helpers.sync_probe`: a training run that counts host reads per step
    probes/        sitecustomize.py loaded into SLURM-launched ranks to record the samples each one reads
"""
