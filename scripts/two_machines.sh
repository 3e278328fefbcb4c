#!/usr/bin/env bash
# The README's walkthrough "A model party and data parties on different machines", run on one
# Linux host with three network namespaces standing in for three machines: the model party and
# hospitals A and B, each with its own network stack, linked by veth pairs (10.77.1.0/24 to A,
# 10.77.2.0/24 to B). TLS with client certificates and per-party tokens, as in the README.
# Needs root (ip netns). Usage: scripts/two_machines.sh [STEPS]   (default 6)
set -euo pipefail
steps=${1:-6}
cd "$(dirname "$0")/.."
splitfed=$PWD/.venv/bin/splitfed
config=examples/ht_splitfrozen_classification.yaml
work=$(mktemp -d -t splitfed-two-machines-XXXX)
ns_model=sf-model-$$ ns_a=sf-a-$$ ns_b=sf-b-$$
server_pid=""

cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    for ns in "$ns_model" "$ns_a" "$ns_b"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

for ns in "$ns_model" "$ns_a" "$ns_b"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
link() {  # link NS_PEER SUBNET: a veth pair between the model party and a hospital
    local peer=$1 subnet=$2
    ip link add "m$subnet-$$" netns "$ns_model" type veth peer name "h$subnet-$$" netns "$peer"
    ip -n "$ns_model" addr add "10.77.$subnet.1/24" dev "m$subnet-$$"
    ip -n "$peer" addr add "10.77.$subnet.2/24" dev "h$subnet-$$"
    ip -n "$ns_model" link set "m$subnet-$$" up
    ip -n "$peer" link set "h$subnet-$$" up
}
link "$ns_a" 1
link "$ns_b" 2

# once: a test CA, the server's certificate for both of its addresses, one client certificate per hospital
"$splitfed" certs "$work/certs" --host 10.77.1.1 --host 10.77.2.1 --client hospital-a --client hospital-b
token_a=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
token_b=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
printf 'hospital-a: %s\nhospital-b: %s\n' "$token_a" "$token_b" > "$work/tokens.yaml"

common=(--set model.num_labels=5 --set "train.steps=$steps" --set data.max_eval=40
        --set train.eval_before=false --set data.num_parties=2)
OMP_WAIT_POLICY=PASSIVE ip netns exec "$ns_model" "$splitfed" serve "$config" --host 0.0.0.0 --port 50051 \
    --tls-cert "$work/certs/server.pem" --tls-key "$work/certs/server.key" --tls-ca "$work/certs/ca.pem" \
    --tokens "$work/tokens.yaml" "${common[@]}" --set "output_dir=$work/model" > "$work/serve.log" 2>&1 &
server_pid=$!

join() {  # join NS HOSPITAL TOKEN SERVER_IP PARTY
    SPLITFED_TOKEN=$3 OMP_WAIT_POLICY=PASSIVE ip netns exec "$1" "$splitfed" join "$config" \
        --server "$4:50051" --tls-ca "$work/certs/ca.pem" \
        --tls-cert "$work/certs/$2.pem" --tls-key "$work/certs/$2.key" \
        --parties 2 --party "$5" --partition dirichlet:0.5 --no-progress \
        "${common[@]}" --set "output_dir=$work/$2"
}
for _ in $(seq 120); do grep -q "serving" "$work/serve.log" 2>/dev/null && break; sleep 1; done
join "$ns_a" hospital-a "$token_a" 10.77.1.1 0 > "$work/hospital-a.log" 2>&1 & pid_a=$!
join "$ns_b" hospital-b "$token_b" 10.77.2.1 1 > "$work/hospital-b.log" 2>&1 & pid_b=$!
status=0
wait "$pid_a" || status=1
wait "$pid_b" || status=1
# A hospital with no token is refused; one in the other's namespace cannot even reach the other link.
if SPLITFED_TOKEN= ip netns exec "$ns_a" "$splitfed" join "$config" --server 10.77.1.1:50051 \
    --tls-ca "$work/certs/ca.pem" --tls-cert "$work/certs/hospital-a.pem" \
    --tls-key "$work/certs/hospital-a.key" "${common[@]}" --set "output_dir=$work/nobody" > "$work/nobody.log" 2>&1; then
    echo "a data party without a token was let in" >&2; status=1
fi
kill -TERM "$server_pid"; wait "$server_pid" || true; server_pid=""
for who in hospital-a hospital-b; do
    echo "== $who"; grep -E "joined|after fine-tuning|training:" "$work/$who.log" || { cat "$work/$who.log"; status=1; }
    test -f "$work/$who/results.json" || status=1
done
echo "== without a token"; tail -n 2 "$work/nobody.log"
echo "== model party"; tail -n 3 "$work/serve.log"
test -f "$work/model/model_party_server/final/model_party/adapter.safetensors" || status=1
[ "$status" = 0 ] && echo "two-machine walkthrough: OK ($work)" || echo "two-machine walkthrough: FAILED ($work)"
exit "$status"
