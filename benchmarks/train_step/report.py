"""Tables of recorded ``python -m benchmarks.train_step`` runs: ratios to the baselines, the targets, where the time
goes, and generated sections of a markdown page. Plain Python on the JSON records (no torch: the driver imports it).

    python -m benchmarks.train_step report benchmarks/results/h100/*/qwen2_5_vl-7b_fixed_*.json   # print the tables
    python -m benchmarks.train_step report --write PAGE.md out/*.json                         # fill PAGE.md's blocks

``--write`` replaces what stands between ``<!-- report:results -->`` and ``<!-- /report:results -->`` (one
table per record file, with its device, date and versions) and between ``<!-- report:profile -->`` and
``<!-- /report:profile -->`` (the profiled steps of every file) in the given markdown file; the prose around
the markers is left as it is.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

BASELINES = ("hf_qlora", "hf_qlora_noupcast")
MODEL_TITLES = {
    "qwen2_5_vl-7b": "Qwen2.5-VL-7B",
    "qwen2_5_vl-3b": "Qwen2.5-VL-3B",
    "gemma3-4b": "Gemma-3-4B",
    "minicpmv2_6-8b": "MiniCPM-V 2.6 (8B)",
    "minicpmv4_6-1.3b": "MiniCPM-V 4.6 (1.3B)",
}
SECTIONS = ("results", "profile")


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``ratios[<baseline>]``: each figure over the same figure of ``hf_qlora``, ``hf_qlora_noupcast``,
    ``unsloth`` and, for ``:frozen`` configurations, ``hf_qlora:frozen``, where those ran."""
    ok = {r["config"]: r for r in results if r.get("status") == "ok"}
    for r in results:
        if r.get("status") != "ok":
            continue
        refs = [*BASELINES, "unsloth"] + (
            ["hf_qlora:frozen", "unsloth:frozen"] if r["config"].endswith(":frozen") else []
        )
        r["ratios"] = {}
        for ref in refs:
            if ref not in ok:
                continue
            base = ok[ref]
            r["ratios"][ref] = {
                key: (r[key] / base[key] if r.get(key) is not None and base.get(key) else None)
                for key in ("tokens_per_s", "step_s", "peak_alloc_gib", "peak_reserved_gib", "warmup_s")
            }


def fmt(value, digits=2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the records, ratios to both baselines included."""
    head = (
        "| configuration | step s | tokens/s | images/s | peak alloc GiB | peak reserved GiB | loss first → last "
        "| warm-up s | tok/s ÷ hf_qlora | tok/s ÷ noupcast | tok/s ÷ unsloth | mem ÷ hf_qlora | mem ÷ noupcast "
        "| mem ÷ unsloth |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in results:
        if r.get("status") != "ok":
            reason = str(r.get("reason", ""))[:140].replace("|", "/")
            if r.get("status") == "timeout":
                reason = f"killed after {fmt(r.get('wall_s'), 0)} s, when the run's --time-budget was spent"
            lines.append(f"| {r['config']} | {r.get('status')}: {reason} |" + " |" * 12)
            continue
        ratio = r.get("ratios", {})

        def rel(ref, key, ratio=ratio):
            return fmt(ratio.get(ref, {}).get(key))

        lines.append(
            f"| {r['config']} | {fmt(r['step_s'], 3)} | {fmt(r['tokens_per_s'], 0)} | {fmt(r['images_per_s'], 2)} "
            f"| {fmt(r['peak_alloc_gib'])} | {fmt(r['peak_reserved_gib'])} "
            f"| {fmt(r['loss_first'], 3)} → {fmt(r['loss_last'], 3)} | {fmt(r['warmup_s'], 1)} "
            + " ".join(f"| {rel(ref, 'tokens_per_s')}" for ref in (*BASELINES, "unsloth"))
            + " "
            + " ".join(f"| {rel(ref, 'peak_alloc_gib')}" for ref in (*BASELINES, "unsloth"))
            + " |"
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    """The targets for vlmtune QLoRA (kernels on when they ran, else off), met or missed and by how much."""
    ok = {r["config"]: r for r in results if r.get("status") == "ok"}
    ours = next((ok[c] for c in ("vlmtune_qlora_kernels", "vlmtune_qlora") if c in ok), None)
    if ours is None:
        return ["targets: no vlmtune QLoRA configuration ran"]
    lines = [f"targets, measured on {ours['config']}:"]

    def check(label, value, goal, met):
        lines.append(f"  {'MET   ' if met else 'MISSED'} {label}: {value:.2f} (goal {goal})")

    if "unsloth" in ok:
        u = ok["unsloth"]
        check(
            "tokens/s ÷ unsloth",
            ours["tokens_per_s"] / u["tokens_per_s"],
            ">= 1.5",
            ours["tokens_per_s"] >= 1.5 * u["tokens_per_s"],
        )
        if ours.get("peak_alloc_gib") and u.get("peak_alloc_gib"):
            ratio = ours["peak_alloc_gib"] / u["peak_alloc_gib"]
            check("peak alloc ÷ unsloth", ratio, "<= 1.0", ratio <= 1.0)
    if "hf_qlora" in ok and ours.get("peak_alloc_gib") and ok["hf_qlora"].get("peak_alloc_gib"):
        ratio = ours["peak_alloc_gib"] / ok["hf_qlora"]["peak_alloc_gib"]
        check("peak alloc ÷ hf_qlora", ratio, "<= 0.5", ratio <= 0.5)
    offload = ok.get("vlmtune_qlora_kernels_offload")
    if offload and "unsloth" in ok and offload.get("peak_alloc_gib") and ok["unsloth"].get("peak_alloc_gib"):
        ratio = offload["peak_alloc_gib"] / ok["unsloth"]["peak_alloc_gib"]
        check("peak alloc with offload ÷ unsloth", ratio, "<= 1.0", ratio <= 1.0)
    check("warm-up s", ours["warmup_s"], "< 30", ours["warmup_s"] < 30)
    frozen = ok.get(ours["config"] + ":frozen")
    if frozen:
        ratio = frozen["step_s"] / ours["step_s"]
        check("step s, vision frozen ÷ vision LoRA", ratio, "< 1.0", ratio < 1.0)
    packed = ok.get(ours["config"] + "_packed")
    if packed:
        ratio = packed["tokens_per_s"] / ours["tokens_per_s"]
        check("tokens/s, packed ÷ padded (same samples per step)", ratio, "> 1.0", ratio > 1.0)
    return lines


# ------------------------------------------------------------------------------------------- BENCHMARKS.md


def _title(meta: dict[str, Any]) -> str:
    data = meta.get("data", {})
    tokens = data.get("tokens_per_batch") or []
    shape = f"{meta['shape']} shape (batch {meta['batch']}"
    shape += f", {tokens[0]} tokens)" if meta["shape"] == "fixed" and tokens else ")"
    return f"{MODEL_TITLES.get(meta['model'], meta['model'])}, {shape}"


def _versions(results: list[dict[str, Any]]) -> str:
    found = next((r["versions"] for r in results if r.get("versions")), {})
    return ", ".join(f"{k} {v}" for k, v in found.items() if v is not None)


def results_markdown(data: dict[str, Any]) -> str:
    """One record file as a BENCHMARKS.md subsection: heading, run facts, table, targets."""
    meta, results = data["meta"], data["results"]
    add_ratios(results)
    lines = [
        f"### {_title(meta)}",
        "",
        f"{meta['device']}, {meta['date']}; {meta['warmup']} warm-up + {meta['steps']} timed steps; "
        f"`{meta['command']}`; {_versions(results)}.",
        "",
        table(results),
        "",
    ]
    found = targets(results)
    lines += [found[0][:1].upper() + found[0][1:], *(f"- {line.strip()}" for line in found[1:])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- where the time goes


_SHORT = {"vision tower": "vision", "language tower": "language", "forward": "rest of fwd", "step": "rest"}


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def step_table(profile: dict[str, Any], timed_step_s: float | None = None) -> str:
    """Markdown tables of one profiled step: wall and device time per part, device time per kernel kind."""
    device = "GPU" if profile["device_time"].startswith("CUDA") else "CPU op"
    timed = None if timed_step_s is None else 1000 * timed_step_s
    lines = [
        f"profiled step {_ms(profile['step_ms'])} ms wall (timed median {_ms(timed)} ms), {device} busy "
        f"{_ms(profile['device_busy_ms'])} ms = {_pct(profile['device_busy_share'])} of the wall "
        f"({profile['device_time']}); outside the step {_ms(profile.get('device_outside_step_ms'))} ms",
        "",
        f"| part | wall ms | % of step | {device} ms | {device} busy % of part |",
        "|---|---|---|---|---|",
    ]
    for part in profile["parts"]:
        busy = part["device_ms"] / part["wall_ms"] if part["wall_ms"] else None
        lines.append(
            f"| {part['label']} | {_ms(part['wall_ms'])} | {_pct(part['share'])} | {_ms(part['device_ms'])} "
            f"| {_pct(busy)} |"
        )
    lines.append(
        f"| **step** | {_ms(profile['step_ms'])} | 100% | {_ms(profile['device_busy_ms'])} "
        f"| {_pct(profile['device_busy_share'])} |"
    )
    lines += ["", f"| kernel kind | {device} ms | % of {device} busy | % of step wall | count |"]
    lines.append("|---|---|---|---|---|")
    for kind in profile["kinds"]:
        lines.append(
            f"| {kind['kind']} | {_ms(kind['ms'])} | {_pct(kind['share_of_busy'])} "
            f"| {_pct(kind['ms'] / profile['step_ms'])} | {kind['count']} |"
        )
    return "\n".join(lines)


def summary_tables(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Two markdown tables over profiled configurations (``(label, record)`` pairs): wall ms (% of the step)
    per part, and device ms per kernel kind against the wall. Columns follow the first record's parts and kinds."""
    first = rows[0][1]["profile"]
    parts = [(p["part"], _SHORT.get(p["part"], p["part"])) for p in first["parts"]]
    kinds = [k["kind"] for k in first["kinds"]]
    legend = "; ".join(f"{_SHORT.get(p['part'], p['part'])}: {p['label']}" for p in first["parts"])
    lines = [f"Parts, exclusive wall ms (% of the profiled step) — {legend}.", ""]
    lines += ["| run | step ms | " + " | ".join(short for _, short in parts) + " |", "|" + "---|" * (len(parts) + 2)]
    for label, record in rows:
        profile = record["profile"]
        by_part = {p["part"]: p for p in profile["parts"]}
        cells = [f"{_ms(by_part[p]['wall_ms'])} ({_pct(by_part[p]['share'])})" for p, _ in parts]
        lines.append(f"| {label} | {_ms(profile['step_ms'])} | " + " | ".join(cells) + " |")
    lines += ["", "| run | step ms | device busy ms (% of step) | " + " | ".join(kinds) + " |"]
    lines.append("|" + "---|" * (len(kinds) + 3))
    for label, record in rows:
        profile = record["profile"]
        by_kind = {k["kind"]: k for k in profile["kinds"]}
        cells = [_ms(by_kind[k]["ms"]) for k in kinds]
        busy = f"{_ms(profile['device_busy_ms'])} ({_pct(profile['device_busy_share'])})"
        lines.append(f"| {label} | {_ms(profile['step_ms'])} | {busy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profiled(datas: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, record)`` of every configuration with a successful profile, in file order."""
    rows = []
    for data in datas:
        model = MODEL_TITLES.get(data["meta"]["model"], data["meta"]["model"])
        for record in data["results"]:
            if record.get("profile", {}).get("status") == "ok":
                rows.append((f"{model} {data['meta']['shape']} `{record['config']}`", record))
    return rows


def profile_markdown(datas: list[dict[str, Any]]) -> str:
    """The "where the time goes" block: one profiled step per configuration, by part and by kernel kind."""
    rows = profiled(datas)
    if not rows:
        return (
            "No profiled step in these records "
            "(run `python -m benchmarks.train_step` with `--profile` or `--suite final`)."
        )
    devices = sorted({data["meta"]["device"] for data in datas})
    lines = [
        f"One step after the timed ones, under `torch.profiler` ({', '.join(devices)}; "
        f"{', '.join(sorted({data['meta']['date'][:10] for data in datas}))}); each range is bounded by a device "
        "sync, kernels are counted in the range they start in (method: `benchmarks/train_step/profiling.py`). "
        "Device busy is the sum of kernel (and memcpy / memset) time, against the step's wall time.",
        "",
        summary_tables(rows),
        "",
        "Profiled step against the timed median (the profiler's and the syncs' overhead):",
        "",
    ]
    for label, record in rows:
        profile = record["profile"]
        lines.append(
            f"- {label}: {profile['step_ms']:.0f} ms profiled, {1000 * record['step_s']:.0f} ms timed median; "
            f"device busy {profile['device_busy_ms']:.0f} ms ({100 * profile['device_busy_share']:.0f}% of the wall, "
            f"{profile['device_time']})"
        )
    failed = [
        f"- {data['meta']['model']} `{r['config']}`: profile {r['profile'].get('status')}: {r['profile'].get('reason')}"
        for data in datas
        for r in data["results"]
        if r.get("profile") and r["profile"].get("status") != "ok"
    ]
    return "\n".join(lines + failed)


def write_sections(path: Path, sections: dict[str, str]) -> None:
    """Replace the text between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` for each section."""
    text = path.read_text()
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- report:{name} -->\n).*?(<!-- /report:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{path} has no '<!-- report:{name} -->' ... '<!-- /report:{name} -->' markers")
        text = pattern.sub(lambda m, body=body: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
    path.write_text(text)


def report_main(argv: list[str]) -> int:
    """``python -m benchmarks.train_step report [--write FILE.md] RECORD.json ...``: the records' tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step report", description=report_main.__doc__)
    parser.add_argument("records", nargs="+", help="JSON records of python -m benchmarks.train_step runs")
    parser.add_argument("--write", default=None, help="markdown file whose report:* blocks to fill")
    args = parser.parse_args(argv)
    datas = []
    for name in args.records:
        data = json.loads(Path(name).read_text())
        if "results" not in data:  # --max-batch records hold no step figures
            continue
        datas.append(data)
    if args.write:
        sections = {
            "results": "\n\n".join(results_markdown(data) for data in datas),
            "profile": profile_markdown(datas),
        }
        write_sections(Path(args.write), sections)
        print(f"wrote {', '.join(SECTIONS)} of {len(datas)} record(s) into {args.write}")
        return 0
    for data in datas:
        meta, results = data["meta"], data["results"]
        add_ratios(results)
        print(f"{meta['model']}, {meta['shape']} shape, batch {meta['batch']}, {meta['device']}, {meta['date']}\n")
        print(table(results))
        print("\n" + "\n".join(targets(results)) + "\n")
        for record in results:
            if record.get("profile", {}).get("status") == "ok":
                print(f"where the time goes, {record['config']}:\n")
                print(step_table(record["profile"], record.get("step_s")) + "\n")
    return 0
