# Prime Spark. `make lab` brings up the lab and runs the main job; `make test` runs every test.
# Both install what they need first (`make setup`), on a fresh Debian 12 machine as root.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SPARK := $(BIN)/spark
ENV ?= lab
PYTEST_ARGS ?=
# The unit tests run in this many processes (pytest-xdist), as most of their time is spent waiting on servers and
# subprocesses: on a 2-core machine 8.6 min with 3, 10.8 with 2, 9.9 with 4. The lab tests run in one: they share
# one lab.
UNIT_JOBS ?= 3
# `make test` runs the unit tests beside the lab tests, at a lower priority: the lab tests wait (on containers, on
# Prefect's heartbeats) with 57% of two cores idle, and the unit tests fill that. On 2 cores: 24.9 min for both,
# against 22.2 + 8.5 one after the other. Their output goes to UNIT_LOG, printed when both have ended.
UNIT_NICE := nice -n 10
UNIT_LOG := .pytest_cache/unit-tests.log
# The lab run ends with its slowest steps: where its half of the suite's time goes, in every CI log.
LAB_DURATIONS := --durations=15

# Debian packages the project uses; installed by `make setup`, never by hand.
APT_PACKAGES := docker.io wireguard-tools wireguard-go restic rsync python3-xxhash openssh-client openssh-server \
	debootstrap cloud-init cloud-image-utils prometheus prometheus-alertmanager iproute2 iptables nftables iputils-ping \
	python3-venv ca-certificates curl jq postgresql

.PHONY: setup apt venv docker docker-stop lab lab-down test test-unit test-lab lint bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: apt venv docker  ## install Debian packages, the venv (.venv) and start Docker if needed (idempotent)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		mkdir -p /etc/postgresql-common/createcluster.d; \
		printf '%s\n' '# Prime Spark: no cluster at install; the tests start their own Postgres' \
			'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/primespark.conf; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

DOCKERD_PIDFILE := /run/spark-dockerd.pid

docker:  ## start the Docker daemon where nothing else does (no systemd, as in CI)
	@if ! docker info >/dev/null 2>&1; then \
		echo "starting dockerd (log: /var/log/spark-dockerd.log)"; \
		(setsid nohup dockerd --pidfile $(DOCKERD_PIDFILE) >/var/log/spark-dockerd.log 2>&1 &); \
		for i in $$(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
		docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/spark-dockerd.log"; exit 1; }; \
	fi

# Anything that touches the lab holds the lab lock (/tmp/spark-lab.lock): the lab is one shared thing on
# the machine. `spark lab locked` is `flock` that does not deadlock when make itself runs under flock.
LAB_LOCK := $(SPARK) lab locked --
# The main job's operations: create the deployments on the sites' work pools (site.yml installed the workers), back
# up every host with a plan (and copy offsite) and drill every one on the workers, then maintain and check the
# repositories, a pass of every sync job (the Pis' hot tiers to the NAS, the NAS to the cloud) and where each link
# stands, an agent task (a minute at most to wait for a host), and check the mesh: each writes its metrics onto the
# hosts, where Prometheus scrapes them.
LAB_FLOWS := $(SPARK) flows deploy --env $(ENV) && $(SPARK) backup now --env $(ENV) --on-worker \
	&& $(SPARK) drill run --env $(ENV) --on-worker && $(SPARK) backup maintain --env $(ENV) \
	&& $(SPARK) sync run --env $(ENV) && $(SPARK) sync status --env $(ENV) \
	&& $(SPARK) tier run --env $(ENV) && $(SPARK) task run --template count-readings --env $(ENV) --wait 60 \
	&& $(SPARK) mesh check --env $(ENV) --publish

lab: setup  ## bring up the lab fleet, apply site.yml (monitoring included), run the flows once, say what to look at next
	$(SPARK) validate --env $(ENV)
	$(SPARK) lab up --env $(ENV)
	@if [ -f site.yml ]; then \
		$(LAB_LOCK) $(BIN)/ansible-playbook -i inventory/$(ENV).fleet.yml site.yml; \
	else echo "no site.yml yet: no playbook to apply"; fi
	eval "$$($(SPARK) lab env --env $(ENV))" && $(LAB_LOCK) sh -c '$(LAB_FLOWS)' 
	@eval "$$($(SPARK) lab env --env $(ENV))"; \
	echo; echo "The lab is up. Look next at:"; \
	echo "  Prefect UI          $${PREFECT_API_URL%/api}   (its password: PREFECT_API_AUTH_STRING in \`$(SPARK) lab env\`)"; \
	if [ -n "$${PREFECT_API_SSL_CERT_FILE:-}" ]; then \
		echo "  the fleet CA        $$PREFECT_API_SSL_CERT_FILE   (the UI and Prometheus serve only TLS: trust it in your browser)"; \
	fi; \
	echo "  pools and workers   $(SPARK) flows status --env $(ENV)"; \
	echo "  continuous sync     $(SPARK) sync status --env $(ENV)   (the sync-watch runs in the UI)"; \
	$(SPARK) monitoring urls --env $(ENV) | sed 's/^/  /'; \
	echo "  the fleet at a view $(SPARK) status --env $(ENV)"; \
	echo "  hosts               $(SPARK) lab status"; \
	echo "  a shell on a host   $(SPARK) lab ssh HOST   (hosts: $(SPARK) lab status)"; \
	echo "  Ansible             $(BIN)/ansible all -i inventory/$(ENV).fleet.yml -m ping"; \
	echo "  take it down        $(SPARK) lab down"

lab-down: venv  ## remove the lab's containers and networks, stop its Prefect server
	$(SPARK) lab down --env $(ENV)

# Unit and lab tests run as two pytest processes: Prefect keeps process-wide client services (concurrency
# slots), and a lab run's services must not leak into the unit tests' own throwaway Prefect server.
# A Docker daemon that answered before the run (yours, or one an earlier `make lab` started) keeps running: its
# containers are not the tests' to stop.
test:  ## run every test (unit beside lab end-to-end); stops the dockerd it started, if it started one
	@docker_was_up=0; docker info >/dev/null 2>&1 && docker_was_up=1; \
	$(MAKE) --no-print-directory setup || exit $$?; \
	status=0; mkdir -p $(dir $(UNIT_LOG)); \
	echo "unit tests: beside the lab tests ($(UNIT_NICE)); their output in $(UNIT_LOG), printed when both end"; \
	$(UNIT_NICE) $(BIN)/pytest -m 'not lab' -n $(UNIT_JOBS) $(PYTEST_ARGS) >$(UNIT_LOG) 2>&1 & unit=$$!; \
	$(BIN)/pytest -m lab $(LAB_DURATIONS) $(PYTEST_ARGS) || status=$$?; \
	wait $$unit || status=$$?; \
	echo; echo "== unit tests ($(UNIT_LOG))"; cat $(UNIT_LOG); \
	[ $$docker_was_up = 1 ] || $(MAKE) --no-print-directory docker-stop; exit $$status

docker-stop:  ## stop the dockerd that `make docker` started, if any (a daemon started otherwise is left alone)
	@if [ -f $(DOCKERD_PIDFILE) ]; then \
		pid=$$(cat $(DOCKERD_PIDFILE)); \
		if kill $$pid 2>/dev/null; then \
			echo "stopping the dockerd that make started (pid $$pid)"; \
			for i in $$(seq 1 30); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
		fi; \
	fi

test-unit: venv  ## only the fast tests (no Docker)
	$(BIN)/pytest -m 'not lab' -n $(UNIT_JOBS) $(PYTEST_ARGS)

test-lab: setup  ## only the lab end-to-end tests
	$(BIN)/pytest -m lab $(LAB_DURATIONS) $(PYTEST_ARGS)

lint: apt venv  ## ruff (complexity limit included), mypy, and ansible-lint's production profile (offline)
	$(BIN)/ruff check src tests bench stacks flows policies
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint

bench: setup  ## run every benchmark
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:  ## remove the venv and caches (not the lab's state)
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
