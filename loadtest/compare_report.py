"""The gateway beside the naive baseline in the report: the targets' lines of the bar, the
summary's table, and the HTML sections (loadtest/compare.py measures them)."""

from __future__ import annotations

import html
from typing import Any

FIXED_LIMIT_MS = 5.0  # PostgreSQL CPU per second per idle gateway process
# The yardstick must hold: when the naive server's own p99 is past this, the clients (which
# share the cores) fell behind, latency measures the machine's queue, and the latency lines
# are not judged (the CPU lines still are).
BASELINE_P99_SANE_MS = 100.0


def _load(r: dict[str, Any], label: str) -> dict[str, Any] | None:
    for x in r.get("baseline", {}).get("loads", []):
        if x["label"] == label:
            return x
    return None


def _at_scale(r: dict[str, Any], x: dict[str, Any]) -> bool:
    """Judged only at the target's clients and rate, for long enough, both rates reached."""
    if not r.get("baseline", {}).get("judged"):
        return False
    if x["load"] != x["target"]:
        return False
    rate = x["target"]["rate"]
    return all(x[k]["commits_per_s"] >= 0.9 * rate for k in ("gateway", "naive"))


def _latency_sane(x: dict[str, Any]) -> bool:
    p99 = x["naive"]["latency_ms"]["p99"]
    return p99 is not None and p99 <= BASELINE_P99_SANE_MS


_OVERLOADED = (
    f" (the naive server's own p99 is over {BASELINE_P99_SANE_MS:g} ms: the clients fell behind "
    "on this machine, latency measures its queue; not judged)"
)


def _why_not(r: dict[str, Any], x: dict[str, Any]) -> str:
    if not r.get("baseline", {}).get("judged"):
        return " (a smoke or short run: indicative only)"
    if x["load"] != x["target"]:
        return f" (ran {x['load']['clients']} clients x {x['load']['rate']:g}/s, not the target's: indicative only)"
    if not _at_scale(r, x):
        return " (a server's writers reached less than 0.9 of the rate: not judged)"
    return ""


def bar_lines(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets these loads measure, as lines of the bar (empty when the baseline did not run)."""
    if "baseline" not in r:
        return []
    lines: list[dict[str, Any]] = []

    def line(name: str, value: Any, limit: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(
            {"criterion": name, "value": value, "limit": limit, "verdict": verdict, "detail": detail}
        )

    def both(x: dict[str, Any], key: str, *path: str) -> tuple[Any, Any]:
        def get(d: dict[str, Any]) -> Any:
            v: Any = d[key]
            for k in path:
                v = None if v is None else v.get(k)
            return v

        return get(x["gateway"]), get(x["naive"])

    x = _load(r, "200/s")
    if x is not None:
        judged = _at_scale(r, x)
        note = _why_not(r, x)
        sane = _latency_sane(x)
        g50, n50 = both(x, "latency_ms", "p50")
        g99, n99 = both(x, "latency_ms", "p99")
        gpg, npg = both(x, "pg_cpu_us_per_commit")
        if g50 is not None and n50 is not None:
            line(
                "200 clients x 200 commits/s: p50 - baseline p50 (ms)",
                round(g50 - n50, 2),
                "<= 3",
                (g50 - n50 <= 3) if judged and sane else None,
                f"gateway p50 {g50} ms, naive {n50} ms" + (note or ("" if sane else _OVERLOADED)),
            )
        if g99 is not None and n99 is not None:
            line(
                "200 clients x 200 commits/s: p99 - baseline p99 (ms)",
                round(g99 - n99, 2),
                "<= 5",
                (g99 - n99 <= 5) if judged and sane else None,
                f"gateway p99 {g99} ms, naive {n99} ms" + (note or ("" if sane else _OVERLOADED)),
            )
        if gpg is not None and npg:
            line(
                "200 clients x 200 commits/s: PostgreSQL CPU per commit / baseline's",
                round(gpg / npg, 2),
                "<= 5",
                (gpg / npg <= 5) if judged else None,
                f"gateway {gpg} us, naive {npg} us of PostgreSQL CPU per commit" + note,
            )
    x = _load(r, "1000/s")
    if x is not None:
        judged = _at_scale(r, x)
        note = _why_not(r, x)
        sane = _latency_sane(x)
        g99, n99 = both(x, "latency_ms", "p99")
        gpg, npg = both(x, "pg_cpu_us_per_commit")
        gr, nr = both(x, "commits_per_s")
        if g99 is not None and n99 is not None:
            line(
                "50 clients x 1,000 commits/s: p99 - baseline p99 (ms)",
                round(g99 - n99, 2),
                "<= 0",
                (g99 <= n99) if judged and sane else None,
                f"gateway p99 {g99} ms at {gr:,.0f} commits/s, naive {n99} ms at {nr:,.0f}/s"
                + (note or ("" if sane else _OVERLOADED)),
            )
        if gpg is not None and npg:
            line(
                "50 clients x 1,000 commits/s: PostgreSQL CPU per commit / baseline's",
                round(gpg / npg, 2),
                "<= 1",
                (gpg <= npg) if judged else None,
                f"gateway {gpg} us, naive {npg} us of PostgreSQL CPU per commit" + note,
            )
    fixed = r["baseline"].get("fixed_cost") or {}
    ms = fixed.get("fixed_ms_per_s")
    x = _load(r, "20/s")
    extra = ""
    if (
        x is not None
        and x["gateway"]["pg_cpu_ms_per_s"] is not None
        and x["naive"]["pg_cpu_ms_per_s"] is not None
    ):
        extra = (
            f"; at {x['load']['rate']:g} commits/s PostgreSQL used {x['gateway']['pg_cpu_ms_per_s']} ms/s "
            f"with the gateway, {x['naive']['pg_cpu_ms_per_s']} ms/s with the naive server"
        )
    if ms is not None:
        line(
            "fixed PostgreSQL CPU per idle gateway process (ms per s)",
            ms,
            f"<= {FIXED_LIMIT_MS:g}",
            (ms <= FIXED_LIMIT_MS) if r["baseline"].get("judged") else None,
            f"one idle gateway process: {fixed['one_idle_gateway']['pg_cpu_ms_per_s']} ms/s, the cluster "
            f"alone: {fixed['cluster_alone']['pg_cpu_ms_per_s']} ms/s" + extra,
        )
    elif not r["baseline"].get("postmaster_found"):
        line(
            "PostgreSQL CPU (per commit, fixed)",
            None,
            "-",
            None,
            "the server's postmaster is not readable in /proc (not on this machine): not measured",
        )
    for x in r["baseline"].get("loads", []):
        g = x["gateway"]
        line(
            f"baseline comparison {x['label']}: gateway delivers every event exactly once",
            f"lost {g['lost']}, dup {g['duplicated']}",
            "0 and 0",
            g["lost"] == 0 and g["duplicated"] == 0 and g["behind_at_end"] == 0,
            f"naive server: lost {x['naive']['lost']}, dup {x['naive']['duplicated']} (not judged: it promises nothing)",
        )
    return lines


# --- terminal ---------------------------------------------------------------------------------


def _n(v: Any, w: int = 8) -> str:
    return f"{'-':>{w}}" if v is None else f"{v:>{w}.1f}"


def summary_lines(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    b = r.get("baseline")
    if b:
        out.append("")
        out.append(
            f"{'load (as run)':<31} {'server':<8} {'commits/s':>9} {'p50ms':>7} {'p99ms':>7} {'us/deliv':>8} "
            f"{'PG us/commit':>12} {'PG ms/s':>8} {'lost':>5}"
        )
        for x in b.get("loads", []):
            lo = x["load"]
            for kind in ("gateway", "naive"):
                s = x[kind]
                lat = s["latency_ms"]
                out.append(
                    f"{x['label']:<7} {lo['clients']:>4} clients x {lo['rate']:>6g}/s {kind:<8} {s['commits_per_s']:>9.1f} "
                    f"{_n(lat['p50'], 7)} {_n(lat['p99'], 7)} {_n(s['server_cpu_us_per_delivery'])} "
                    f"{_n(s['pg_cpu_us_per_commit'], 12)} {_n(s['pg_cpu_ms_per_s'])} {s['lost']:>5}"
                )
        f = b.get("fixed_cost") or {}
        if f:
            out.append(
                f"fixed PostgreSQL CPU of one idle gateway process: {f.get('fixed_ms_per_s')} ms/s "
                f"(with it {f['one_idle_gateway']['pg_cpu_ms_per_s']}, cluster alone {f['cluster_alone']['pg_cpu_ms_per_s']})"
            )
    c = r.get("curve")
    if c:
        out.append("")
        out.extend(curve_table(c))
    return out


def curve_rows(c: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = [("naive (reference)", c["naive"])]
    for p in c.get("points", []):
        rows.append((f"poll {p['poll_interval_ms']} ms, wake rate {p['wake_rate']}", p["gateway"]))
    return rows


def curve_table(c: dict[str, Any]) -> list[str]:
    lo = c["load"]
    out = [
        f"curve: {lo['clients']} clients x {lo['rate']:g} commits/s, one gateway process per setting",
        f"{'setting':<30} {'commits/s':>9} {'p50ms':>7} {'p99ms':>7} {'PG us/commit':>12} {'us/deliv':>8} "
        f"{'load':>5} {'c->send ms':>10} {'polls/commit':>12}",
    ]
    for label, s in curve_rows(c):
        lat = s["latency_ms"]
        st = s.get("stages") or {}
        polls = st.get("relay_polls")
        out.append(
            f"{label:<30} {s['commits_per_s']:>9.1f} {_n(lat['p50'], 7)} {_n(lat['p99'], 7)} "
            f"{_n(s['pg_cpu_us_per_commit'], 12)} {_n(s['server_cpu_us_per_delivery'])} "
            f"{s['loadavg'][0] if s['loadavg'] else '-':>5} {_n(st.get('commit_to_send_ms_mean'), 10)} "
            f"{_n(polls / s['commits'] if polls and s.get('commits') else None, 12)}"
        )
    return out


# --- HTML -------------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
    return html.escape(str(v))


def _row(label: str, s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    cells = [
        label,
        s["clients"],
        s["commits_per_s"],
        lat["p50"],
        lat["p99"],
        lat["max"],
        s["server_cpu_us_per_delivery"],
        s["pg_cpu_us_per_commit"],
        s["pg_cpu_ms_per_s"],
        s["lost"],
        s["duplicated"],
        s["loadavg"][0] if s["loadavg"] else None,
    ]
    return "<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>"


_HEAD = (
    "<tr><th>run</th><th>clients</th><th>commits/s</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th>"
    "<th>server µs CPU/delivery</th><th>PostgreSQL µs CPU/commit</th><th>PostgreSQL ms CPU/s</th>"
    "<th>lost</th><th>dup</th><th>load avg</th></tr>"
)


def html_sections(r: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    b = r.get("baseline")
    if b:
        parts.append(
            "<h2 id='baseline-naive'>Baseline: the naive LISTEN bridge <a class='top' href='#top'>top</a></h2>"
            "<p>Each load on one gateway process (presence off), then on the naive server (per-row "
            "trigger <code>pg_notify(row_to_json(NEW))</code>, one LISTEN, every notification to every "
            "socket), same clients, writers and rate. PostgreSQL CPU: the postmaster and all its "
            "children, reaped ones included, from the first write to the last delivery.</p><table>" + _HEAD
        )
        for x in b.get("loads", []):
            parts.append(_row(f"{x['label']} gateway", x["gateway"]))
            parts.append(_row(f"{x['label']} naive", x["naive"]))
        parts.append("</table>")
        f = b.get("fixed_cost") or {}
        if f:
            parts.append(
                f"<p>Fixed PostgreSQL CPU of one idle gateway process: <b>{_cell(f.get('fixed_ms_per_s'))} ms/s</b> "
                f"({_cell(f['one_idle_gateway']['pg_cpu_ms_per_s'])} ms/s with it, "
                f"{_cell(f['cluster_alone']['pg_cpu_ms_per_s'])} ms/s for the cluster alone, "
                f"{_cell(f['one_idle_gateway']['seconds'])} s each).</p>"
            )
    c = r.get("curve")
    if c:
        lo = c["load"]
        parts.append(
            "<h2 id='baseline-curve'>The relay's latency knob: the curve <a class='top' href='#top'>top</a></h2>"
            f"<p>{lo['clients']} clients x {lo['rate']:g} commits/s on one topic, one gateway process per "
            "setting of GATEWAY_RELAY_POLL_INTERVAL and GATEWAY_RELAY_WAKE_RATE; the naive server as "
            "the reference.</p><table>" + _HEAD
        )
        for label, s in curve_rows(c):
            parts.append(_row(label, s))
        parts.append("</table>")
    return parts
