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
  timeout --foreground 15 "$consul" leave -http-addr="$http" >/dev/null || kill -TERM "$agent" 2>/dev/null
  while kill -0 "$agent" 2>/dev/null; do wait "$agent"; done  # again if a signal interrupts the wait
}

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
  -data-dir="${CONSUL_AGENT_DATA_DIR:-/tmp/consul}" \
  -log-level="${CONSUL_AGENT_LOG_LEVEL:-warn}" \
  -hcl='disable_update_check = true' \
  "${joins[@]}" &
agent=$!

# 2. Bounded wait for its API.
wait_s=${CONSUL_AGENT_WAIT_SECONDS:-30}
deadline=$((SECONDS + wait_s))
until "$consul" info -http-addr="$http" >/dev/null 2>&1; do
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
