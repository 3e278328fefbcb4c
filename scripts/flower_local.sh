#!/usr/bin/env bash
# Run a splitfed federated config on a real Flower deployment on this machine: one SuperLink and one
# SuperNode per client (partition-id 0..N-1) on loopback, `flwr run examples/flower`, then tear down.
#
#   scripts/flower_local.sh CONFIG.yaml [WORKDIR]
#
# N is the config's federated.clients. Each node writes its final adapters to WORKDIR/node-<i>/global/;
# logs go to WORKDIR/*.log; the server writes results.json to the config's output_dir.
# Insecure (no TLS) on purpose: loopback only. For several machines, see the README.
set -euo pipefail

config=$(realpath "${1:?usage: $0 CONFIG.yaml [WORKDIR]}")
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
work=$(realpath -m "${2:-$root/runs/flower-local}")
mkdir -p "$work/flwr-home"
clients=$("$bin/python" -c "import sys; from splitfed.config import load_config; print(load_config(sys.argv[1]).federated.clients)" "$config")

free_port() { "$bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
wait_port() {
  for _ in $(seq 1 200); do
    if "$bin/python" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))))" "$1"; then return 0; fi
    sleep 0.3
  done
  echo "nothing listens on port $1; see the logs in $work" >&2
  return 1
}

export FLWR_HOME="$work/flwr-home" PATH="$bin:$PATH"
link_port=$(free_port)
printf '[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
  "$link_port" > "$FLWR_HOME/config.toml"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

flower-superlink --insecure --port "$link_port" > "$work/superlink.log" 2>&1 &
pids+=($!)
wait_port "$link_port"
for ((i = 0; i < clients; i++)); do
  node_port=$(free_port)
  flower-supernode --insecure --superlink "127.0.0.1:$link_port" --port "$node_port" \
    --node-config "partition-id=$i output-dir=\"$work/node-$i\"" > "$work/supernode-$i.log" 2>&1 &
  pids+=($!)
  wait_port "$node_port"
done
echo "SuperLink on 127.0.0.1:$link_port, $clients SuperNodes; logs in $work"
flwr run "$root/examples/flower" local-deployment --stream --run-config "config=\"$config\""
