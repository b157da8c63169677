# The two commands a newcomer needs (see README.md).
.PHONY: plan demo demo-stop test reliability install cluster

SWEEP ?= config/sweeps/scaling_study.yaml

plan: install  ## expand the example sweep: experiments, resources, GPU-hours
	.venv/bin/airflow-oellm plan $(SWEEP)

demo:  ## the whole product on this machine: Airflow runs the example sweep on the dev cluster (or local processes)
	scripts/demo.sh

demo-stop:  ## stop the Airflow that `make demo` left running for its UI
	.venv/bin/python scripts/demo.py --stop

test:  ## everything CI runs: install, dev cluster and production services up, lint, all tests
	.ci/run

reliability: install cluster  ## the fault-injection suite, then docs/reliability.md's table from its figures
	.venv/bin/python -m pytest -m faults
	.venv/bin/python scripts/reliability_report.py

install:
	scripts/install.sh

cluster:  ## the real single-node SLURM + sshd dev cluster (root)
	scripts/dev-cluster.sh up
