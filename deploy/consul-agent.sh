#!/bin/bash
# Entrypoint of the modelgrid containers in deploy/docker-compose.yml: runs the service given as arguments next to a
# Consul client agent of its own, as on a real host (deploy/hosts/*.toml): the service registers with and discovers
# through that agent at http://127.0.0.1:8500, and advertises the address the agent reports for its node.
#
#   consul-agent.sh python -m services.registry
#
# 1. starts `consul agent` (client mode) in the background, joined (retrying) to the server(s) in CONSUL_AGENT_JOIN;
# 2. waits until it answers /v1/agent/self (`consul info`), at most CONSUL_AGENT_WAIT_SECONDS, else exits 1;
# 3. runs the service; SIGTERM and SIGINT go to the service, which stops in order (and deregisters from the agent);
# 4. once the service has exited, `consul leave`: the node leaves the cluster instead of being reported failed.
# Exits with the service's status. If the agent dies first, the service is stopped too and the status is non-zero,
# so that the restart policy brings both back.
#
# Environment (defaults for the container; tests/e2e/test_compose.py runs this script on loopback ports):
#   CONSUL_AGENT_JOIN          server(s) to join, space-separated host[:serf port]     consul
#   CONSUL_AGENT_BIND          gossip address                                          {{ GetPrivateIP }} (the container's)
#   CONSUL_AGENT_HTTP_PORT     HTTP API port, on 127.0.0.1 only                        8500
#   CONSUL_AGENT_SERF_PORT     gossip (serf LAN) port                                  8301
#   CONSUL_AGENT_NODE          node name                                               $HOSTNAME (the container's)
#   CONSUL_AGENT_DATA_DIR      the agent's state, inside the container                 /tmp/consul
#   CONSUL_AGENT_WAIT_SECONDS  how long the agent may take to answer                   30
#   CONSUL_AGENT_LOG_LEVEL     the agent's log level (its lines go to the container's log)  warn
#   CONSUL_AGENT_BIN           the consul binary                                       consul
#   CONSUL_AGENT_TOKEN_FILE    the agents' Consul ACL token (kit.consul_acl.AGENT_RULES) none: ACLs off
#   CONSUL_AGENT_TLS_DIR       the mesh's certificates (kit.tls): the agent's health     none: plaintext checks
#                              checks present its `consul` certificate to the service
#
# With CONSUL_AGENT_TOKEN_FILE the agent runs with ACLs on as its server does (default deny), its token in a config
# file of mode 0600 in its data dir (on no command line); this script asks the agent with that token too. The
# service uses a token of its own (MODELGRID_<SERVICE>_CONSUL_TOKEN_FILE).
set -u

consul=${CONSUL_AGENT_BIN:-consul}
http=127.0.0.1:${CONSUL_AGENT_HTTP_PORT:-8500}
default_bind='{{ GetPrivateIP }}'
service= stopping= agent_died=

log() { echo "consul-agent.sh: $*" >&2; }
[ $# -gt 0 ] || { log "usage: consul-agent.sh <service command> [args...]"; exit 2; }

# A stop request goes to the service once it runs; before that, it only ends the wait below.
trap 'stopping=1; [ -z "$service" ] || kill -TERM "$service" 2>/dev/null' TERM INT

# Ends the agent: a graceful leave (bounded), else SIGTERM (a client agent leaves on SIGTERM too); then reaps it.
leave() {
  timeout --foreground 15 "$consul" leave -http-addr="$http" "${token_args[@]}" >/dev/null ||
    kill -TERM "$agent" 2>/dev/null
  while kill -0 "$agent" 2>/dev/null; do wait "$agent"; done  # again if a signal interrupts the wait
}

# ACLs: the agent's config file (made here, mode 0600) and the token of this script's own calls.
data_dir=${CONSUL_AGENT_DATA_DIR:-/tmp/consul}
acl_args=() token_args=()
if [ -n "${CONSUL_AGENT_TOKEN_FILE:-}" ]; then
  agent_token=$(tr -d '[:space:]' < "$CONSUL_AGENT_TOKEN_FILE") ||
    { log "cannot read CONSUL_AGENT_TOKEN_FILE ($CONSUL_AGENT_TOKEN_FILE)"; exit 1; }
  if ! [[ $agent_token =~ ^[A-Za-z0-9-]+$ ]]; then
    log "CONSUL_AGENT_TOKEN_FILE ($CONSUL_AGENT_TOKEN_FILE) holds no token"; exit 1
  fi
  mkdir -p "$data_dir"
  (
    umask 077
    printf '{"acl": {"enabled": true, "default_policy": "deny", "down_policy": "extend-cache",
      "enable_token_persistence": true, "tokens": {"agent": "%s"}}}\n' "$agent_token" > "$data_dir/acl.json"
  ) || { log "cannot write $data_dir/acl.json"; exit 1; }
  acl_args=(-config-file="$data_dir/acl.json")
  token_args=(-token-file="$CONSUL_AGENT_TOKEN_FILE")
fi

# Internal mTLS: the service accepts only callers with a certificate from the mesh's CA, Consul's checks included.
tls_args=()
if [ -n "${CONSUL_AGENT_TLS_DIR:-}" ]; then
  for f in ca.pem consul.pem consul-key.pem; do
    [ -r "$CONSUL_AGENT_TLS_DIR/$f" ] || { log "CONSUL_AGENT_TLS_DIR ($CONSUL_AGENT_TLS_DIR) lacks $f"; exit 1; }
  done
  tls_args=(
    -hcl="ca_file = \"$CONSUL_AGENT_TLS_DIR/ca.pem\""
    -hcl="cert_file = \"$CONSUL_AGENT_TLS_DIR/consul.pem\""
    -hcl="key_file = \"$CONSUL_AGENT_TLS_DIR/consul-key.pem\""
    -hcl='enable_agent_tls_for_checks = true'
    -hcl='server_name = "modelgrid"'  # the checks' SNI: every certificate of the mesh names it
  )
fi

# 1. The client agent. DNS and gRPC ports are off: the services only use its HTTP API.
joins=()
for server in ${CONSUL_AGENT_JOIN:-consul}; do joins+=("-retry-join=$server"); done
"$consul" agent \
  -node="${CONSUL_AGENT_NODE:-$HOSTNAME}" \
  -bind="${CONSUL_AGENT_BIND:-$default_bind}" \
  -client=127.0.0.1 \
  -http-port="${CONSUL_AGENT_HTTP_PORT:-8500}" \
  -serf-lan-port="${CONSUL_AGENT_SERF_PORT:-8301}" \
  -dns-port=-1 -grpc-port=-1 \
  -data-dir="$data_dir" \
  -log-level="${CONSUL_AGENT_LOG_LEVEL:-warn}" \
  -hcl='disable_update_check = true' \
  "${acl_args[@]}" "${tls_args[@]}" "${joins[@]}" &
agent=$!

# 2. Bounded wait for its API.
wait_s=${CONSUL_AGENT_WAIT_SECONDS:-30}
deadline=$((SECONDS + wait_s))
until "$consul" info -http-addr="$http" "${token_args[@]}" >/dev/null 2>&1; do
  if ! kill -0 "$agent" 2>/dev/null; then
    wait "$agent"; log "the Consul agent exited (status $?) before answering on http://$http"; exit 1
  fi
  if [ -n "$stopping" ]; then leave; exit 143; fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "the Consul agent did not answer http://$http/v1/agent/self within ${wait_s}s; not starting: $*"
    kill -TERM "$agent" 2>/dev/null; wait "$agent"; exit 1
  fi
  sleep 0.2
done

# 3. The service. Wait for whichever of the two exits first; a trapped signal interrupts the wait (no pid set).
"$@" &
service=$!
[ -z "$stopping" ] || kill -TERM "$service" 2>/dev/null  # a stop request that came in meanwhile
pids=("$agent" "$service")
while :; do
  unset finished
  wait -n -p finished "${pids[@]}"; status=$?
  if [ "${finished:-}" = "$service" ]; then
    break
  elif [ "${finished:-}" = "$agent" ]; then
    log "the Consul agent exited (status $status); stopping the service"
    agent_died=1
    pids=("$service")
    kill -TERM "$service" 2>/dev/null
  fi
done

# 4. The service has stopped (and deregistered): the node leaves the cluster.
if [ -n "$agent_died" ]; then
  [ "$status" -ne 0 ] || status=1
else
  leave
fi
exit "$status"
