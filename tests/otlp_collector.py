"""A real OTLP/gRPC trace receiver for tests: services export their spans to it over the wire."""

from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            attributes.get("service.name", ""),
                            span.name,
                            span.kind,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                        )  # fmt: skip
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> "OtlpCollector":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0)
