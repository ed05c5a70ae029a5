# tcpmesh — two commands do everything on a fresh Debian 12 machine, as root:
#   make demo   install what is needed, run the agent on a built-in 2-node lab, show mTLS flows
#   make test   install the same, run every test tier (unit, integration, bpf, lab, e2e, hostile, vm_ci)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-bpf test-e2e test-hostile test-vm fuzz bench cleanup clean install

setup:
	@deploy/bootstrap-debian.sh $(VENV) test,kubernetes

demo: setup
	$(VENV)/bin/tcpmesh demo

# make test: every tier; of the vm tier (tests/vm, real kernels in VMs) only the vm_ci part: the
# Debian 12 (6.1) guest and the two-VM systemd test. make test-vm: the whole kernel matrix.
test: setup
	$(PY) -m pytest -m "not vm or vm_ci" $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-bpf: setup
	$(PY) -m pytest tests/bpf $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

test-hostile: setup
	$(PY) -m pytest tests/hostile $(PYTEST_ARGS)

# make fuzz: the Hypothesis fuzzers with fresh randomness (CI runs them derandomized, reproducible).
fuzz: setup
	HYPOTHESIS_PROFILE=fresh $(PY) -m pytest tests/unit/test_fuzz_*.py $(PYTEST_ARGS)

# Debian 11 (5.10), 12 (6.1) and 13 (6.12) guests with systemd as PID 1; images are built with
# debootstrap and cached in /var/cache/tcpmesh-vm (TCPMESH_VM_CACHE), see tests/README.md.
test-vm: setup
	$(PY) -m pytest tests/vm -m vm $(PYTEST_ARGS)

# make bench: direct vs tcpmesh vs stunnel vs HAProxy on a 2-node lab (~10 min), appends to docs/benchmarks.md.
# make bench BENCH_QUICK=1: ~1-2 min, results under bench/out/ only. BENCH_ARGS: more flags (python -m bench -h).
BENCH_QUICK ?=
BENCH_ARGS ?=
bench: setup
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench $(if $(BENCH_QUICK),--quick) $(BENCH_ARGS)

# make install: tcpmesh in a venv at /opt/tcpmesh, the systemd unit, a default config (never
# overwritten); as root. DESTDIR, PREFIX, EXTRAS=kubernetes: see systemd/install.sh, docs/install-systemd.md.
install:
	systemd/install.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
