"""The GPU benchmark's report: issue #14's targets marked met / missed / not measured, as JSON and as text.

Owns the target table and the two summaries written from the stage results (gpu.py's `stages` mapping: per stage
its status, seconds, error and result). A target whose stage did not produce its number is "not measured",
never missed or met.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Stages = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    limit: float
    op: str  # "<=" or ">="
    value: Callable[[Stages], float | None]


def _rows(stages: Stages, stage: str) -> list[dict[str, Any]]:
    return (stages.get(stage, {}).get("result") or {}).get("rows") or []


def _row(stages: Stages, stage: str, batch: int) -> dict[str, Any] | None:
    return next((row for row in _rows(stages, stage) if row.get("batch") == batch), None)


def _field(stages: Stages, stage: str, key: str) -> Any:
    return (stages.get(stage, {}).get("result") or {}).get(key)


def _step_ms(stages: Stages, batch: int) -> float | None:
    row = _row(stages, "decode", batch)
    return None if row is None else row["step_ms"]


def _tok_s(stages: Stages, batch: int) -> float | None:
    row = _row(stages, "decode", batch)
    return None if row is None else row["output_tok_s"]


def _floor_fraction(stages: Stages, batch: int) -> float | None:
    floor, step = _row(stages, "floor", batch), _step_ms(stages, batch)
    return None if floor is None or step is None else floor["floor_ms"] / step


def _parity(stages: Stages) -> float | None:
    identical, of = _field(stages, "parity", "identical_requests"), _field(stages, "parity", "of")
    return None if identical is None or not of else identical / of


TARGETS = (
    Target("decode_step_ms_b1", "decode step at batch 1 (ms)", 5.0, "<=", lambda s: _step_ms(s, 1)),
    Target(
        "floor_fraction_b1", "weight-read floor / decode step at batch 1", 0.25, ">=", lambda s: _floor_fraction(s, 1)
    ),
    Target("output_tok_s_b32", "decode output tok/s at batch 32", 5000.0, ">=", lambda s: _tok_s(s, 32)),
    Target(
        "speedup_vs_hf",
        "offline throughput / HF eager generate",
        10.0,
        ">=",
        lambda s: _field(s, "compare", "speedup_vs_hf"),
    ),
    Target("fp32_greedy_identical", "tiny model fp32 greedy: identical requests / all", 1.0, ">=", _parity),
    Target(
        "live_long_over_short",
        "live end of speech -> first token, long session / short",
        1.2,
        "<=",
        lambda s: _field(s, "live", "long_over_short"),
    ),
    Target(
        "live_short_ms",
        "live end of speech -> first token at the short session (ms)",
        50.0,
        "<=",
        lambda s: _field(s, "live", "short_eos_to_first_ms"),
    ),
)
_OPS = {"<=": operator.le, ">=": operator.ge}


def evaluate(stages: Stages) -> list[dict[str, Any]]:
    """Each target with its measured value (None when its stage gave none) and its status."""
    rows = []
    for target in TARGETS:
        value = target.value(stages)
        status = "not measured" if value is None else "met" if _OPS[target.op](value, target.limit) else "missed"
        rows.append(
            {
                "name": target.name,
                "description": target.description,
                "value": value,
                "target": f"{target.op} {target.limit:g}",
                "status": status,
            }
        )
    return rows


def write_report(out_dir: Path, header: dict[str, Any], stages: Stages) -> dict[str, Any]:
    """Write gpu_report.json and gpu_report.txt into `out_dir`; return the JSON document."""
    report = {**header, "stages": stages, "targets": evaluate(stages)}
    (out_dir / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    try:
        text = summary(report)
    except (KeyError, TypeError, ValueError) as exc:  # the JSON above is the record; never lose it to the text
        text = f"the text summary failed ({type(exc).__name__}: {exc}); see gpu_report.json\n"
    (out_dir / "gpu_report.txt").write_text(text)
    return report


def summary(report: dict[str, Any]) -> str:
    title = (
        f"omnistream GPU benchmark: {report.get('device_name')} ({report.get('device')}), "
        f"{report.get('dtype')}, {report.get('model')}; {report.get('total_s', 0):.0f} s"
    )
    lines = [title]
    if report.get("smoke"):
        lines.append("SMOKE RUN: tiny shapes; the figures below say nothing about the targets")
    lines += ["", "Stages:"]
    for name, stage in report["stages"].items():
        error = f"  {stage['error']}" if stage.get("error") else ""
        lines.append(f"  {name:<8} {stage['status']:<19} {stage.get('seconds', 0):6.1f} s{error}")
    tests = report["stages"].get("gputests", {}).get("result")
    if tests:
        counts = f"{tests['passed']} passed, {len(tests['failed'])} failed, {tests['skipped']} skipped"
        lines += ["", f"GPU tests (@pytest.mark.gpu): {counts} of {tests['tests']}"]
        lines += [f"  FAILED {failure['test']}: {failure['message']}" for failure in tests["failed"]]
    decode = _decode_table(report["stages"])
    if decode:
        lines += ["", *decode]
    facts = _facts(report["stages"])
    if facts:
        lines += ["", "Settings and side figures:", *(f"  {fact}" for fact in facts)]
    lines += ["", "Targets (issue #14):"]
    for target in report["targets"]:
        value = "-" if target["value"] is None else f"{target['value']:.4g}"
        lines.append(f"  {target['status']:<13} {target['description']}: {value} (target {target['target']})")
    return "\n".join(lines) + "\n"


def _decode_table(stages: Stages) -> list[str]:
    batches = [row["batch"] for name in ("decode", "forward") for row in _rows(stages, name)]
    if not batches:
        return []
    columns = (
        f"  {'batch':>5} {'engine ms':>10} {'out tok/s':>10} {'forward ms':>11} {'eager ms':>9} "
        f"{'floor ms':>9} {'floor/engine':>13}"
    )
    lines = [
        "Decode step (median, synchronised; engine = schedule + forward + sample + update; forward = model + lm_head +",
        "greedy pick alone, through the decode graphs when they are on, and eager):",
        columns,
    ]
    for batch in sorted(set(batches)):
        engine, forward = _row(stages, "decode", batch), _row(stages, "forward", batch)
        floor = _row(stages, "floor", batch)
        share = "-" if floor is None or engine is None else f"{floor['floor_ms'] / engine['step_ms']:.1%}"
        eager = "-" if forward is None or "eager_ms" not in forward else f"{forward['eager_ms']:.3f}"
        lines.append(
            f"  {batch:>5} {_ms(engine, 'step_ms'):>10} {_ms(engine, 'output_tok_s', '.0f'):>10} "
            f"{_ms(forward, 'step_ms'):>11} {eager:>9} {_ms(floor, 'floor_ms'):>9} {share:>13}"
        )
    return lines


def _ms(row: dict[str, Any] | None, key: str, spec: str = ".3f") -> str:
    return "-" if row is None else format(row[key], spec)


def _facts(stages: Stages) -> list[str]:
    """One line per stage result worth reading beside the tables: setup, load times, the other side's figures."""
    result = {name: stage.get("result") or {} for name, stage in stages.items()}
    facts = []
    build = result.get("build", {})
    if build:
        facts.append(
            f"model: {build['checkpoint_gb']:.1f} GB written in {build['write_s']:.0f} s "
            f"(reused: {build['reused']}), tokenizer {build.get('tokenizer')}"
        )
    if "measured_bandwidth_gbps" in result.get("floor", {}):
        floor = result["floor"]
        facts.append(
            f"floor: copy bandwidth {floor['measured_bandwidth_gbps']:.0f} GB/s measured, "
            f"{floor['bandwidth_gbps']:.0f} GB/s used; context {floor['context']} tokens"
        )
    for name in ("forward", "decode"):
        if "attention_backend" in result.get(name, {}):
            run = result[name]
            graphs = run.get("graphs") or ("cuda" if run["graphs_on"] else "off")
            facts.append(
                f"{name}: attention {run['attention_backend']}, decode graphs {graphs}, "
                f"model load {run.get('load_s', 0):.0f} s"
            )
    compare = result.get("compare", {})
    if "hf_output_tok_s" in compare:
        facts.append(
            f"compare: ours {compare['engine_output_tok_s']:.0f} out tok/s, HF {compare['hf_output_tok_s']:.0f} "
            f"(transformers {compare['hf']['transformers']}, experts {compare['hf']['experts']}), greedy equal {compare['greedy_agreement']['identical_requests']}"
            f"/{compare['greedy_agreement']['of']}"
        )
    elif "engine_output_tok_s" in compare:
        facts.append(f"compare: ours {compare['engine_output_tok_s']:.0f} out tok/s (HF not measured)")
    for row in result.get("live", {}).get("rows", []):
        facts.append(
            f"live {row['audio_s']:g} s: end of speech -> first token {row['streaming_eos_to_first_s'] * 1e3:.0f} ms, "
            f"whole clip at the end {row['offline_first_s'] * 1e3:.0f} ms"
        )
    for row in result.get("speech", {}).get("rows", []):
        facts.append("speech (benchmarks/speech.py row): " + " | ".join(row))
    profile = result.get("profile", {})
    if profile.get("top_ops"):
        top = ", ".join(f"{op['name']} {op['self_ms']:.2f} ms" for op in profile["top_ops"][:5])
        facts.append(f"profile (batch {profile['batch']}, {profile['sorted_by']}): {top}; full table in profile.txt")
    return facts
