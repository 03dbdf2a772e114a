"""Runs side by side, and runs as text: what `histosearch eval` prints.

Two runs are comparable when they measured the same dataset (content hash) with the same kind of
evaluation; a comparison of anything else still prints, under a warning naming what differs.
"""

from __future__ import annotations

from search.evaluation.bootstrap import Estimate


def _estimate(figure: dict) -> Estimate:
    return Estimate(figure["value"], figure.get("low", figure["value"]), figure.get("high", figure["value"]))


def compare_runs(a: dict, b: dict) -> dict:
    """Per metric both estimates, b - a, and whether the 95 % intervals overlap (overlap: not shown to differ)."""
    warnings = []
    if a["kind"] != b["kind"]:
        warnings.append(f"different evaluations: {a['kind']} and {b['kind']}")
    if a["dataset"]["hash"] != b["dataset"]["hash"]:
        warnings.append(
            f"different datasets: {a['dataset']['name']} and {b['dataset']['name']} (content hashes differ)"
        )
    changed = [
        key
        for key in sorted(set(a["settings"]) | set(b["settings"]))
        if key != "filters" and a["settings"].get(key) != b["settings"].get(key)
    ]
    if a["model_fingerprint"] != b["model_fingerprint"]:
        changed.insert(0, "model")
    rows = []
    metrics_a, metrics_b = a["report"]["metrics"], b["report"]["metrics"]
    for name in [n for n in metrics_a if n in metrics_b]:
        ea, eb = _estimate(metrics_a[name]), _estimate(metrics_b[name])
        rows.append(
            {
                "metric": name,
                "a": ea.to_dict(),
                "b": eb.to_dict(),
                "diff": eb.value - ea.value,
                "overlap": ea.overlaps(eb),
            }
        )
    return {"a": a["id"], "b": b["id"], "warnings": warnings, "changed": changed, "metrics": rows}


def _setup(run: dict) -> str:
    s = run["settings"]
    where = (
        s["mode"]
        if s["mode"] == "exact"
        else f"index {s['index_type']}" + (f" nprobe={s['nprobe']}" if s.get("nprobe") else "")
    )
    extras = [name for name in ("tta", "prompt_ensemble") if s.get(name)]
    return where + (f" +{'+'.join(extras)}" if extras else "")


def _figure(figure: dict) -> str:
    if "low" not in figure:
        return f"{figure['value']:.3f}"
    return f"{figure['value']:.3f} [{figure['low']:.3f}, {figure['high']:.3f}]"


def format_run(run: dict) -> str:
    """Headline metrics with intervals, then per-class figures."""
    report = run["report"]
    title = f"{run['kind']} on {run['dataset']['name']}: {report['n_queries']} queries, {_setup(run)}"
    lines = [title + (f" (run {run['id']})" if run.get("id") else ""), f"model {run['model_fingerprint']}"]
    if report.get("no_match"):
        lines.append(
            f"{report['no_match']} queries have no same-label item outside their own case: they count as misses"
        )
    width = max(len(name) for name in report["metrics"])
    lines += [f"  {name:<{width}}  {_figure(f)}" for name, f in report["metrics"].items()]
    classes = report.get("per_class") or []
    if classes:
        names = [n for n in classes[0] if n not in ("label", "n")]
        label_width = max(len("class"), *(len(c["label"]) for c in classes))
        lines.append(f"  {'class':<{label_width}}  {'n':>5}  " + "  ".join(f"{n:>8}" for n in names))
        for c in classes:
            lines.append(
                f"  {c['label']:<{label_width}}  {c['n']:>5}  " + "  ".join(f"{c[n]['value']:>8.3f}" for n in names)
            )
    return "\n".join(lines)


def format_comparison(comparison: dict, a: dict, b: dict) -> str:
    lines = [f"warning: {w}" for w in comparison["warnings"]]
    lines.append(f"A: run {a['id']} {a['created_at']} {_setup(a)}")
    lines.append(f"B: run {b['id']} {b['created_at']} {_setup(b)}")
    if comparison["changed"]:
        lines.append(f"changed: {', '.join(comparison['changed'])}")
    width = max([len("metric")] + [len(r["metric"]) for r in comparison["metrics"]])
    lines.append(f"  {'metric':<{width}}  {'A':<22}  {'B':<22}  {'B - A':>7}  intervals")
    for r in comparison["metrics"]:
        verdict = "overlap" if r["overlap"] else "apart"
        lines.append(
            f"  {r['metric']:<{width}}  {_figure(r['a']):<22}  {_figure(r['b']):<22}  {r['diff']:>+7.3f}  {verdict}"
        )
    return "\n".join(lines)
