"""The mesh on three test hosts, each started by `modelgrid-host up` from its own description, as on real machines:

    a: Consul server, Redis, registry, gateway          (198.18.<k>.1)
    b: Consul server, predictor, worker agent, trainer  (198.18.<k>.2)
    c: Consul server, predictor, worker agent, trainer  (198.18.<k>.3)  (the trainers elect a leader in Consul)

Every service binds and advertises its host's address and registers with the Consul agent of its own host, with a
Consul ACL token of its own (ACLs on, default deny; the test asks Consul with the cluster's master token). The
test process reaches the hosts through the lab's client link (198.18.<k>.254). The tests run in file order and
share the module's mesh: serving across hosts, then one fault at a time (a cut link, a cut registry host, an upload
cut with its host, a dead Consul server host, the leading trainer's host dying mid-job), each measured and healed
before the next (the last one is not healed: the lab goes with it).
"""

import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from modelgrid.client.convert import ref_to_pb
from modelgrid.client.tensors import array_to_tensor
from modelgrid.gateway.v1 import gateway_pb2 as gpb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from modelgrid.predictor.v1 import predictor_pb2 as pb
from modelgrid.predictor.v1 import predictor_pb2_grpc
from modelgrid.registry.v1 import registry_pb2 as rpb
from modelgrid.trainer.v1 import trainer_pb2 as tpb
from modelgrid.trainer.v1 import trainer_pb2_grpc
from services.cli.channels import open_channel
from services.kit import tls
from services.kit.consul_acl import TOKEN_HEADER, read_token_file, write_token_file
from services.kit.localinfra import redis_ping
from services.kit.processes import REPO_ROOT
from services.kit.redis_auth import read_password_file, write_password_file

pytestmark = [pytest.mark.multihost, pytest.mark.slow]

MiB = 1 << 20
ADMIN_KEY = f"admin.multihost-{uuid.uuid4().hex}"
"""The gateway on a requires API keys, as by default; the tests call it with this one."""
X = np.array([[0.5, -1.0, 2.0, 0.1]], dtype=np.float32)
CONSUL_HTTP_PORT = 8500
# The predictor on c and the gateway run as many processes as the cores (the default, kit.replica); b's runs one.
LAYOUT = {
    "a": {
        "redis": {"port": 6379},
        "services": {"registry": {}, "gateway": {"settings": {"WEB_PORT": "-1", "ADMIN_KEY": ADMIN_KEY}}},
    },
    "b": {
        "services": {
            "predictor": {"settings": {"AUTO_LOAD": "true", "TF_THREADS": "1", "PROCESSES": "1"}},
            "agent": {"settings": {"SLOTS": "1"}},
            "trainer": {},
        }
    },
    "c": {
        "services": {
            "predictor": {"settings": {"AUTO_LOAD": "true", "TF_THREADS": "1"}},
            "agent": {"settings": {"SLOTS": "1"}},
            "trainer": {},
        }
    },
}
DIGITS_NPZ = REPO_ROOT / "data" / "digits" / "digits.npz"
FINAL_JOB_STATES = {tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED}
REJOIN_TIMEOUT_S = 180.0
# Serf notices a cut host in seconds; a loaded machine (the whole suite on 2 cores) can take much longer.
LEAVE_TIMEOUT_S = 90.0  # a host whose link comes back: Serf takes it back on a 30 s reconnect round


def description(hosts_lib, lab, host) -> str:
    """The TOML description of `host` (see deploy/hosts/): its address, the other two as Consul peers."""
    a = lab["a"]
    peers = [h.address for h in lab.hosts if h is not host]
    extra_hcl = [hosts_lib.CONSUL_TEST_HCL, f'addresses {{ http = "127.0.0.1 {host.address}" }}']
    lines = [
        f"name = {json.dumps(host.name)}",
        f"address = {json.dumps(host.address)}",
        f"state_dir = {json.dumps(hosts_lib.STATE_PATH)}",
        f'redis_url = "redis://{a.address}:6379/0"',
        # Each host's own state dir: a makes the file at its first `up`, the test copies it to b and c.
        f"redis_password_file = {json.dumps(hosts_lib.STATE_PATH + '/redis-password')}",
        # Each host's own copy of the one master token, which the operator (here, the test) writes before any `up`.
        f"consul_master_token_file = {json.dumps(hosts_lib.STATE_PATH + '/consul-master-token')}",
        "[consul]",
        "server = true",
        "bootstrap_expect = 3",
        f"retry_join = {json.dumps(peers)}",
        f"hcl = {json.dumps(extra_hcl)}",
    ]
    layout = LAYOUT[host.letter]
    if "redis" in layout:
        lines += ["[redis]", f"port = {layout['redis']['port']}"]
    for kind, table in layout["services"].items():
        lines.append(f"[services.{kind}]")
        if table.get("settings"):
            pairs = ", ".join(f"{key} = {json.dumps(value)}" for key, value in table["settings"].items())
            lines.append(f"settings = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def copy_certificates(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in source.glob("*.pem"):
        if path != tls.key_path(source, "ca"):
            (target / path.name).write_bytes(path.read_bytes())
            (target / path.name).chmod(0o600)


def operator_channel(ns, host, service: str, port: int) -> grpc.Channel:
    """A channel to a service on `host`, over mTLS as `operator`."""
    return tls.dial(f"{host.address}:{port}", service, tls.InternalTLS(ns.tls_dir, "operator"))


def host_up(host, path: Path, timeout: float = 300.0):
    """`modelgrid-host up` on `host`, in its namespaces, without waiting."""
    argv = [sys.executable, "-m", "services.host", "up", str(path), "--timeout", str(timeout)]
    return host.spawn(argv, log_path=host.log_dir / "modelgrid-host.log", cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def mesh(hosts_lib, lab, tmp_path_factory, client_for, unique, build_saved_model, internal_tls_dir):
    tmp = tmp_path_factory.mktemp("mesh")
    paths = {}
    for host in lab.hosts:
        paths[host.letter] = tmp / f"{host.letter}.toml"
        paths[host.letter].write_text(description(hosts_lib, lab, host))
        # The operator copies the mesh's certificates to every host, without the CA's key: internal gRPC is mTLS.
        copy_certificates(internal_tls_dir, host.state_dir / "tls")
    a, b, c = lab["a"], lab["b"], lab["c"]
    # Consul has ACLs on (default deny): the operator makes the cluster's master token once and copies it to every
    # host before any `up`; each host's `up` makes its services' tokens with it.
    consul_token = str(uuid.uuid4())
    for host in lab.hosts:
        write_token_file(host.state_dir / "consul-master-token", consul_token)
    # Redis requires a password: a, which runs it, makes the password file first thing in `up`; then the operator
    # (here, the test) copies it to b and c before their `up`. Consul needs all three running.
    runners = {"a": host_up(a, paths["a"])}
    wait_for((a.state_dir / "redis-password").exists, 60, "host a to make the Redis password file")
    redis_password = read_password_file(a.state_dir / "redis-password")
    for host in (b, c):
        write_password_file(host.state_dir / "redis-password", redis_password)
        runners[host.letter] = host_up(host, paths[host.letter])
    for letter, runner in runners.items():
        code = runner.wait(360)
        log = (lab[letter].log_dir / "modelgrid-host.log").read_text()
        assert code == 0, f"modelgrid-host up on {letter} failed:\n{log[-4000:]}"
    assert not redis_ping(a.address, 6379), "Redis on a answers a client without its password"
    assert redis_ping(a.address, 6379, password=redis_password)
    channel, registry = client_for(f"{a.address}:50051")
    model = unique("hosts")
    registry.ensure_model(model)
    for seed in (1, 2):
        registry.push_savedmodel(model, build_saved_model(tmp / f"m{seed}", seed=seed))
    registry.stub.SetAlias(rpb.SetAliasRequest(model_name=model, alias="production", version=1))
    gateway = open_channel(f"{a.address}:8080", [], ADMIN_KEY)
    ns = SimpleNamespace(
        hosts_lib=hosts_lib,
        lab=lab,
        paths=paths,
        a=a,
        b=b,
        c=c,
        registry=registry,
        model=model,
        predictor=predictor_pb2_grpc.PredictorStub(gateway),
        admin=gateway_pb2_grpc.GatewayAdminStub(gateway),
        trainer=trainer_pb2_grpc.TrainerStub(gateway),
        tls_dir=internal_tls_dir,
        consul_token=consul_token,
    )
    wait_for(lambda: predictor_hosts(ns) == {b.address, c.address}, 120, "predictors on b and c in the gateway")
    try:
        yield ns
    finally:
        gateway.close()
        channel.close()


def wait_for(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)
    return time.monotonic() - started


def wait_routes(ns, hosts: set[str], timeout: float, what: str) -> float:
    """Waits until the gateway routes the model to the predictors of exactly `hosts`; on failure says what the
    gateway and Consul (on host a) see."""
    try:
        return wait_for(lambda: predictor_hosts(ns) == hosts, timeout, what)
    except AssertionError as failure:
        routes = ns.admin.GetRoutes(gpb.GetRoutesRequest(), timeout=5)
        health = [
            (e["Service"]["ID"], [(c["CheckID"], c["Status"]) for c in e["Checks"]])
            for e in consul_get(ns, ns.a, "/v1/health/service/predictor")
        ]
        members = [(m["Name"], m["Status"]) for m in consul_get(ns, ns.a, "/v1/agent/members")]
        raise AssertionError(f"{failure}\nroutes: {routes}\nhealth on a: {health}\nmembers: {members}") from None


def predict(ns, stub=None, alias: str = "production") -> pb.PredictResponse:
    request = pb.PredictRequest(model=ref_to_pb(f"{ns.model}@{alias}"), inputs={"x": array_to_tensor(X)})
    return (stub or ns.predictor).Predict(request, timeout=15)


def predictor_hosts(ns, model: str = "") -> set[str]:
    """Addresses of the predictors the gateway routes `model@production` to (default: the module's model)."""
    try:
        routes = ns.admin.GetRoutes(gpb.GetRoutesRequest(), timeout=5).routes
    except grpc.RpcError:
        return set()
    upstreams = [u for r in routes if r.service == "predictor" for u in r.upstreams]
    tag = f"alias={model or ns.model}@production"
    return {u.target.rsplit(":", 1)[0] for u in upstreams if tag in u.tags}


def consul_get(ns, host, path: str, anonymous: bool = False):
    """GET from `host`'s Consul agent with the master token (under default deny, an anonymous query sees nothing),
    or with no token at all."""
    headers = {} if anonymous else {TOKEN_HEADER: ns.consul_token}
    return ns.hosts_lib.http_json("GET", f"http://{host.address}:{CONSUL_HTTP_PORT}{path}", headers=headers)


def consul_put(ns, host, path: str, body, token: str | None) -> int:
    """The HTTP status of a PUT to `host`'s Consul agent with `token` (None: anonymous)."""
    headers = {TOKEN_HEADER: token} if token else {}
    try:
        ns.hosts_lib.http_json("PUT", f"http://{host.address}:{CONSUL_HTTP_PORT}{path}", body, headers=headers)
    except urllib.error.HTTPError as refused:
        return refused.code
    return 200


def passing(ns, host, service: str) -> set[str]:
    """Addresses of the instances of `service` passing, as `host`'s agent sees them ("" if it does not answer)."""
    try:
        entries = consul_get(ns, host, f"/v1/health/service/{service}?passing=true")
    except OSError:
        return set()
    return {e["Service"]["Address"] for e in entries}


def cluster_whole(ns) -> bool:
    """Every host alive in Serf and every server a Raft voter again. A server whose link came back rejoins as a
    non-voter for a while; losing another one before then would lose the quorum."""
    try:
        members = consul_get(ns, ns.a, "/v1/agent/members")
        configuration = consul_get(ns, ns.a, "/v1/operator/raft/configuration")
    except (OSError, ValueError):
        return False
    alive = {m["Addr"] for m in members if m["Status"] == ns.hosts_lib.MEMBER_ALIVE}
    voters = {server["Address"].rsplit(":", 1)[0] for server in configuration["Servers"] if server["Voter"]}
    return alive == voters == {h.address for h in ns.lab.hosts}


def test_services_advertise_their_hosts_and_serve_across_them(mesh):
    a, b, c = mesh.a, mesh.b, mesh.c
    assert passing(mesh, a, "registry") == {a.address}
    assert passing(mesh, a, "gateway") == {a.address}
    assert passing(mesh, c, "predictor") == {b.address, c.address}
    assert passing(mesh, c, "trainer-agent") == {b.address, c.address}
    assert passing(mesh, c, "trainer") == {b.address, c.address}
    assert len(leading_trainers(mesh)) == 1
    # Each host's services are registered with the agent of their own host.
    for host, kinds in ((a, {"registry", "gateway"}), (b, {"predictor", "trainer-agent", "trainer"})):
        local = {s["Service"] for s in consul_get(mesh, host, "/v1/agent/services").values()}
        assert local == kinds, f"{host}: {local}"
    replies = [predict(mesh) for _ in range(20)]
    assert {r.version for r in replies} == {1}
    for host in (b, c):  # each predictor serves it, straight from its host too
        with operator_channel(mesh, host, "predictor", 50061) as direct:
            assert predict(mesh, predictor_pb2_grpc.PredictorStub(direct)).version == 1


def test_consul_refuses_anonymous_callers_and_each_service_registers_only_itself(mesh):
    a, b, c = mesh.a, mesh.b, mesh.c
    # Without a token, a caller that reaches an agent sees no instance and may register none.
    assert consul_get(mesh, a, "/v1/health/service/predictor?passing=true", anonymous=True) == []
    fake = {"ID": "fake-predictor", "Name": "predictor", "Address": "198.18.255.1", "Port": 50061}
    try:
        assert consul_put(mesh, a, "/v1/agent/service/register", fake, token=None) == 403
        # A service's token registers its own name only: the predictor's on b may not pose as the registry.
        predictor_token = read_token_file(b.state_dir / "consul-tokens" / "predictor")
        assert consul_put(mesh, b, "/v1/agent/service/register", {**fake, "Name": "registry"}, predictor_token) == 403
    finally:  # should one have been let in, it must not stay for the next tests
        for host in (a, b):
            consul_put(mesh, host, "/v1/agent/service/deregister/fake-predictor", None, mesh.consul_token)
    # Each host made its own token for each of its services, in a file of mode 0600 that the service reads.
    tokens = {}
    for host in (b, c):
        path = host.state_dir / "consul-tokens" / "predictor"
        assert path.stat().st_mode & 0o777 == 0o600, path
        tokens[host.letter] = read_token_file(path)
    assert len(set(tokens.values())) == 2 and mesh.consul_token not in tokens.values()
    # The agents have the master token from a config file of mode 0600, never on their command line.
    for host in (a, b, c):
        config = host.state_dir / "run" / "consul-acl.json"
        assert config.stat().st_mode & 0o777 == 0o600
        pid = int((host.state_dir / "run" / "consul.pid").read_text())
        assert mesh.consul_token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def job_now(ns, job_id: str) -> tpb.Job:
    return ns.trainer.GetJob(tpb.GetJobRequest(id=job_id), timeout=10)


def test_a_job_on_b_and_c_trains_from_a_blob_checkpoints_through_the_registry_and_survives_a_cut(
    mesh, digits_spec, unique
):
    b, c = mesh.b, mesh.c
    blob = mesh.registry.upload_blob(DIGITS_NPZ)  # the data set only exists in the registry: no host has the file
    name = unique("hosts-digits")
    every = 5
    spec = digits_spec(workers=2, register_model=name, checkpoint_every_steps=every, step_delay_ms=40)
    spec.register_aliases.append("production")
    spec.dataset.CopyFrom(tpb.Dataset(blob_digest=blob.digest, format="npz", features_key="x", label_key="y"))
    job = mesh.trainer.SubmitJob(tpb.SubmitJobRequest(spec=spec), timeout=30)
    wait_for(lambda: job_now(mesh, job.id).checkpoint.step >= 2 * every, 240, "a checkpoint uploaded by the chief")
    running = job_now(mesh, job.id)
    assert {p.address.rsplit(":", 1)[0] for p in running.placements} == {b.address, c.address}

    c.cut()  # c's worker, agent (and predictor) vanish mid-training
    cut_at, uploaded_at_cut = job_now(mesh, job.id).step, job_now(mesh, job.id).checkpoint.step
    wait_for(lambda: job_now(mesh, job.id).state != tpb.JOB_STATE_RUNNING, 60, "the job noticing the lost host")
    c.restore()
    wait_for(lambda: job_now(mesh, job.id).state in FINAL_JOB_STATES, 420, "the job finishing")
    done = job_now(mesh, job.id)
    assert tpb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED", done.message
    assert done.attempt >= 2 and done.registered_version == 1
    events = list(mesh.trainer.WatchJob(tpb.WatchJobRequest(id=job.id), timeout=60))
    resumed = [e for e in events if e.type == tpb.JOB_EVENT_TYPE_RESUMED]
    assert resumed, [tpb.JobEventType.Name(e.type) for e in events]
    lost = cut_at - resumed[0].step
    print(f"\ncut c mid-training at step {cut_at} (checkpoint {uploaded_at_cut} uploaded): resumed at step ")
    print(f"{resumed[0].step} after {resumed[0].recovery_seconds:.1f}s, {lost} steps lost (interval {every})")
    assert resumed[0].step >= uploaded_at_cut and lost <= every + spec.report_every_steps

    # The registered model is served by the predictors on b and c, through the gateway on a.
    wait_routes_of(mesh, name, {b.address, c.address})
    request = pb.PredictRequest(
        model=ref_to_pb(f"{name}@production"), inputs={"x": array_to_tensor(np.zeros((1, 64), np.float32))}
    )
    assert mesh.predictor.Predict(request, timeout=15).version == 1
    wait_for(lambda: cluster_whole(mesh), REJOIN_TIMEOUT_S, "c voting again in the Consul cluster")


def wait_routes_of(ns, model: str, hosts: set[str]) -> None:
    wait_for(lambda: predictor_hosts(ns, model) == hosts, 120, f"{model}@production on {sorted(hosts)}")


def test_a_cut_predictor_host_costs_no_call_and_comes_back(mesh, prediction_loop):
    b, c = mesh.b, mesh.c
    with prediction_loop(lambda: predict(mesh)) as loop:
        time.sleep(1)
        b.cut()
        try:
            left = wait_routes(mesh, {c.address}, LEAVE_TIMEOUT_S, "b leaving the routing table")
            time.sleep(2)
        finally:
            b.restore()  # also when the test fails: the next tests need b
        back = wait_routes(mesh, {b.address, c.address}, REJOIN_TIMEOUT_S, "b back in the routing table")
        time.sleep(1)
    print(f"\ncut b: left the routing table after {left:.1f}s, back {back:.1f}s after its link returned; ", end="")
    print(f"{loop.calls()} predictions through the gateway, failures {dict(loop.failures())}")
    assert loop.calls() > 50
    assert not loop.failures()
    wait_for(lambda: cluster_whole(mesh), REJOIN_TIMEOUT_S, "b voting again in the Consul cluster")


def test_a_cut_registry_host_leaves_predictors_serving_and_they_catch_up(mesh):
    a, b, c = mesh.a, mesh.b, mesh.c
    stubs = {h.letter: operator_channel(mesh, h, "predictor", 50061) for h in (b, c)}
    try:
        a.cut()
        deadline = time.monotonic() + 8
        served = 0
        while time.monotonic() < deadline:  # registry, Redis and gateway are away: the predictors serve on
            for channel in stubs.values():
                assert predict(mesh, predictor_pb2_grpc.PredictorStub(channel)).version == 1
                served += 1
        a.restore()
        back = wait_for(lambda: passing(mesh, c, "registry") == {a.address}, REJOIN_TIMEOUT_S, "the registry back")
        mesh.registry.stub.SetAlias(rpb.SetAliasRequest(model_name=mesh.model, alias="production", version=2))
        caught_up = wait_for(
            lambda: all(
                predict(mesh, predictor_pb2_grpc.PredictorStub(channel)).version == 2 for channel in stubs.values()
            ),
            60,
            "both predictors serving the moved alias",
        )
    finally:
        a.restore()  # (again) also when the test fails: the next test needs a
        for channel in stubs.values():
            channel.close()
    print(f"\ncut a: {served} direct predictions while cut, none failed; registry back {back:.1f}s after the link, ")
    print(f"predictors on the moved alias {caught_up:.1f}s after the move")
    wait_for(lambda: cluster_whole(mesh), REJOIN_TIMEOUT_S, "a voting again in the Consul cluster")


UPLOAD_SCRIPT = """
import json, sys
from modelgrid.client.registry import RegistryClient
from services.kit import tls
from services.kit.channels import CHANNEL_DEFAULTS

path, target, tls_dir = sys.argv[1:4]
done = []  # every progress call: an attempt starts where the registry got to (not above the bytes sent before)
with tls.dial(target, "registry", tls.InternalTLS(tls_dir, "operator"), options=CHANNEL_DEFAULTS) as channel:
    blob = RegistryClient(channel).upload_blob(path, progress=lambda sent, total: done.append(sent))
starts = [i for i, value in enumerate(done) if i == 0 or value <= done[i - 1]]
spans = [done[end - 1] - done[start] for start, end in zip(starts, starts[1:] + [len(done)])]
print(json.dumps({"digest": blob.digest, "starts": [done[i] for i in starts], "sent": sum(spans)}))
"""
UPLOAD_MIB = 48
THROTTLE = "32mbit"  # about 4 MiB/s out of c: the upload takes some 12 s, long enough to cut it in the middle
CUT_SECONDS = 20.0  # longer than the registry's keepalive (10 s + 5 s) takes to drop the vanished client's call


def test_an_upload_cut_with_its_host_resumes_from_what_the_registry_holds(mesh, tmp_path):
    a, c = mesh.a, mesh.c
    data = np.random.default_rng(9).bytes(UPLOAD_MIB << 20)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    log = c.log_dir / "resumable-upload.log"
    c.run(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", THROTTLE, "burst", "64kb", "latency", "1s"])
    try:
        argv = [
            sys.executable,
            "-c",
            UPLOAD_SCRIPT,
            str(path),
            f"{a.address}:50051",
            mesh.hosts_lib.STATE_PATH + "/tls",
        ]
        upload = c.spawn(argv, log_path=log)  # with c's own copy of the certificates

        def held() -> int:
            return mesh.registry.stub.StatUpload(rpb.StatUploadRequest(digest=digest), timeout=5).received_bytes

        wait_for(lambda: held() >= (UPLOAD_MIB << 20) // 4, 60, "a quarter of the upload at the registry")
        c.cut()
        try:
            time.sleep(CUT_SECONDS)
            at_cut = held()
        finally:
            c.restore()
        try:
            code = upload.wait(180)
        except subprocess.TimeoutExpired:
            upload.kill()
            raise
    finally:
        c.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
    out = log.read_text()
    assert code == 0, out[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    status = mesh.registry.stub.StatUpload(rpb.StatUploadRequest(digest=digest), timeout=5)
    assert result["digest"] == digest and (status.stored, status.received_bytes) == (True, len(data))
    starts = result["starts"]
    assert len(starts) >= 2 and starts[0] == 0, starts
    assert starts[-1] >= at_cut > 0, f"resumed at {starts[-1]} bytes, the registry held {at_cut} after the cut"
    resent = result["sent"] - len(data)
    assert resent < len(data) // 4, f"{resent} bytes sent twice"
    print(
        f"\nupload from c cut at {at_cut / MiB:.1f} of {UPLOAD_MIB} MiB for {CUT_SECONDS:.0f}s: resumed at "
        f"{starts[-1] / MiB:.1f} MiB ({len(starts) - 1} new tries), {resent / MiB:.2f} MiB sent twice"
    )
    wait_for(lambda: cluster_whole(mesh), REJOIN_TIMEOUT_S, "c voting again in the Consul cluster")


def test_a_dead_consul_server_host_keeps_the_cluster_serving(mesh):
    a, b, c = mesh.a, mesh.b, mesh.c
    wait_for(lambda: cluster_whole(mesh), REJOIN_TIMEOUT_S, "three voting servers before one dies")
    c.die()
    started = time.monotonic()
    wait_for(lambda: consul_get(mesh, a, "/v1/status/leader") != "", 30, "a leader among a and b")
    wait_routes(mesh, {b.address}, LEAVE_TIMEOUT_S, "c's predictor leaving the routing table")
    for service, where in (("registry", {a.address}), ("gateway", {a.address}), ("trainer", {b.address})):
        assert passing(mesh, a, service) == where, service
    assert all(predict(mesh).version == 2 for _ in range(10))
    print(f"\nc dead: a and b kept a leader; routes without c after {time.monotonic() - started:.1f}s")
    # The host comes back: its agent rejoins and `modelgrid-host up` starts its services again.
    c.restore()
    runner = host_up(c, mesh.paths["c"])
    assert runner.wait(300) == 0, (c.log_dir / "modelgrid-host.log").read_text()[-4000:]
    wait_routes(mesh, {b.address, c.address}, 120, "c's predictor back in the routing table")


def leading_trainers(ns) -> set[str]:
    """Addresses of the trainers tagged as leading and passing, as a's agent sees them."""
    try:
        entries = consul_get(ns, ns.a, "/v1/health/service/trainer?passing=true&tag=leader")
    except OSError:
        return set()
    return {e["Service"]["Address"] for e in entries}


TAKEOVER_LIMIT_S = 30.0
"""The standby's take-over after its leader's host died: Serf's failure detection (seconds with the test hosts'
gossip settings), the end of the session, the lock delay (1 s), then the new leader's claim. The default
leader_session_ttl_seconds (15) bounds it when the host lives on; a loaded CI machine gets slack on top."""


def test_a_dead_leading_trainer_host_hands_its_job_to_the_standby_which_finishes_it_once(mesh, digits_spec, unique):
    a, b, c = mesh.a, mesh.b, mesh.c
    wait_for(lambda: cluster_whole(mesh), REJOIN_TIMEOUT_S, "three voting servers before the trainer host dies")
    trainers = lambda: passing(mesh, a, "trainer") == {b.address, c.address} and len(leading_trainers(mesh)) == 1  # noqa: E731
    wait_for(trainers, REJOIN_TIMEOUT_S, "two trainers, one leading")
    (leader,) = leading_trainers(mesh)
    dying, survivor = (b, c) if leader == b.address else (c, b)
    blob = mesh.registry.upload_blob(DIGITS_NPZ)
    name = unique("failover")
    spec = digits_spec(workers=1, register_model=name, checkpoint_every_steps=5, step_delay_ms=100)
    spec.dataset.CopyFrom(tpb.Dataset(blob_digest=blob.digest, format="npz", features_key="x", label_key="y"))
    job = mesh.trainer.SubmitJob(tpb.SubmitJobRequest(spec=spec, request_id=uuid.uuid4().hex), timeout=30)
    wait_for(lambda: job_now(mesh, job.id).step >= 10, 240, "the job training")
    worker_host = job_now(mesh, job.id).placements[0].address.rsplit(":", 1)[0]

    dying.die()  # the leader's host crashes mid-job: its trainer cannot even say goodbye
    took = wait_for(lambda: leading_trainers(mesh) == {survivor.address}, 90, "the standby leading")
    wait_for(lambda: job_now(mesh, job.id).state in FINAL_JOB_STATES, 420, "the job finishing")
    done = job_now(mesh, job.id)
    assert tpb.JobState.Name(done.state) == "JOB_STATE_SUCCEEDED", done.message
    events = list(mesh.trainer.WatchJob(tpb.WatchJobRequest(id=job.id), timeout=60))
    starts = [e.attempt for e in events if e.type == tpb.JOB_EVENT_TYPE_STATE and e.state == tpb.JOB_STATE_STARTING]
    assert starts == sorted(set(starts)), f"an attempt was started twice: {starts}"
    if worker_host == survivor.address:  # its worker lived on: the new leader re-attached to it
        assert (done.attempt, done.restarts) == (1, 0), done
    versions = mesh.registry.stub.ListVersions(rpb.ListVersionsRequest(model_name=name), timeout=10).versions
    assert [v.version for v in versions] == [1], "the job registered more than one version"
    where = "the same host" if worker_host == dying.address else "the other host"
    print(
        f"\nthe leading trainer's host ({dying.letter}) died mid-job, its worker on {where}: {survivor.letter} led "
        f"{took:.1f}s later; the job finished after {done.attempt} attempt(s), 1 version registered"
    )
    assert took < TAKEOVER_LIMIT_S
