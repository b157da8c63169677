"""The `local-process` batch_system: SLURM-shaped jobs run as local background processes.

For developing configs on a laptop or a workstation with no SLURM (like submitit's LocalExecutor).
`airflow_oellm.localjobs` speaks the part of SLURM's command line the provider uses (`sbatch`,
`squeue`, `sacct`, `scancel`, `scontrol`), so every operation, trigger and parser above it runs
unchanged: the hook only puts these commands in place of SLURM's for its own scripts.

Each job is a rendered sbatch script run by bash in its own process group under a small detached
supervisor, which enforces the time limit (the `--signal` warning, then SIGTERM, then SIGKILL →
TIMEOUT), turns a cancel into CANCELLED and writes the exit status down. A supervisor that dies
(reboot, OOM killer) shows as NODE_FAIL, so the provider resubmits and resumes as it would on
a cluster. Jobs queue (PENDING, reason Resources) until their CPUs are free.
"""
