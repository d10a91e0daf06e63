"""The readable summary of one bench/cdc.py result (the JSON holds everything)."""

from __future__ import annotations


def _steady_lines(s: dict, p: dict) -> list[str]:
    before, flux, after = s["without_flux_before"], s["with_flux"], s["without_flux_after"]
    lag, lag2, cpu, batch = flux["lag_by_commit_time"], flux["lag_by_recorded_at"], flux["cpu"], flux["batching"]
    ratios = s["ratios"]
    return [
        f"Steady state: pgbench tpcb-like, scale {p['scale']}, {p['clients']} clients, {p['run_s']}s per run",
        f"  TPS without Flux        {before['pgbench']['tps']:>9.0f} (before)  {after['pgbench']['tps']:.0f} (after)"
        f"   WAL/txn {before['wal_bytes_per_txn']} / {after['wal_bytes_per_txn']} B",
        f"  TPS with Flux           {flux['pgbench']['tps']:>9.0f}   {ratios['tps_with_flux_vs_without']:.2f} of without"
        f"   WAL/txn {flux['wal_bytes_per_txn']} B (x{ratios['wal_per_txn_with_flux_vs_without']}, incl. Flux's own writes)",
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
        f"  engine CPU              {cpu.get('engine_cpu_pct_of_one_core')}% of one core"
        f"  (walsender {cpu.get('walsender_cpu_pct_of_one_core')}%, sink backend {cpu.get('sink_backend_cpu_pct_of_one_core')}%;"
        f" machine {cpu['machine_busy_pct_of_all_cores']}% busy)   peak RSS {flux['engine_peak_rss_mib']:.0f} MiB",
    ]


def _backlog_lines(b: dict, p: dict) -> list[str]:
    e, r, d, g, ratios = b["engine"], b["pg_recvlogical"], b["decode"], b["generated"], b["ratios"]
    rounds = b["rounds"]
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
                      *_backlog_lines(result["backlog"], result["params"])])  # fmt: skip
