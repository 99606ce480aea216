# ctbalancer: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-12)

.PHONY: venv test check demo fleet-demo bench bench-fanout soak hostile clean etcd

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# etcd for the fleet tests and make fleet-demo: Debian's etcd-server, when missing.
etcd:
	@if ! command -v etcd >/dev/null 2>&1; then \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends etcd-server; \
	fi

# The whole test suite (real HTTPS instances, real gunicorn workers, real etcd clusters).
test: $(STAMP) etcd
	$(BIN)/python -m pytest

# The unit tables only (configuration, routes, headers, selection, failover
# decisions, health, dependency couplings): seconds, for every edit. `make test`
# stays the whole suite.
check: $(STAMP)
	$(BIN)/python -m pytest -q -m unit

# Two demo instances on loopback, the balancer in front of them, the seed's
# check request through it; serves until Ctrl-C.
demo: $(STAMP)
	$(BIN)/python -m demo.run

# A fleet: a 3-member etcd cluster and two balancers on loopback sharing it,
# in front of the demo instances; one certificate rotation trusted once and
# seen by both; serves until Ctrl-C.
fleet-demo: $(STAMP) etcd
	$(BIN)/python -m demo.fleet

# Benchmark: the balancer against a direct connection and nginx, on loopback
# (bench/run.py; BENCH_SECONDS=2 BENCH_ROUNDS=1 for a smoke run). Installs
# nginx and wrk with apt-get when they are missing.
bench: $(STAMP)
	@if ! command -v nginx >/dev/null 2>&1 && ! test -x /usr/sbin/nginx || ! command -v wrk >/dev/null 2>&1; then \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y nginx wrk; \
	fi
	$(BIN)/python bench/run.py

# Fan-out writes against the same write forwarded to one instance and sent
# directly (bench/fanout.py; FANOUT_WRITES=100 for a short run).
bench-fanout: $(STAMP)
	$(BIN)/python bench/fanout.py

# Soak: 10 minutes of mixed load through 4 workers while the two instances take
# turns restarting every minute and one rotates its certificate (bench/soak.py;
# SOAK_SECONDS=40 SOAK_RESTART_EVERY=15 for a short run). Report: bench/results/soak.md.
soak: $(STAMP)
	$(BIN)/python bench/soak.py

# Hostile clients: slowhttptest (slow body, Slowloris, slow read), 2,000 idle
# connections and testssl.sh against the balancer on loopback, with normal
# requests measured meanwhile (bench/hostile.py; HOSTILE_SECONDS=10 for a
# short run). Installs slowhttptest and testssl.sh with apt-get when missing.
hostile: $(STAMP)
	@if ! command -v slowhttptest >/dev/null 2>&1 || ! command -v testssl >/dev/null 2>&1; then \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y slowhttptest testssl.sh; \
	fi
	$(BIN)/python bench/hostile.py

clean:
	rm -rf $(VENV) .demo .fleet-demo .pytest_cache
