# ctbalancer: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-12)

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# The whole test suite (real HTTPS instances, real gunicorn workers).
test: $(STAMP)
	$(BIN)/python -m pytest

# Two demo instances on loopback, the balancer in front of them, the seed's
# check request through it; serves until Ctrl-C.
demo: $(STAMP)
	$(BIN)/python -m demo.run

clean:
	rm -rf $(VENV) .demo .pytest_cache
