# Two commands from a fresh clone: `make sweep` and `make test`. Both (re)build .venv only when
# requirements.lock or pyproject.toml changed since the last install. The venv is exactly the lock:
# pip installs it with hashes checked (pip, not uv: pip takes the torch wheels a machine keeps on
# disk), then the project itself without dependencies.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
# `make lock` keeps every pin that still satisfies pyproject.toml; `make lock-upgrade` takes the
# newest releases it allows. Both resolve for CPython 3.11 on this platform (Linux x86_64).
COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
	--custom-compile-command "make lock" -o $(LOCK)

.PHONY: sweep test test-fast install check-env lock lock-upgrade bench clean cluster-deps cluster-src

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --require-hashes -r $(LOCK)
	@# bytecode on every core, where pip compiles on one (`make install` from a fresh clone: 158 s with
	@# pip's compiling, 134 s so); a file for a newer Python (one of torch's tests) fails as under pip
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_path('purelib'), quiet=2, workers=0)"
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# Fails, naming each package, when the venv is not the lock (pip check, then versions).
check-env: $(STAMP)
	@$(PY) scripts/check_env.py $(LOCK)

lock:
	@test -x $(VENV)/bin/uv || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install -q uv; }
	$(COMPILE)

lock-upgrade:
	@test -x $(VENV)/bin/uv || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install -q uv; }
	$(COMPILE) --upgrade

sweep: $(STAMP)
	$(PY) -m sweeps.dropout_grid $(ARGS)

test: check-env
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: check-env
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Debian/Ubuntu packages that `ray up cluster-onprem.yaml` and its test need (SSH server and
# client, rsync, netcat); the test skips, saying so, without them.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
cluster-deps:
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync netcat-openbsd

# The project's files for cluster-onprem.yaml's file_mounts (scripts/cluster_src.sh says why)
cluster-src:
	scripts/cluster_src.sh build/cluster-src

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf results report .pytest_cache
