# Convenience targets; everything they run is plain cargo and scripts/cluster.sh.
.PHONY: node test sim cluster-bootstrap cluster-stop bench

node: ## a single-node cluster serving clients on 127.0.0.1:8080
	cargo run --release -p walrus-node -- --node-id 1 --data-dir ./data

test:
	cargo test --workspace

# Tier B simulation: the real walrus-node on madsim, in its own target directory.
# SIMB_SEEDS=<n> (default 500) and SIMB_FIRST=<n> pick the seeds; SIMB_SEED=<n> replays one
# seed and prints its event trace (add RUST_LOG=walrus_node=debug for the nodes' logs).
sim:
	RUSTFLAGS="--cfg madsim" cargo test -p sim-tests --test cluster_sim --target-dir target/sim -- --nocapture $(if $(SIMB_SEED),cluster_swarm,)

cluster-bootstrap:
	scripts/cluster.sh bootstrap

cluster-stop:
	scripts/cluster.sh stop

bench:
	cargo bench -p walrus --bench engine
