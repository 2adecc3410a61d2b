"""A protocol stand-in for the W&B server: just enough of its HTTP API for `wandb.Api` to list runs
and read their full history, so the collector's W&B path runs the real client in tests.

The real server ships as a Docker image and cannot run here. This answers the requests the real
client (`wandb` 0.31 and its `wandb-core` service) sends, dispatched on the GraphQL operation name:

- `Viewer`, `GetDefaultEntity` (login check), `Runs` (paged run listing, full fragment),
  `RunHistoryKeys` (a run's last step), `HistoryPage` (rows by step range: the live tail);
- `RunParquetHistory`: a run's history export, as the URL of one parquet file this server serves
  (`GET /history/<run id>.parquet`), plus `liveData`: the rows logged since that export;
- telemetry posts (`/sdk/otel/...`) are accepted and ignored;
- what `wandb sync` of an offline run sends (the `wandb-core` client): `RunResumeStatus`,
  `UpsertBucket` (the run, its group and config), `CreateRunFiles` with uploads (`PUT /upload/...`,
  kept in `files`), and the file stream (`POST /files/<entity>/<project>/<run>/file_stream`), whose
  `wandb-history.jsonl` lines are written at the offsets they name: a second sync of the same run
  from offset 0 replaces the history, as the real server does (wandb/wandb#3841); its
  `wandb-summary.json` line replaces the run's summary.

`offline_history` reads an offline run's transaction log (`run-<id>.wandb`) the way `wandb sync`
does: its history records, for tests of what a sync would send.

It is not a W&B server: no auth check beyond the header's presence, no query parsing beyond the
operation name. Tests use `requests` (the log of what was asked) to check cache reuse, and
`throttle` to answer HTTP 429 to the next N requests of an operation.
"""

from __future__ import annotations

import io
import json
import re
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
    summary: dict[str, Any] = field(default_factory=dict)  # the run's summary, as the file stream sent it

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
        self.files: dict[tuple[str, str], bytes] = {}  # (run id, file name) -> what a sync uploaded
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
        if op in ("RunResumeStatus", "UpsertBucket", "CreateRunFiles"):
            return self._sync_answer(op, variables)
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

    def _sync_answer(self, op: str, variables: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """The three GraphQL calls of `wandb sync` (see the module doc)."""
        project = {"id": "1", "name": self.project, "entity": {"id": "e1", "name": ENTITY}}
        name = str(variables.get("name") or variables.get("run"))
        run = self.runs.get(name)
        if op == "RunResumeStatus":
            bucket = None
            if run is not None:
                bucket = {"id": f"run-{name}", "name": name, "summaryMetrics": "{}", "displayName": run.name}
                bucket |= {"logLineCount": 0, "historyLineCount": len(run.rows), "eventsLineCount": 0}
                bucket |= {"historyTail": "[]", "eventsTail": "[]", "config": "{}", "tags": [], "notes": None}
                bucket |= {"wandbConfig": "{}"}
            return {"model": {**project, "bucket": bucket}}, name
        if op == "UpsertBucket":
            with self._lock:
                run = self.runs.setdefault(name, StandinRun(id=name, name=name, group="", rows=[]))
                run.name = variables.get("displayName") or run.name
                run.group = variables.get("groupName") or run.group
                run.job_type = variables.get("jobType") or run.job_type
                config = json.loads(variables.get("config") or "{}")
                run.config |= {k: v.get("value") for k, v in config.items() if isinstance(v, dict)}
            bucket = {"id": f"run-{name}", "name": name, "displayName": run.name, "description": None}
            bucket |= {
                "config": "{}",
                "sweepName": None,
                "project": project,
                "historyLineCount": len(run.rows),
            }
            return {"upsertBucket": {"bucket": bucket, "inserted": True}}, name
        files = [{"name": f, "uploadUrl": f"{self.base_url}/upload/{name}/{f}"} for f in variables["files"]]
        return {"createRunFiles": {"runID": f"run-{name}", "uploadHeaders": [], "files": files}}, name

    def _stream(self, run_id: str, body: dict[str, Any]) -> None:
        """A file-stream post: history lines written at their offsets (a resent line replaces); the
        summary's latest line replaces the summary."""
        history = body.get("files", {}).get("wandb-history.jsonl")
        summary = body.get("files", {}).get("wandb-summary.json")
        with self._lock:
            run = self.runs.setdefault(run_id, StandinRun(id=run_id, name=run_id, group="", rows=[]))
            if history:
                rows = (
                    list(run.rows) if not isinstance(run.rows, pd.DataFrame) else run.rows.to_dict("records")
                )
                offset = int(history["offset"])
                new = [json.loads(line) for line in history["content"]]
                run.rows = rows[:offset] + new + rows[offset + len(new) :]
            if summary and summary.get("content"):
                run.summary = json.loads(summary["content"][-1])
            if body.get("complete"):
                run.state = "finished" if not body.get("exitcode") else "failed"

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
                stream = re.fullmatch(r"/files/[^/]+/[^/]+/([^/]+)/file_stream", self.path)
                if stream:
                    standin._stream(stream.group(1), json.loads(body))
                    standin._record("file_stream", stream.group(1), 200)
                    self._send(200, b"{}")
                    return
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

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                match = re.fullmatch(r"/upload/([^/]+)/(.+)", self.path)
                if match:
                    with standin._lock:
                        standin.files[(match.group(1), match.group(2))] = body
                standin._record("PUT upload", match.group(1) if match else None, 200 if match else 404)
                self._send(200 if match else 404, b"")

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


def offline_history(path: str | Path) -> list[dict[str, Any]]:
    """The history rows of an offline run's transaction log (`run-<id>.wandb`), in order, values
    decoded. The log is W&B's record format: a 7-byte header (`:W&B`, magic, version), then
    32 KiB blocks of chunks, each with a 7-byte header (CRC, length, type: full, first, middle,
    last), holding serialized `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    block, pos, record, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind not in (1, 4):  # the record goes on in the next chunk (or an empty chunk: padding)
            continue
        parsed = pb.Record()
        parsed.ParseFromString(record)
        if parsed.WhichOneof("record_type") == "history":
            items = parsed.history.item
            rows.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def synced(offline: list[Path]) -> dict[str, StandinRun]:
    """`wandb sync` (the real client) of offline run dirs to a fresh stand-in: the runs it holds."""
    import os
    import subprocess
    import sys

    with WandbStandin() as standin:
        env = {**os.environ, "WANDB_BASE_URL": standin.base_url, "WANDB_API_KEY": "standin-key-" + "0" * 40}
        sync = [str(Path(sys.executable).parent / "wandb"), "sync", "--entity", ENTITY]
        out = subprocess.run(
            [*sync, "--project", standin.project, *map(str, offline)], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return dict(standin.runs)
