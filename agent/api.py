"""Management API (FastAPI): health, readiness, status of every model, Prometheus metrics,
a small status page, and the fleet endpoints (`/fleet/state`, `/fleet/drain`: agent/fleet.py).

Served on the management listener (`--management-host`/`--management-port`); the public
(inference) port answers only the data plane (`/v1/`, `/v2/`) and the probes (`/healthz`,
`/readyz`), see agent.app. No `/docs` nor `/openapi.json` anywhere. Everything this app
returns passes through puller.uri.redact (URIs keep no userinfo nor secret query values)."""
from __future__ import annotations

import asyncio
import html
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from agent.fleet import LONG_POLL_S
from puller.uri import redact, redact_doc

if TYPE_CHECKING:
    from agent.app import Agent


def build_probes(agent: "Agent") -> FastAPI:
    """/healthz and /readyz only: what the public port serves beside the data plane."""
    api = FastAPI(title="modelshelf agent", docs_url=None, redoc_url=None, openapi_url=None)
    _add_probes(api, agent)
    return api


def build_api(agent: "Agent") -> FastAPI:
    """The whole management API (probes, status, metrics, page)."""
    api = FastAPI(title="modelshelf agent", docs_url=None, redoc_url=None, openapi_url=None)
    _add_probes(api, agent)

    async def status_doc() -> dict[str, Any]:
        return redact_doc({**agent.status(), **_memory_views(agent, await _reality(agent))})

    @api.get("/status")
    async def status() -> dict[str, Any]:
        return await status_doc()

    @api.get("/status/models/{name}")
    async def model_status(name: str) -> JSONResponse:
        doc = (await status_doc())["models"].get(name)
        if doc is None:
            return JSONResponse({"error": f"model {redact(name)!r} is not configured"}, status_code=404)
        return JSONResponse(doc)

    @api.get("/metrics")
    async def metrics() -> Response:
        agent.refresh_gauges()
        _memory_gauges(agent, await _reality(agent))
        text = agent.metrics.render()
        if b"://" in text:  # label values never should carry a URI; if one does, it is redacted
            text = redact(text.decode()).encode()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _render_page(await status_doc())

    _add_fleet(api, agent)
    return api


def _add_fleet(api: FastAPI, agent: "Agent") -> None:
    @api.get("/fleet/state")
    async def fleet_state(since: int | None = None, wait: float = LONG_POLL_S) -> Response:
        """What an endpoint picker needs (agent/fleet.py); `since`: long-poll until seq moves."""
        if since is not None:
            await agent.fleet.wait_change(since, wait)
        return Response(agent.fleet.body(), media_type="application/json")

    @api.post("/fleet/drain")
    async def fleet_drain() -> dict[str, Any]:
        """preStop: report not ready, take no new placements, keep serving what arrives."""
        agent.fleet.drain()
        return {"draining": True, "seq": agent.fleet.seq}


async def _reality(agent: "Agent") -> Any:
    """A fresh reality report (/proc reads of the tracked pids, cgroup files, one NVML query),
    read in a worker thread so a scrape never stalls the data plane; None before start."""
    memory = getattr(agent, "memory", None)
    return None if memory is None else await asyncio.to_thread(memory.reality.check)


def _memory_views(agent: "Agent", report: Any) -> dict[str, Any]:
    """The two views of memory: "ledger" (what is reserved, used vs held, declared vs measured)
    beside "reality" (what the server really holds, drift, excess, cgroup, OOM kills)."""
    memory = getattr(agent, "memory", None)
    if memory is None or report is None:
        return {}
    return {"ledger": memory.ledger_doc(), "reality": report.doc()}


def _memory_gauges(agent: "Agent", report: Any) -> None:
    memory, m = getattr(agent, "memory", None), agent.metrics
    if memory is None or report is None:
        return
    for d, b in memory.held().items():
        m.memory_held.labels(device=d).set(b)
    for d in report.budget:
        if d in report.real:
            m.memory_real.labels(device=d).set(report.real[d])
            m.memory_drift.labels(device=d).set(report.drift[d])
        m.memory_excess.labels(device=d).set(report.excess.get(d, 0))
    if report.cgroup is not None:
        m.cgroup_memory.labels(kind="current").set(report.cgroup.current)
        m.cgroup_memory.labels(kind="working_set").set(report.cgroup.working_set)
        if report.cgroup.limit is not None:
            m.cgroup_memory.labels(kind="limit").set(report.cgroup.limit)
    seen = m.oom_kills._value.get()
    if report.oom_kills > seen:
        m.oom_kills.inc(report.oom_kills - seen)


def _add_probes(api: FastAPI, agent: "Agent") -> None:
    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the agent's event loop answers."""
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the server answers, the first config was applied, its models (and, after a
        server restart, what the server lost) are checked and loaded as configured, not draining."""
        reasons = agent.not_ready_reasons()
        return JSONResponse({"ready": not reasons, "reasons": reasons}, status_code=503 if reasons else 200)


_STATE_COLOR = {
    "loaded": "#2e7d32", "cached": "#1565c0", "loading": "#f9a825", "pulling": "#f9a825",
    "unloading": "#f9a825", "registered": "#757575", "failed": "#c62828",
}


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _bar(used: float, budget: float | None) -> str:
    if not budget:
        return f"{_fmt_bytes(used)} used (no budget)"
    pct = min(100.0, 100.0 * used / budget)
    color = "#c62828" if pct > 90 else "#2e7d32"
    return (f'<div class="bar"><div style="width:{pct:.1f}%;background:{color}"></div></div>'
            f"{_fmt_bytes(used)} of {_fmt_bytes(budget)} ({pct:.0f}%)")


def _reality_html(status: dict[str, Any]) -> str:
    """Ledger (reserved: used, held during a swap) beside reality (what the server holds)."""
    ledger, reality = status.get("ledger"), status.get("reality")
    if not ledger or not reality:
        return ""
    e = html.escape
    rows = []
    for d, v in ledger["devices"].items():
        r = reality["devices"].get(d) or {}
        real = r.get("real")
        excess = f' <b class="bad">excess {_fmt_bytes(r["excess"])} ({e(str(r.get("reason")))})</b>' if r.get("excess") else ""
        rows.append(f"<tr><td>{e(d)}</td><td>ledger {_bar(v['used'], v['budget'])} · held {_fmt_bytes(v['held'])}</td>"
                    f"<td>real {_bar(real, v['budget']) if real is not None else '– (baseline not seen yet)'}"
                    f" · drift {_fmt_bytes(r.get('drift'))}{excess}</td></tr>")
    oom = f' · <b class="bad">OOM kills: {reality["oom_kills"]}</b>' if reality.get("oom_kills") else ""
    under = ", ".join(e(n) for n in ledger.get("under_declared", []))
    return (f"<h3>Ledger vs reality <small>({e(str(reality.get('source')))}){oom}</small></h3><table>{''.join(rows)}</table>"
            + (f"<p>measured above their declaration: {under}</p>" if under else ""))


def _render_page(status: dict[str, Any]) -> str:
    e = html.escape
    memory_rows = "".join(
        f"<tr><td>{e(device)}</td><td>{_bar(v['used'], v['budget'])}</td></tr>" for device, v in status["memory"].items()
    )
    counts = " · ".join(f"{e(k)}: {v}" for k, v in status["counts"].items() if v)
    rows = []
    for m in status["models"].values():
        mem = m.get("memory") or {}
        load = "" if m["load_seconds"] is None else f"{1000 * m['load_seconds']:.1f} ms"
        idle = "" if m["idle_seconds"] is None else f"{m['idle_seconds']:.0f} s"
        rows.append(
            "<tr>"
            f"<td>{e(m['name'])}</td>"
            f'<td><span class="st" style="background:{_STATE_COLOR.get(m["state"], "#555")}">{e(m["state"])}</span></td>'
            f"<td>{e(m['runtime'] or '')}</td>"
            f"<td>{_fmt_bytes(m.get('size_bytes'))}</td>"
            f"<td>{_fmt_bytes(mem.get('host'))} <small>{e(str(mem.get('method', '')))}</small></td>"
            f"<td>{m['inflight']}</td>"
            f"<td>{load}</td>"
            f"<td>{idle}</td>"
            f"<td class='reason'>{e(m['reason'] or '')}</td>"
            "</tr>"
        )
    cache = status.get("cache") or {}
    config = status["config"]
    config_line = e(str(config.get("file") or "no config file yet"))
    if config.get("parse_error"):
        config_line += f' — <b class="bad">rejected: {e(config["parse_error"])}</b> (last good config kept)'
    rejected = "".join(f"<li>{e(str(r.get('reason')))}</li>" for r in config.get("rejected", []))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>modelshelf</title>
<meta http-equiv="refresh" content="5">
<style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;width:100%}}
td,th{{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}}
.st{{color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}} .bar{{display:inline-block;width:240px;height:10px;
background:#eee;margin-right:8px}} .bar div{{height:10px}} .reason{{color:#c62828;max-width:420px}} .bad{{color:#c62828}}
</style></head><body>
<h2>modelshelf agent</h2>
<p>server: <b>{e(status['server']['kind'])}</b> at {e(status['server']['url'])} — {'ready' if status['server']['ready'] else '<b class="bad">not ready</b>'}
 · config: {config_line} · {counts}</p>
{f'<p>rejected entries:</p><ul>{rejected}</ul>' if rejected else ''}
<h3>Memory</h3><table>{memory_rows}</table>
{_reality_html(status)}
<h3>Cache</h3><p>{_fmt_bytes(cache.get('bytes'))} in {cache.get('entries', '–')} entries{f" (budget {_fmt_bytes(cache.get('max_bytes'))})" if cache.get('max_bytes') else ''}</p>
<h3>Models ({len(status['models'])})</h3>
<table><tr><th>name</th><th>state</th><th>runtime</th><th>files</th><th>memory</th><th>in flight</th><th>load</th><th>idle</th><th>reason</th></tr>
{''.join(rows)}</table>
<p><a href="/status">status JSON</a> · <a href="/metrics">metrics</a></p>
</body></html>"""
