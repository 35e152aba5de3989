"""Structured logging, configured once per process. A line logged while a traced call runs carries its trace and
span ids (as OpenTelemetry writes them), so that logs and traces join."""

import json
import logging
import sys
import time

from opentelemetry import trace

_configured = False


class TraceContext(logging.Filter):
    """Adds `trace_id` and `span_id` (hex, as OpenTelemetry writes them; empty outside a traced call) to every
    record, and `trace`: the text form's " trace_id=... span_id=..." suffix."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id, record.span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
            record.trace = f" trace_id={record.trace_id} span_id={record.span_id}"
        else:
            record.trace_id = record.span_id = record.trace = ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the trace and span ids inside a traced call, and
    the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "trace_id", ""):
            entry["trace_id"], entry["span_id"] = record.trace_id, record.span_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Sets up the root logger once: JSON lines (fmt="json") or human-readable text on stderr."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(trace)s"))
    handler.addFilter(TraceContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request lines of the HTTP client (Consul calls) are noise at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _configured = True
