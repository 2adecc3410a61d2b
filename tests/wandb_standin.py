"""A protocol stand-in for the W&B server: just enough of its HTTP API for `wandb.Api` to list runs
and read their full history, so the collector's W&B path runs the real client in tests.

The real server ships as a Docker image and cannot run here. This answers the requests the real
client (`wandb` 0.31 and its `wandb-core` service) sends, dispatched on the GraphQL operation name:

- `Viewer`, `GetDefaultEntity` (login check), `Runs` (paged run listing, full fragment),
  `RunHistoryKeys` (a run's last step), `HistoryPage` (rows by step range: the live tail);
- `RunParquetHistory`: a run's history export, as the URL of one parquet file this server serves
  (`GET /history/<run id>.parquet`), plus `liveData`: the rows logged since that export;
- telemetry posts (`/sdk/otel/...`) are accepted and ignored.

It is not a W&B server: no auth check beyond the header's presence, no query parsing beyond the
operation name. Tests use `requests` (the log of what was asked) to check cache reuse, and
`throttle` to answer HTTP 429 to the next N requests of an operation.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pandas as pd

ENTITY = "standin-entity"


@dataclass
class StandinRun:
    """A run as the server holds it: identity, W&B config (plain values), history rows.

    `rows` (a list of dicts or a DataFrame, one row per logged step; `_step` is their position) may
    be replaced while the server runs, as a live run logs more."""

    id: str
    name: str
    group: str
    job_type: str = "arm"
    state: str = "finished"
    config: dict[str, Any] = field(default_factory=dict)
    rows: Any = field(default_factory=list)
    created_at: str = "2026-01-01T00:00:00"
    exported: int | None = None  # rows in the parquet export (None: all); the rest is live data

    def frame(self) -> pd.DataFrame:
        rows = self.rows if isinstance(self.rows, pd.DataFrame) else pd.DataFrame(list(self.rows))
        return rows.assign(_step=range(len(rows)))

    def export(self) -> bytes:
        """The parquet history export: the first `exported` rows."""
        buffer = io.BytesIO()
        self.frame().iloc[: self.exported].to_parquet(buffer, index=False)
        return buffer.getvalue()

    def steps(self, lo: int, hi: int) -> list[dict[str, Any]]:
        """Rows with lo <= _step < hi, as JSON-ready dicts without missing values."""
        part = self.frame().iloc[lo:hi]
        return [{k: v for k, v in row.items() if v == v} for row in part.to_dict("records")]

    def live(self) -> list[dict[str, Any]]:
        """Rows logged since the last export, as the server's `liveData`."""
        return [] if self.exported is None else self.steps(self.exported, len(self.rows))


@dataclass
class Request:
    op: str  # GraphQL operation name, or "GET <path>"
    run: str | None  # the run it concerns, where it names one
    status: int
    at: float


class WandbStandin:
    """Serve `runs` on 127.0.0.1 in a thread; `base_url` is what `wandb.Api` is pointed at."""

    def __init__(self, project: str = "standin-project") -> None:
        self.project = project
        self.runs: dict[str, StandinRun] = {}
        self.requests: list[Request] = []
        self.throttled: Counter[str] = Counter()  # op -> how many more requests get a 429
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> WandbStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, run: StandinRun) -> StandinRun:
        self.runs[run.id] = run
        return run

    def throttle(self, op: str, times: int) -> None:
        """Answer the next `times` requests of operation `op` with HTTP 429 (Retry-After: 0)."""
        self.throttled[op] += times

    def count(self, op: str, run: str | None = None) -> int:
        return sum(1 for r in self.requests if r.op == op and (run is None or r.run == run))

    # -- GraphQL answers -------------------------------------------------------------------------

    def _node(self, run: StandinRun) -> dict[str, Any]:
        n = len(run.rows)
        columns = run.rows.columns if isinstance(run.rows, pd.DataFrame) else run.rows[0] if n else []
        keys = {k: {"typeCounts": [{"type": "number", "count": n}]} for k in ["_step", *columns]}
        return {
            "id": f"run-{run.id}",
            "projectId": "1",
            "tags": [],
            "name": run.id,
            "displayName": run.name,
            "sweepName": None,
            "state": run.state,
            "config": json.dumps({k: {"value": v, "desc": None} for k, v in run.config.items()}),
            "group": run.group,
            "jobType": run.job_type,
            "commit": None,
            "readOnly": False,
            "createdAt": run.created_at,
            "heartbeatAt": run.created_at,
            "description": None,
            "notes": None,
            "systemMetrics": "{}",
            "summaryMetrics": "{}",
            "historyLineCount": len(run.rows),
            "historyKeys": {"lastStep": len(run.rows) - 1, "keys": keys},
            "user": {"name": "tester", "username": "tester"},
        }

    def _runs_page(self, variables: dict[str, Any]) -> dict[str, Any]:
        filters = json.loads(variables.get("filters") or "{}")
        selected = [
            r
            for r in sorted(self.runs.values(), key=lambda r: (r.created_at, r.id))
            if all(_matches(r, key, want) for key, want in filters.items())
        ]
        start = int(variables.get("cursor") or 0)
        page = selected[start : start + int(variables.get("perPage") or 50)]
        end = start + len(page)
        edges = [{"node": self._node(r), "cursor": str(start + i + 1)} for i, r in enumerate(page)]
        runs = {"edges": edges, "pageInfo": {"endCursor": str(end), "hasNextPage": end < len(selected)}}
        project = {"internalId": "1", "runCount": len(selected), "readOnly": False, "runs": runs}
        return {"project": project}

    def answer(self, op: str, variables: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """(GraphQL `data`, the run id it concerns)."""
        viewer = {"id": "u1", "entity": ENTITY, "username": "tester", "email": "", "flags": "{}"}
        if op == "Viewer":
            return {"viewer": {**viewer, "teams": {"edges": []}}}, None
        if op == "GetDefaultEntity":
            return {"viewer": viewer}, None
        if op == "Runs":
            return self._runs_page(variables), None
        run_id = variables.get("name") or variables.get("runName") or variables.get("run")
        run = self.runs.get(str(run_id))
        if run is None:
            return {"project": {"run": None}}, run_id
        if op == "RunHistoryKeys":
            return {"project": {"run": {"historyKeys": self._node(run)["historyKeys"]}}}, run.id
        if op == "RunParquetHistory":
            url = f"{self.base_url}/history/{run.id}.parquet"
            return {
                "project": {"run": {"parquetHistory": {"parquetUrls": [url], "liveData": run.live()}}}
            }, run.id
        if op == "HistoryPage":  # rows by step range, as JSON strings (how the client reads live rows)
            lo, hi, size = int(variables["minStep"]), int(variables["maxStep"]), int(variables["pageSize"])
            page = [json.dumps(row) for row in run.steps(lo, min(hi, lo + size))]
            return {"project": {"run": {"history": page}}}, run.id
        raise KeyError(f"the W&B stand-in does not answer GraphQL operation {op!r}")

    # -- HTTP ------------------------------------------------------------------------------------

    def _record(self, op: str, run: str | None, status: int) -> None:
        with self._lock:
            self.requests.append(Request(op, run, status, time.monotonic()))

    def _throttle_now(self, op: str) -> bool:
        with self._lock:
            if self.throttled[op] > 0:
                self.throttled[op] -= 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log is ours
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/graphql":
                    self._send(200, b"")  # telemetry
                    return
                request = json.loads(body)
                op = request.get("operationName") or _operation(request["query"])
                variables = request.get("variables") or {}
                if standin._throttle_now(op):
                    standin._record(op, None, 429)
                    self._send(429, b'{"errors":[{"message":"rate limit exceeded"}]}')
                    return
                try:
                    data, run = standin.answer(op, variables)
                except KeyError as exc:
                    standin._record(op, None, 400)
                    self._send(400, json.dumps({"errors": [{"message": str(exc)}]}).encode())
                    return
                standin._record(op, run, 200)
                self._send(200, json.dumps({"data": data}).encode())

            def do_GET(self) -> None:
                match = re.fullmatch(r"/history/(.+)\.parquet", self.path)
                run = standin.runs.get(match.group(1)) if match else None
                op = "GET history"
                if run is not None and standin._throttle_now(op):
                    standin._record(op, run.id, 429)
                    self._send(429, b"")
                    return
                if run is None:
                    standin._record(op, None, 404)
                    self._send(404, b"")
                    return
                body = run.export()
                standin._record(op, run.id, 200)
                self._send(200, body, "application/octet-stream")

        return Handler


def _operation(query: str) -> str:
    match = re.search(r"(?:query|mutation)\s+(\w+)", query)
    return match.group(1) if match else ""


def _matches(run: StandinRun, key: str, want: Any) -> bool:
    """The few run filters the collector sends: group, jobType, state, config.<path>."""
    if key == "group":
        return run.group == want
    if key == "jobType":
        return run.job_type == want
    if key.startswith("config."):
        value: Any = run.config
        for part in key.removeprefix("config.").removesuffix(".value").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return bool(value == want)
    raise KeyError(f"the W&B stand-in does not filter on {key!r}")
