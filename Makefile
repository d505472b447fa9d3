# Convenience targets; everything they run is plain cargo and scripts/cluster.sh.
.PHONY: node test cluster-bootstrap cluster-stop bench

node: ## a single-node cluster serving clients on 127.0.0.1:8080
	cargo run --release -p walrus-node -- --node-id 1 --data-dir ./data

test:
	cargo test --workspace

cluster-bootstrap:
	scripts/cluster.sh bootstrap

cluster-stop:
	scripts/cluster.sh stop

bench:
	cargo bench -p walrus --bench engine
