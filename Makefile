# The two commands a newcomer types: `make run` and `make test`.
SHELL := /bin/bash
CACHE_DIR ?= ./wharf-cache
LISTEN ?= 0.0.0.0:5000

.PHONY: run test build lint bench clean

run:
	@scripts/ensure-deps.sh run
	cargo build --release --bin wharf-proxy
	./target/release/wharf-proxy --config deploy/wharf-dev.toml --cache-dir $(CACHE_DIR) --listen $(LISTEN)

test:
	@scripts/ensure-deps.sh test
	cargo build --workspace --bins
	cargo nextest run --workspace --no-fail-fast

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench:
	@scripts/ensure-deps.sh bench
	python3 bench/bench.py

clean:
	cargo clean
	rm -rf $(CACHE_DIR)
