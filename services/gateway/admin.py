"""The gateway's own API (modelgrid.gateway.v1.GatewayAdmin): API keys and a view of the routing table."""

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from modelgrid.client.convert import enum_member, timestamp
from modelgrid.client.errors import FailedPrecondition, InvalidArgument
from modelgrid.gateway.v1 import gateway_pb2 as pb
from modelgrid.gateway.v1 import gateway_pb2_grpc
from services.gateway.auth import ApiKey, Authorizer, Scope
from services.gateway.upstreams import Backends

MIN_RATE, MAX_RATE = 0.001, 1e6
"""Bounds of a key's own rate limit (requests per second)."""


def _key_to_pb(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        name=key.name,
        scopes=[pb.Scope.Value(f"SCOPE_{s}") for s in key.scopes],
        rate_limit=key.rate_limit,
        created_at=timestamp(key.created_at),
        revoked=key.revoked,
    )


class GatewayAdminServicer(gateway_pb2_grpc.GatewayAdminServicer):
    def __init__(self, authorizer: Authorizer, backends: Backends, routes: dict[str, str]) -> None:
        self._auth = authorizer
        self._backends = backends
        self._routes = routes

    async def _admin(self, context, method: str) -> None:
        """API keys are managed only where they are checked: with auth off, anyone could make an ADMIN key."""
        if not self._auth.enabled:
            raise FailedPrecondition(
                "API keys are off on this gateway (MODELGRID_GATEWAY_AUTH_ENABLED=false): turn auth on and use its "
                "admin key (MODELGRID_GATEWAY_ADMIN_KEY) to manage keys"
            )
        await self._auth.check(f"/modelgrid.gateway.v1.GatewayAdmin/{method}", context.invocation_metadata() or ())

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context) -> pb.CreateApiKeyResponse:
        await self._admin(context, "CreateApiKey")
        if not 1 <= len(request.name) <= 100 or not (request.name.isascii() and request.name.isprintable()):
            # the name travels as the x-modelgrid-client header, which takes printable ASCII only
            raise InvalidArgument("a key needs a name of 1-100 printable ASCII characters")
        if not request.scopes or pb.SCOPE_UNSPECIFIED in request.scopes:
            raise InvalidArgument("a key needs at least one scope (READ, PREDICT, TRAIN, ADMIN)")
        if not (request.rate_limit == 0 or MIN_RATE <= request.rate_limit <= MAX_RATE):  # NaN fails both
            # (a rate the token bucket's Lua cannot hold, e.g. 1e-300 or inf, failed every call of the key)
            raise InvalidArgument(
                f"rate_limit is requests per second: 0 (the gateway's default) or from {MIN_RATE} to {MAX_RATE:g}"
            )
        scopes = [Scope(enum_member(pb.Scope, s, "scope").removeprefix("SCOPE_")) for s in request.scopes]
        key, secret = await self._auth.create_key(request.name, scopes, request.rate_limit)
        return pb.CreateApiKeyResponse(key=_key_to_pb(key), secret=secret)

    async def ListApiKeys(self, request, context) -> pb.ListApiKeysResponse:
        await self._admin(context, "ListApiKeys")
        return pb.ListApiKeysResponse(keys=[_key_to_pb(k) for k in await self._auth.list_keys()])

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context) -> pb.ApiKey:
        await self._admin(context, "RevokeApiKey")
        return _key_to_pb(await self._auth.revoke_key(request.id))

    async def GetRoutes(self, request, context) -> pb.GetRoutesResponse:
        await self._auth.check("/modelgrid.gateway.v1.GatewayAdmin/GetRoutes", context.invocation_metadata() or ())
        routes = []
        for prefix, service in sorted(self._routes.items()):
            pool = await self._backends.get(service)
            upstreams = []
            for member in sorted(pool.members.values(), key=lambda m: m.target):
                upstream = pb.Upstream(target=member.target, outstanding=member.in_flight, tags=member.instance.tags)
                if member.ejected_at_wall:
                    upstream.ejected_until.CopyFrom(timestamp(member.ejected_at_wall))
                upstreams.append(upstream)
            routes.append(pb.Route(prefix=prefix, service=service, upstreams=upstreams))
        return pb.GetRoutesResponse(routes=routes)


ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["GatewayAdmin"]


class _CallContext:
    """What the servicer reads of a call's context: its metadata."""

    def __init__(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata


class LocalAdminCalls:
    """GatewayAdmin's unary calls made in-process, for the web port (which has no gRPC server of its own): the
    same servicer as on the native port, so the same key checks, scopes and rate limits; domain errors propagate
    for the caller to map to a status."""

    def __init__(self, servicer: GatewayAdminServicer) -> None:
        self._methods = {
            f"/{ADMIN_SERVICE.full_name}/{m.name}": (getattr(servicer, m.name), getattr(pb, m.input_type.name))
            for m in ADMIN_SERVICE.methods
        }

    def handles(self, method: str) -> bool:
        return method in self._methods

    async def call(self, method: str, metadata: Sequence[tuple[str, str | bytes]], request: bytes) -> bytes:
        """The serialized answer to the serialized `request`; InvalidArgument if it does not parse."""
        handler, request_class = self._methods[method]
        message = request_class()
        try:
            message.ParseFromString(request)
        except (DecodeError, ValueError, RuntimeError):  # what protobuf raises for bytes that are no such message
            raise InvalidArgument(f"the request is not a valid {request_class.DESCRIPTOR.full_name}") from None
        return (await handler(message, _CallContext(metadata))).SerializeToString()
