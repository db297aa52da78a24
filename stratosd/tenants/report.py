"""The tenants report: per tenant its student (and why), adapter, accuracy alone vs aggregated,
and bytes sent against its raw data. Written as report.json and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from schemas.tenants import TenantJobState


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(job: TenantJobState) -> str:
    """The report body."""
    agg = job.spec.aggregation
    lines = [f"# Tenants job {job.name} ({job.job_id})", "",
             f"state: {job.state}; rule `{agg.rule}`, weighting {agg.weighting}, temperature "
             f"{agg.temperature:g}, {agg.rounds} rounds × {agg.local_steps} local steps, "
             f"LoRA r={agg.lora_r}", ""]
    names = sorted(job.similarity)
    if names:
        lines += ["## Similarity s = 1/(1+d)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(f"{job.similarity[a].get(b, 0):.3f}" for b in names)
                  + " |" for a in names]
        lines.append("")
    for ep in job.endpoints:
        lines += [f"## Endpoint {ep.endpoint_id} ({ep.state})", "",
                  f"- {ep.url or '-'} on agent {ep.agent}, deployer {ep.deployer}, base "
                  f"{ep.student}; OpenAI `model` = "
                  + ", ".join(f"`{n}`" for n in sorted(ep.names.values())),
                  "- moved to the serving agent: weights only (each tenant's ΔW as LoRA "
                  "factors), never data: " + ", ".join(
                      f"{k} {v} bytes" + (" (served on its own agent)" if v == 0 else "")
                      for k, v in sorted(ep.weights_bytes.items())), ""]
    for name, r in sorted(job.results.items()):
        b = r.bytes
        sent = b.to_agent + b.from_agent
        ratio = f"{100 * sent / b.raw_data:.1f}% of its raw data" if b.raw_data else ""
        lines += [f"## Tenant {name} ({r.state})", "",
                  f"- agent: {r.agent}; student: {r.student or '-'}; tuned model: "
                  f"{r.adapter or '-'} (stays on the agent)",
                  f"- accuracy on {r.n_test} held-out rows: alone {_pct(r.accuracy_alone)}, "
                  f"aggregated {_pct(r.accuracy_aggregated)}",
                  f"- group {r.group or '-'}; weights "
                  + (", ".join(f"{k} {v:.3f}" for k, v in sorted(r.weights.items())) or "-"),
                  f"- bytes on the bus: {sent} ({b.to_agent} to its agent, {b.from_agent} back; "
                  f"signature {b.signature}, updates {b.updates}, mixes {b.mixes}); raw data "
                  f"{b.raw_data} bytes never sent {('— ' + ratio) if ratio else ''}",
                  f"- spent (measured): ${r.spent_usd:.4g} for {r.spent_s:.1f} s of jobs on "
                  "its agent" + (f"; limit budget_usd ${r.budget.budget_usd:g}"
                                 if r.budget is not None else "")]
        if r.endpoint_url:
            lines.append(f"- served at {r.endpoint_url} as `model={r.served_name}`; its "
                         f"weights moved to the serving agent: {b.weights} bytes")
        if r.stopped_at:
            lines.append(f"- **stopped before {r.stopped_at}**: {r.stop_reason}")
        if r.state != "ok":
            left = sorted(n for n, o in job.results.items() if o.state == "ok")
            lines.append(f"- **{r.state}** at {r.dropped_at or '-'}: {r.error}; from then on "
                         f"the others were aggregated without it ({', '.join(left) or 'none'})")
        elif r.error:
            lines.append(f"- error: {r.error}")
        if r.budget is not None:
            bu = r.budget
            lines.append(f"- budget: estimated ${bu.estimate_usd:.4g} (${bu.low_usd:.4g}-"
                         f"${bu.high_usd:.4g}; probe ${bu.probe_usd:.4g}) for {bu.student} vs "
                         f"budget_usd ${bu.budget_usd:g} — {bu.basis}")
        if r.pick is not None:
            p = r.pick
            lines += [f"- pick ({p.rule}): **{p.chosen}**; {p.formula}",
                      f"  - quality axis q = {p.quality_metric}"
                      + (f": {p.quality_note}" if p.quality_note else ""),
                      "  - baselines: " + ", ".join(f"{k} → {v}"
                                                     for k, v in sorted(p.baselines.items())),
                      "", "  | model | params | exact acc | target NLL/token | q | latency ms "
                      "| fits | score |", "  |---|---|---|---|---|---|---|---|"]
            for pt in p.points:
                tag = " (predicted)" if pt.predicted else ""
                score = p.scores.get(pt.model)
                nll = "-" if pt.target_nll is None else (
                    f"{pt.target_nll:.3f}" + (f" ± {pt.target_nll_se:.3f}"
                                              if pt.target_nll_se is not None else ""))
                q = "-" if pt.quality is None else f"{pt.quality:.4g}"
                lines.append(f"  | {pt.model} | {pt.params} | {pt.accuracy:.3f}{tag} | {nll} | "
                             f"{q} | {pt.latency_ms:.1f}{tag} | "
                             f"{'yes' if pt.fits else pt.why_not} | "
                             f"{'-' if score is None else f'{score:.3f}'} |")
            lines += [f"  - {pt.model} predicted from {pt.basis}"
                      for pt in p.points if pt.predicted and pt.basis]
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: Path, job: TenantJobState) -> dict[str, str]:
    """report.json and report.md under out_dir; their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "report.json", out_dir / "report.md"
    js.write_text(json.dumps(msgspec.to_builtins(job), indent=2, default=str))
    md.write_text(render_markdown(job))
    return {"json": str(js), "markdown": str(md)}
