# csi-lvm: `make setup` once, then `make demo` or `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
VMRUN  := $(PY) scripts/vmrun.py
# A subset of the real-LVM suite: make lvm-tests LVM_TESTS=tests/lvm/test_node.py
LVM_TESTS ?= tests/lvm tests/contract
# What depends on the kernel runs again on a newer one (tools/kernels.py).
NEWER_KERNEL_TESTS ?= tests/lvm/test_group_snapshots.py

.PHONY: setup tools proto lint unit image-test lvm-tests stress test demo sanity e2e bench clean

setup:
	scripts/setup.sh

# The upstream programs the sanity and cluster tiers run (csi-sanity, the
# sidecars, Kubernetes), built from the Go module proxy at the versions
# tools/versions.toml pins, into ~/.cache/csi-lvm/tools (not the checkout).
# The tiers run this themselves; a second run finds everything cached.
tools: setup
	$(PY) tools/install.py

# csi_pb2_grpc.pyi (mypy-protobuf) types the servicers' requests and answers.
proto: setup
	PATH=$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc --proto_path=csi_lvm/csi=proto \
	    --python_out=. --pyi_out=. --grpc_python_out=. \
	    --mypy_grpc_out=generate_concrete_servicer_stubs,only_sync,quiet:. csi_lvm/csi/csi.proto
	PATH=$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc --proto_path=csi_lvm/peer=proto \
	    --python_out=. --pyi_out=. --grpc_python_out=. \
	    --mypy_grpc_out=generate_concrete_servicer_stubs,only_sync,quiet:. csi_lvm/peer/peer.proto

lint: setup
	$(VENV)/bin/ruff check csi_lvm tests scripts bench e2e sanity tools
	$(VENV)/bin/ruff format --check csi_lvm tests scripts bench e2e sanity tools
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q tests/unit tests/contract

# The plugin image: built and run in Docker on this host, not in the VM
# (starts dockerd if none runs; makes the base image offline if missing).
image-test: setup
	$(PY) -m pytest -q tests/image

# The real-LVM suite: inside one VM where this kernel lacks device-mapper. Two
# workers keep both virtual CPUs busy; each has its own volume group and driver.
# Then what depends on the kernel, in a VM of Debian's backports kernel.
lvm-tests: setup
	$(VMRUN) -- env CSI_LVM_REQUIRE_REAL_LVM=1 python -m pytest -q -p no:cacheprovider \
	    -p no:hypothesispytest -n 2 --junitxml=build/vm/lvm-junit.xml $(LVM_TESTS)
	$(VMRUN) --kernel "$$($(PY) -m tools.kernels)" -- env CSI_LVM_REQUIRE_REAL_LVM=1 \
	    python -m pytest -q -p no:cacheprovider -p no:hypothesispytest \
	    --junitxml=build/vm/lvm-newer-kernel-junit.xml $(NEWER_KERNEL_TESTS)

test: lint unit image-test lvm-tests

# Crashes (SIGKILL mid-call), 64+8 concurrent calls and hostile input, in one
# VM: longer than the main suite, so a target of its own.
stress: setup
	rm -f build/vm/crash-driver.log
	$(VMRUN) -- timeout 2400 python -m pytest -q -p no:cacheprovider -n 2 -s \
	    --junitxml=build/vm/stress-junit.xml tests/stress

demo: setup
	$(VMRUN) -- python scripts/demo.py

# The benchmark: the driver against raw LVM in one VM run (~15 min
# under TCG); prints the table and keeps the JSON as bench/results.json.
BENCH_ARGS ?=
bench: setup
	$(VMRUN) --memory 14G -- python bench/run.py --json build/vm/bench.json $(BENCH_ARGS); \
	status=$$?; cp build/vm/bench.json bench/results.json && exit $$status

# Upstream csi-sanity, once per device class (installs it on first use).
sanity: setup
	$(PY) sanity/run.py

# The Kubernetes end-to-end tier: a two-node cluster in one VM running
# deploy/kubernetes's pods (installs its binaries on first use and builds
# the plugin image with Docker on the host; see e2e/README.md). Not part of
# `make test`. The VM boots the newer kernel (tools/kernels.py), on which a
# group snapshot can hold mounted volumes (check 21).
E2E_ARGS ?=
e2e: setup
	$(PY) e2e/run.py --kernel "$$($(PY) -m tools.kernels)" $(E2E_ARGS)

clean:
	rm -rf build
