"""How a node writes its log: plain lines, or JSON lines (``--log-json`` / ``"log_json": true``).

A JSON line holds the time, level, node, logger and the formatted message, plus the
fields a call attached that are in :data:`FIELDS` (query id, outcome, status, seconds,
bytes, rounds, shapes); any other attribute of a record is left out, so nothing reaches
the log that its text did not already say. The nodes log only ids, shapes, timings and
outcomes: never tokens, shares, activations or keys.

This module imports nothing of the project.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

FIELDS = ("query_id", "outcome", "code", "seconds", "bytes_sent", "bytes_received", "rounds", "seq_len", "model")


class JsonLines(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "node": self.node, "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(node: str, level: str | int = "INFO", json_lines: bool = False) -> None:
    """The process's log format: ``node`` names every line; replaces earlier settings."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines(node) if json_lines
                         else logging.Formatter(f"%(asctime)s {node} %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
