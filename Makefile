# The README's two commands: `make demo` and `make test`. Each does all the
# set-up itself on a fresh Debian machine (run as root: namespaces, raw
# sockets and nftables need it).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := nftables iproute2 ethtool curl tcpdump netsniff-ng procps iputils-ping gcc python3-dev python3-venv \
	clang llvm libbpf-dev bpftool wrk haproxy iperf3 keepalived tshark
# Tools whose absence means the apt step has not run on this machine (checked
# again whenever this Makefile changes, so a new package reaches old checkouts).
APT_TOOLS := nft ip ethtool curl tcpdump trafgen ping gcc clang llvm-strip bpftool wrk haproxy iperf3 keepalived tshark
# Files, likewise, of packages that install no command (libbpf-dev).
APT_FILES := /usr/include/bpf/libbpf.h
FAST_SO = $(wildcard pylvs/_fast*.so)
C_SOURCES := $(wildcard pylvs/_fast/*.c pylvs/_fast/*.h pylvs/bpf/*.c pylvs/bpf/*.h) setup.py

.PHONY: demo test test-fast bench deps build clean lab-clean

demo: build
	$(PY) -m pylvs.lab.demo

# The namespace tests mostly wait (paced downloads, timeouts, processes
# starting): TEST_JOBS pytest-xdist workers run them side by side, each test
# in namespaces of its own names. worksteal: a worker that runs out takes
# half of the busiest one's queue, so no worker is left alone with a run of
# slow tests at the end. TEST_JOBS=0: one process, no xdist.
TEST_JOBS ?= 3

test: build
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal tests

# Only the tests that need no namespaces (fast feedback while editing).
test-fast: build
	$(PY) -m pytest -q -m "not netns" tests

# Only `make bench` needs these: perf and valgrind profile the engine
# (bench/README.md, "Where the engine's nanoseconds go").
BENCH_APT_PACKAGES := linux-perf valgrind
BENCH_APT_TOOLS := perf valgrind

bench: build .stamp-apt-bench
	$(PY) -m bench engine --json bench/results/engine.json
	$(PY) -m bench e2e --json bench/results/e2e.json
	$(PY) -m bench e2e --fwd dr --json bench/results/e2e-dr.json
	$(PY) -m bench e2e --fwd tun --json bench/results/e2e-tun.json
	$(PY) -m bench conn-rate --json bench/results/conn-rate.json
	$(PY) -m bench latency --json bench/results/latency.json
	$(PY) -m bench throughput --json bench/results/throughput.json

deps: .stamp-apt

# $(call apt_install,TOOLS,FILES,PACKAGES): install PACKAGES when one of the
# commands TOOLS or one of the FILES is missing.
define apt_install
	@missing=""; for t in $(1); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	for f in $(2); do [ -e $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(3) >/dev/null; \
	fi
	@touch $@
endef

.stamp-apt: Makefile
	$(call apt_install,$(APT_TOOLS),$(APT_FILES),$(APT_PACKAGES))

.stamp-apt-bench: .stamp-apt
	$(call apt_install,$(BENCH_APT_TOOLS),,$(BENCH_APT_PACKAGES))

$(VENV)/.stamp: pyproject.toml .stamp-apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

build: $(VENV)/.stamp .stamp-build

.stamp-build: $(C_SOURCES) $(VENV)/.stamp
	$(PY) setup.py -q build_ext --inplace
	@touch $@

# Remove namespaces and steering tables a killed run may have left behind.
lab-clean: build
	$(PY) -m pylvs.cli.main lab down --all

clean:
	rm -rf build *.egg-info pylvs/_fast*.so pylvs/_bpf*.so pylvs/bpf/*.bpf.o .stamp-build
