# The two commands a newcomer types: `make run` and `make test`.
SHELL := /bin/bash
CACHE_DIR ?= ./wharf-cache
DATA_DIR ?= ./wharf-data
LISTEN ?= 0.0.0.0:5000
CONTROL_LISTEN ?= 0.0.0.0:7000

.PHONY: run test test-deploy dist image build lint fuzz bench bench-cluster bench-control bench-startup clean

run:
	@scripts/ensure-deps.sh run
	cargo build --release --bin wharf
	@echo "make run: control plane on $(CONTROL_LISTEN) (embedded store in $(DATA_DIR)), one node on $(LISTEN) (cache in $(CACHE_DIR))"
	@echo "make run: admin token in $(DATA_DIR)/admin.token (for regctl: export WHARF_TOKEN=\$$(cat $(DATA_DIR)/admin.token))"
	./target/release/wharf dev --listen $(CONTROL_LISTEN) --data-dir $(DATA_DIR) \
		--dev-node-listen $(LISTEN) --dev-cache-dir $(CACHE_DIR)

test:
	@scripts/ensure-deps.sh test
	cargo build --workspace --bins
	cargo nextest run --workspace --no-fail-fast

# The container image test (builds the dist binaries and the image with dockerd: slow).
test-deploy:
	@scripts/ensure-deps.sh test
	cargo build --workspace --bins
	cargo nextest run -p wharf-tests --test deploy_image --run-ignored all --no-capture

# Release binaries: stripped, LTO, the git commit in --version (target/dist/).
dist:
	WHARF_GIT_COMMIT=$$(git rev-parse --short=12 HEAD) cargo build --profile dist -p wharf-proxy -p wharf-control -p wharf-cli --bins
	@ls -l target/dist/wharf-proxy target/dist/wharf-control target/dist/regctl

# The container image (deploy/image/), built from what is local; also saved to target/image/.
image:
	scripts/build-image.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The parsers' and the REST JSON's property tests with many more cases than `make test` runs.
FUZZ_CASES ?= 50000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --release --workspace --lib fuzz

bench:
	@scripts/ensure-deps.sh bench
	python3 bench/bench.py
	python3 bench/warm.py --wharf-bin target/release/wharf-proxy

# Peer fetch: three nodes on one control plane against three that each fetch alone, one throttled upstream.
bench-cluster:
	@scripts/ensure-deps.sh bench
	python3 bench/cluster.py

# Config propagation (write acked -> every node serving), control-plane RSS and idle CPU.
bench-control:
	cargo build --release --bins
	cargo bench -p wharf-tests --bench propagation

# wharf-proxy start-up with 100,000 cached entries (cold page cache too when run as root).
bench-startup:
	cargo build --release --bins
	cargo bench -p wharf-tests --bench startup

clean:
	cargo clean
	rm -rf $(CACHE_DIR) $(DATA_DIR)
