# The two commands a newcomer needs (see README.md).
.PHONY: plan test install cluster

SWEEP ?= config/sweeps/scaling_study.yaml

plan: install  ## expand the example sweep: experiments, resources, GPU-hours
	.venv/bin/airflow-oellm plan $(SWEEP)

test:  ## everything CI runs: install, dev cluster up, lint, all tests
	.ci/run

install:
	scripts/install.sh

cluster:  ## the real single-node SLURM + sshd dev cluster (root)
	scripts/dev-cluster.sh up
