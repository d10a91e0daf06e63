"""The issue's targets judged on one bench/cdc.py result, and the readable summary (the JSON holds everything)."""

from __future__ import annotations

# The targets. "Keeps up" is read as: persisted ≈ source rate, caught up within a
# couple of seconds of the load stopping, and commit->persisted lag p99 under half a second.
PERSISTED_VS_SOURCE_MIN = 0.98
CATCH_UP_MAX_S = 2.0
LAG_P99_MAX_MS = 500.0
DRAIN_VS_RECVLOGICAL_MIN = 0.5
DRAIN_VS_PYPGOUTPUT_MIN = 3.0
WRITE_PATH_TPS_MIN = 0.95

STEADY_RUNS = [  # (JSON key, label): the configurations measured once, beside the rounds of (a) and (b)
    ("audit_trigger", "(d) row-audit trigger"),
    ("flux_engine_consuming", "(c) Flux attached, engine consuming"),
    ("flux_engine_stopped_no_message", "(b0) as (b), without the message"),
]


def _check(what: str, measured: float | None, limit: float, *, at_most: bool = False, unit: str = "") -> dict:
    if measured is None:
        ok = False
    else:
        ok = measured <= limit if at_most else measured >= limit
    return {"what": what, "measured": measured, "limit": f"{'<=' if at_most else '>='} {limit}{unit}", "pass": ok}


def _judge(target: str, checks: list[dict], *, not_judged: str | None = None) -> dict:
    out: dict = {"target": target, "checks": checks, "pass": all(c["pass"] for c in checks)}
    if not_judged:
        out["pass"], out["not_judged"] = None, not_judged
    return out


def targets(result: dict) -> dict:
    """Pass or fail of each target, from this run's figures only."""
    s, b = result["steady"], result["backlog"]
    consuming = s["flux_engine_consuming"]
    keeps_up = _judge(
        "(i) the engine never falls behind at full load: persisted/source ~ 1.0, caught up right after the load, lag p99 < 500 ms",
        [
            _check("persisted / source change rate", s["ratios"]["persisted_vs_source_change_rate"], PERSISTED_VS_SOURCE_MIN),
            _check("caught up after the load stopped (s)", consuming["catch_up_after_load_s"], CATCH_UP_MAX_S, at_most=True, unit=" s"),
            _check("commit->persisted lag p99 (ms)", consuming["lag_by_commit_time"]["p99_ms"], LAG_P99_MAX_MS, at_most=True, unit=" ms"),
        ],
    )
    reader = b["pypgoutput_reader"]
    drain_checks = [_check("engine / pg_recvlogical changes/s", b["ratios"]["engine_vs_pg_recvlogical"], DRAIN_VS_RECVLOGICAL_MIN)]
    vs_reader = b["ratios"].get("engine_vs_pypgoutput_reader")
    if vs_reader is not None:
        drain_checks.append(_check("engine / pypgoutput reader changes/s", vs_reader, DRAIN_VS_PYPGOUTPUT_MIN))
    drain = _judge(
        "(ii) backlog drain >= 50% of pg_recvlogical's rate and >= 3x pypgoutput reader's rate",
        drain_checks,
        not_judged=None if vs_reader is not None else f"no pypgoutput reader figure: {reader.get('error')}",
    )
    if vs_reader is None and not all(c["pass"] for c in drain_checks):
        drain["pass"] = False  # one half failed already: the missing half cannot rescue it
    w = s["write_path"]
    write_path = _judge(
        "(iii) write-path TPS with Flux attached (engine not consuming) >= 95% of no capture:"
        " the median over rounds of (b)/(a), pgbench's default protocol",
        [_check(f"median of {len(w['rounds'])} rounds' TPS (b) / TPS (a)", w["tps_ratio_median"], WRITE_PATH_TPS_MIN)],
    )
    return {"engine_keeps_up": keeps_up, "backlog_drain": drain, "write_path": write_path}


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def _target_lines(t: dict) -> list[str]:
    lines = ["Targets (judged on this run):"]
    for item in t.values():
        lines.append(f"  {_verdict(item['pass']):4}  {item['target']}")
        for c in item["checks"]:
            lines.append(f"          {_verdict(c['pass']):4}  {c['what']}: {c['measured']}  (target {c['limit']})")
        if item.get("not_judged"):
            lines.append(f"          not judged: {item['not_judged'][:300]}")
    return lines


def _steady_lines(s: dict, p: dict) -> list[str]:
    ratios, flux, drain, w = s["ratios"], s["flux_engine_consuming"], s["drain_after_engine_stopped"], s["write_path"]
    lag, lag2, cpu, batch = flux["lag_by_commit_time"], flux["lag_by_recorded_at"], flux["cpu"], flux["batching"]
    prepared = "prepared_tps_ratio_median" in w
    with_message = "(b), (b') and (c)" if prepared else "(b) and (c)"
    lines = [
        f"Steady state: pgbench tpcb-like, scale {p['scale']}, {p['clients']} clients, {p['run_s']}s per run;"
        f" {with_message} add a `flux` context message to each transaction",
        f"  write path, {len(w['rounds'])} rounds      (a) no capture      (b) Flux attached      (b)/(a)"
        + ("   prepared: (a')    (b')   (b')/(a')" if prepared else ""),
    ]
    for i, r in enumerate(w["rounds"], 1):
        order = "b first" if r["flux_first"] else "a first"
        line = (f"    round {i} ({order})      {r['no_capture']['pgbench']['tps']:>9.0f}      {r['flux']['pgbench']['tps']:>12.0f}"
                f"          {r['tps_ratio']:.3f}")
        if prepared:
            line += (f"      {r['no_capture_prepared']['pgbench']['tps']:>9.0f} {r['flux_prepared']['pgbench']['tps']:>7.0f}"
                     f"     {r['prepared_tps_ratio']:.3f}")
        lines.append(line)
    median = f"    median (b)/(a) {w['tps_ratio_median']:.3f} (range {w['tps_ratio_range'][0]:.3f}-{w['tps_ratio_range'][1]:.3f})"
    if prepared:
        median += (f"; prepared statements, the message one more round trip: median (b')/(a') {w['prepared_tps_ratio_median']:.3f}"
                   f" (range {w['prepared_tps_ratio_range'][0]:.3f}-{w['prepared_tps_ratio_range'][1]:.3f})")
    lines += [
        median,
        f"    WAL per transaction: (b) {ratios['wal_per_txn_vs_no_capture']['flux_engine_stopped']:.2f}x (a)",
        f"    then the engine drained the last (b): {drain['seconds']}s for {drain['changes']:,} changes"
        f" (expected {drain['expected_changes']:,}; {drain['changes_per_s']:,}/s; streaming after {drain['streaming_after_s']}s;"
        f" {drain['vs_load_seconds']}x the load's duration)",
        f"  {'measured once':38}{'TPS':>7}  {'vs (a)':>6}  {'WAL/txn':>9}  {'FPI/txn':>7}",
    ]
    for key, label in STEADY_RUNS:
        run = s[key]
        vs = ratios["tps_vs_no_capture"].get(key)
        extra = ""
        if key == "audit_trigger":
            log = run["audit_log"]
            extra = f"   audit_log {log['rows']:,} rows, {log['bytes'] / 2**20:.0f} MiB"
        elif key == "flux_engine_consuming":
            extra = "   the engine, walsender and sink share the 2 cores with pgbench"
        elif key == "flux_engine_stopped_no_message":
            extra = f"   diagnostic: capture without the message; TPS last (b)/(b0) {ratios['tps_message_vs_no_message']:.2f}"
        lines.append(
            f"  {label:38}{run['pgbench']['tps']:>7.0f}  {f'{vs:.2f}' if vs is not None else '':>6}  {run['wal_bytes_per_txn']:>7} B"
            f"  {run['wal_full_page_images_per_txn']:>7}{extra}"
        )
    lines += [
        "  with the engine consuming (c):",
        f"  source changes/s        {flux['source_changes_per_s']:>9,}",
        f"  persisted changes/s     {flux['persisted_changes_per_s']:>9,}   {ratios['persisted_vs_source_change_rate']:.2f} of source;"
        + (f" caught up {flux['catch_up_after_load_s']}s after the load stopped;" if flux["catch_up_after_load_s"] is not None
           else f" NOT caught up {p['catchup_timeout_s']:.0f}s after the load stopped (lag figures cover recorded rows only);")
        + f" max slot lag {flux['max_slot_lag_bytes'] or 0:,} B",
        f"  commit->persisted lag   p50 {lag['p50_ms']} ms  p99 {lag['p99_ms']} ms  max {lag['max_ms']} ms"
        f"  (changes committed in the window; recorded in the window: p50 {lag2['p50_ms']} p99 {lag2['p99_ms']} ms)",
        f"  recorded / expected     {flux['recorded_vs_expected']['recorded']:,} / {flux['recorded_vs_expected']['expected']:,}"
        f"   in {batch['sink_commits']:,} sink commits of {batch['changes_per_sink_commit']} changes"
        f" ({batch['source_txns_per_sink_commit']} source transactions)",
    ]
    ctx = flux.get("request_context")
    if ctx:
        lines.append(
            f"  request context         {ctx['without_request_id']:,} of {ctx['changes']:,} changes without a request_id;"
            f" {ctx['distinct_request_ids']:,} distinct ids for {ctx['source_txns']:,} source transactions"
        )
    lines.append(
        f"  engine CPU              {cpu.get('engine_cpu_pct_of_one_core')}% of one core"
        f"  (walsender {cpu.get('walsender_cpu_pct_of_one_core')}%, sink backend {cpu.get('sink_backend_cpu_pct_of_one_core')}%;"
        f" machine {cpu['machine_busy_pct_of_all_cores']}% busy)   peak RSS {flux['engine_peak_rss_mib']:.0f} MiB"
    )
    return lines


def _backlog_lines(b: dict, p: dict) -> list[str]:
    e, r, d, g, ratios = b["engine"], b["pg_recvlogical"], b["decode"], b["generated"], b["ratios"]
    rounds, reader = b["rounds"], b["pypgoutput_reader"]
    lines = [
        f"Backlog: {g['changes']:,} changes in {g['transactions']:,} transactions ({g['wal_bytes'] / 2**20:.0f} MiB WAL),"
        f" best of {p['drain_rounds']} round(s)",
        f"  pg_recvlogical          {r['changes_per_s']:>9,} changes/s  ({r['seconds']}s)",
        f"  Flux engine             {e['changes_per_s']:>9,} changes/s  ({e['seconds']}s from start to confirmed,"
        f" streaming after {e['marks_s'].get('streaming')}s)   {ratios['engine_vs_pg_recvlogical']:.2f} of pg_recvlogical",
        f"    engine CPU {e['engine_cpu_pct_of_one_core']}% of one core; CPU s: walsender {e['cpu_s'].get('walsender')},"
        f" sink backend {e['cpu_s'].get('sink_backend')}; peak RSS {e['engine_peak_rss_mib']:.0f} MiB;"
        f" {e['batching']['changes_per_sink_commit']} changes per sink commit;"
        f" recorded {e['recorded_vs_expected']['recorded']:,} / {e['recorded_vs_expected']['expected']:,}",
    ]
    if "changes_per_s" in reader:
        lines.append(
            f"  pypgoutput reader       {reader['changes_per_s']:>9,} changes/s  ({reader['seconds']}s, one round, pydantic"
            f" {reader['pydantic']})   the engine is {ratios['engine_vs_pypgoutput_reader']:.2f}x this"
        )
    else:
        lines.append(f"  pypgoutput reader       no figure: {reader.get('error', '?')[:300]}")
    if len(rounds["engine"]) > 1:
        lines.append(
            "    all rounds, changes/s: pg_recvlogical " + ", ".join(f"{x['changes_per_s']:,}" for x in rounds["pg_recvlogical"])
            + "; engine " + ", ".join(f"{x['changes_per_s']:,}{' (profiled)' if x['profiled'] else ''}" for x in rounds["engine"])
        )
    lines += [
        f"  decode only ({d['messages']:,} messages, {d['changes']:,} changes, best of {p['decode_repeats']}):",
        f"    Flux decoder          {d['flux_decoder']['changes_per_s']:>9,} changes/s   {ratios['flux_decoder_vs_pypgoutput']:.2f}x pypgoutput",
        f"    pypgoutput decoder    {d['pypgoutput_decoder']['changes_per_s']:>9,} changes/s",
        f"    Flux decode+assemble  {d['flux_decode_and_assemble']['changes_per_s']:>9,} changes/s"
        f"   (the engine reaches {ratios['engine_vs_flux_decode_and_assemble']:.2f} of this)",
    ]
    top = next((x["profile_top"] for x in rounds["engine"] if x.get("profile_top")), None)
    if top:
        lines += ["", f"Engine profile during a drain ({top['samples']} samples), own time:"]
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in top["own_pct"][:12]]
        lines += ["  inclusive, below the entry chain:"]
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in top["inclusive_pct"][:8]]
    return lines


def summary(result: dict) -> str:
    m = result["machine"]
    head = (
        f"CDC benchmark  {result['date']}  {'(quick)  ' if result['quick'] else ''}"
        f"{m['nproc']} cores, {m['postgres'].split(' on ')[0]}, Python {m['python']}, flux {result['flux_source_sha256']}"
    )
    return "\n".join([head, "", *_steady_lines(result["steady"], result["params"]), "",
                      *_backlog_lines(result["backlog"], result["params"]), "",
                      *_target_lines(result["targets"])])  # fmt: skip
