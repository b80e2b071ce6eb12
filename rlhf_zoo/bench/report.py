"""report.md: the benchmark's Markdown report, written from results.json's content alone."""

from __future__ import annotations

from typing import Any

from rlhf_zoo.bench.suite import DEFAULT_VARIANT


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(m: dict[str, Any] | None, digits: int = 3) -> str:
    """``IQM [lo, hi]`` of a metric record (see `aggregate.metric_stats`)."""
    if m is None:
        return "–"
    lo, hi = m["iqm_ci"]
    return f"{m['iqm']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _tokens(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _threads(machine: dict[str, Any]) -> str:
    """The runs' torch thread counts (each run's process chose its own: --threads), else the harness's."""
    counts = machine.get("run_torch_threads")
    return " or ".join(map(str, counts)) + " per run" if counts else str(machine["torch_threads"])


def header(results: dict[str, Any]) -> list[str]:
    suite, proto, machine = results["suite"], results["protocol"], results["machine"]
    commits = ", ".join(c or "unknown" for c in results["git_commits"]) or "unknown"
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [f"# Benchmark `{suite['name']}`", ""]
    if suite.get("description"):
        lines += [suite["description"], ""]
    lines += [f"- command: `{results['command']}`", f"- created: {results['created']}",
              f"- git commit: {commits}",
              f"- machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch threads "
              f"{_threads(machine)}, device(s) {', '.join(machine['devices'])}",
              f"- versions: {versions}", "",
              "Protocol: every run's final checkpoint (never the best); seeds "
              f"{', '.join(map(str, suite['seeds']))} are paired (a seed gives every algorithm the same "
              "initialisation and prompt order). A cell is the interquartile mean (IQM) over seeds with its "
              f"{proto['confidence']:.0%} percentile interval from {proto['n_resamples']} stratified-bootstrap "
              f"resamples (seeds resampled within the task; bootstrap seed {proto['bootstrap_seed']}); "
              f"IQM: {proto['iqm']}. With few seeds the intervals are wide, and with one seed they collapse to "
              "the point.", "",
              f"Budget: each algorithm's `{suite['preset']}` preset"
              + (" with the suite's options (" + "; ".join(f"{a}: " + ", ".join(f"{k} = {v}" for k, v in o.items())
                                                      for a, o in suite["options"].items() if o) + ")"
                 if any(suite.get("options", {}).values()) else "")
              + ", not equalised across algorithms; the tables "
              "report per run (mean over seeds) the tokens sampled during training (`gen.`, evaluation "
              "excluded) and the tokens in gradient steps (`trained`). best-of-N trains nothing and spends its "
              "budget at inference (N samples per answer; on `exact` its distribution is computed exactly).", ""]
    t = results.get("timing")
    if t:
        ex = results.get("execution", {})
        untimed = f"; {t['runs_without_process_time']} run(s) without a recorded process time" \
            if t["runs_without_process_time"] else ""
        cpu = f"{t['run_cpu_seconds'] / 60:.1f} min of CPU time; " if "run_cpu_seconds" in t else ""
        lines += [f"Cost: {ex.get('runs', '?')} runs ({ex.get('executed', '?')} run by the last invocation, "
                  f"{ex.get('skipped', '?')} reused); their processes took {t['run_process_seconds'] / 60:.1f} min "
                  f"in all ({cpu}start-up, task loading and evaluation included{untimed}), of which "
                  f"{t['run_wall_seconds'] / 60:.1f} min inside the runs (summary.json's `wall s`).", ""]
    for w in results.get("warnings", []):
        lines.append(f"> warning: {w}")
    return lines


def task_table(task: str, records: list[dict[str, Any]]) -> list[str]:
    exact = any("kl_to_optimum" in r["metrics"] for r in records)
    cols = ["algorithm", "variant", "gold IQM [95% CI]", "gold mean", "KL IQM [95% CI]"]
    cols += ["KL to optimum IQM [95% CI]", "frontier eff. IQM [95% CI]"] if exact else []
    cols += ["seeds", "gen. tokens", "trained tokens", "wall s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        m = r["metrics"]
        row = [r["algorithm"], r["variant"], _cell(m.get("gold_reward")),
               _f(m["gold_reward"]["mean"]) if "gold_reward" in m else "–", _cell(m.get("kl_to_ref"))]
        row += [_cell(m.get("kl_to_optimum")), _cell(m.get("frontier_efficiency"))] if exact else []
        wall = r["systems"].get("wall_seconds", {}).get("mean")
        row += [str(len(r["seeds"])), _tokens(r["budget"]["generated_tokens"]["mean"]),
                _tokens(r["budget"]["trained_tokens"]["mean"]), _f(wall, 1)]
        lines.append("| " + " | ".join(row) + " |")
    baseline = [r["metrics"]["baseline_gold_reward"]["mean"] for r in records if "baseline_gold_reward" in r["metrics"]]
    if baseline:
        lines += ["", f"SFT policy (reference), gold reward on the same evaluation: {_f(sum(baseline) / len(baseline))} "
                      "(mean over runs; its KL to the reference is 0)."]
    return lines


def frontier_efficiency(task: str, records: list[dict[str, Any]]) -> list[str]:
    """Each algorithm's frontier efficiency on an enumerable task, one row per algorithm: its best variant
    (highest IQM) with that variant's KL, then every variant by increasing KL. Empty where no record has it."""
    by_algo: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if {"frontier_efficiency", "kl_to_ref"} <= set(r["metrics"]):
            by_algo.setdefault(r["algorithm"], []).append(r)
    if not by_algo:
        return []
    lines = [f"Frontier efficiency on `{task}`: (R - R_SFT) / (R*(KL) - R_SFT), the share of the reward gain "
             "that the optimal policy pi*_beta reaches at the run's own KL which the run reached (1: on the exact "
             "frontier; R is what the environment pays). IQM over seeds [95% CI]; the best variant is the one "
             "of highest IQM.", "",
             "| algorithm | best frontier eff. IQM [95% CI] | best variant | its KL | every variant by increasing KL |",
             "|---|---|---|---|---|"]
    for algo, rs in by_algo.items():
        best = max(rs, key=lambda r: r["metrics"]["frontier_efficiency"]["iqm"])  # the first of equals
        sweep = "; ".join(f"{r['variant']}: {_cell(r['metrics']['frontier_efficiency'], 2)}"
                          for r in sorted(rs, key=lambda r: r["metrics"]["kl_to_ref"]["iqm"]))
        lines.append(f"| {algo} | {_cell(best['metrics']['frontier_efficiency'])} | {best['variant']} | "
                     f"{_f(best['metrics']['kl_to_ref']['iqm'])} | {sweep} |")
    return lines


def improvement_matrix(task: str, pairs: list[dict[str, Any]]) -> list[str]:
    pairs = [p for p in pairs if p["task"] == task]
    if not pairs:
        return []
    algos = list(dict.fromkeys([p["x"] for p in pairs]))
    cell = {(p["x"], p["y"]): f"{p['p']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]" for p in pairs}
    lines = [f"P(row > column) on gold reward, {DEFAULT_VARIANT} variants, with 95% bootstrap interval "
             "(Mann-Whitney over seed pairs, ties 1/2):", "",
             "| P(row > column) | " + " | ".join(algos) + " |", "|" + "---|" * (len(algos) + 1)]
    for a in algos:
        lines.append(f"| {a} | " + " | ".join("–" if a == b else cell[(a, b)] for b in algos) + " |")
    return lines


def known_results(task: str, checks: dict[str, Any]) -> list[str]:
    rows = checks.get("best_of_n", [])
    if not rows:
        return []
    lines = [f"Known results on `{task}`, computed exactly (best-of-N from the SFT policy, selection by the "
             "environment's score):", "",
             "| N | KL | log N - (N-1)/N | win rate vs reference | N/(N+1) | gold | optimal gold at that KL |",
             "|---|---|---|---|---|---|---|"]
    for c in rows:
        ok = c["kl"] <= c["kl_bound"] + 1e-9 and c["win_rate"] <= c["win_rate_bound"] + 1e-9 and \
            c["gold_reward"] <= c["frontier_gold_reward"] + 1e-9
        lines.append(f"| {c['n']} | {c['kl']:.4f} | {c['kl_bound']:.4f} | {c['win_rate']:.4f} | "
                     f"{c['win_rate_bound']:.4f} | {c['gold_reward']:.4f} | {c['frontier_gold_reward']:.4f} |"
                     + ("" if ok else " **violated**"))
    return lines


def render(results: dict[str, Any]) -> str:
    lines = header(results)
    tasks = list(dict.fromkeys(r["task"] for r in results["records"]))
    for task in tasks:
        records = [r for r in results["records"] if r["task"] == task]
        lines += ["", f"## Task `{task}`", "", *task_table(task, records)]
        efficiency = frontier_efficiency(task, records)
        lines += ["", *efficiency] if efficiency else []
        matrix = improvement_matrix(task, results["probability_of_improvement"])
        lines += ["", *matrix] if matrix else []
        known = known_results(task, results.get("exact_checks", {}).get(task, {}))
        lines += ["", *known] if known else []
        plots = [p for p in results.get("plots", []) if f"_{task}." in p]
        lines += ["", *[f"![{p}]({p})" for p in plots]] if plots else []
    return "\n".join(lines) + "\n"
