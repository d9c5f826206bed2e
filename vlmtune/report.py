"""A run's report, ``OUT/report.html``, built from the files the run wrote (:mod:`vlmtune.run_files`).

    vlmtune report OUT                      # or: from vlmtune.report import build_report; build_report("OUT")

Training writes it at every checkpoint and at the end, so a killed run still has one for the steps it logged.
One self-contained HTML file, readable offline in any browser: inline CSS, every image a base64 PNG, no script.
It holds a summary (model, family, towers and their modes, LoRA, trainable parameters, quantisation, rows kept
and skipped by kind, steps, wall time, tokens/s, peak GPU memory, evaluation time, versions), plots of the train
and eval loss, learning rate, gradient norm, exact match and CER, the table of evaluations, and a grid of up to 16
held-out samples: the input image, the reference, the predictions before training (step 0) and after (the
returned model: the best checkpoint's with ``best_metric``, else the last evaluation's), each with its CER; for
LaTeX the predictions drawn back as formulas. Every number shown carries its exact value in ``data-value``
(JSON), so what the page says can be checked against ``metrics.jsonl``. The same files give the same bytes.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune import run_files
from vlmtune.evaluate import character_error_rate
from vlmtune.report_figures import formula_png, line_plot, png_uri

MAX_SAMPLES = 16
_TOWERS = ("vision", "projector", "language")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { margin: .3em; border: 1px solid #eee; }
.samples img.input { max-width: 280px; max-height: 160px; }
.samples img.formula { max-width: 280px; max-height: 120px; display: block; margin-bottom: .3em; }
code { white-space: pre-wrap; word-break: break-all; font-size: .9em; }
.mark { color: #b00; font-size: .85em; display: block; }
.cer { color: #555; font-size: .85em; display: block; margin-top: .2em; }
.note { color: #666; }
"""


@dataclass
class RunFiles:
    """A run folder's records, read back."""

    out: Path
    run: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    predictions: dict[int, list[str]]
    samples: list[dict[str, Any]]


def read_run(out: str | Path) -> RunFiles:
    """Read ``run.json``, ``metrics.jsonl``, ``predictions.jsonl`` and the sample index of a run folder."""
    out = Path(out)
    lines = run_files.read_lines(out / run_files.METRICS)
    if not lines and not (out / run_files.RUN).exists():
        raise FileNotFoundError(f"{str(out)!r} has no {run_files.METRICS} or {run_files.RUN}: is it a run's folder?")
    predictions = {r["step"]: r["predictions"] for r in run_files.read_lines(out / run_files.PREDICTIONS)}
    return RunFiles(
        out=out,
        run=run_files.read_json(out / run_files.RUN),
        train=[r for r in lines if r["kind"] == "train"],
        evals=[r for r in lines if r["kind"] == "eval"],
        predictions=predictions,
        samples=run_files.read_json(out / run_files.SAMPLES_INDEX).get("samples", []),
    )


def build_report(out: str | Path) -> Path:
    """Write ``OUT/report.html`` from the run's files (atomically); return its path."""
    files = read_run(out)
    path = files.out / run_files.REPORT
    run_files.write_atomic(path, render(files))
    return path


def run_numbers(files: RunFiles) -> dict[str, Any]:
    """The run's totals, each computed from ``metrics.jsonl`` alone.

    ``steps``: the last step with a line; ``wall_time_s``: the largest ``elapsed_s``; ``tokens_per_s`` and
    ``step_time_s``: the tokens seen and the steps over the summed training time (``train_s``, evaluations and
    checkpoints excluded); ``peak_gpu_gib``: the largest peak (None off CUDA); ``eval_s``: mean time of one
    evaluation (eval loss + generation).
    """
    lines = files.train + files.evals
    train_s = sum(r["train_s"] for r in files.train)
    last = files.train[-1] if files.train else None
    peaks = [r["gpu_peak_gib"] for r in files.train if r.get("gpu_peak_gib") is not None]
    return {
        "steps": max((r["step"] for r in lines), default=0),
        "wall_time_s": max((r["elapsed_s"] for r in lines), default=0.0),
        "tokens_per_s": last["tokens"] / train_s if last and train_s > 0 else None,
        "step_time_s": train_s / last["step"] if last and last["step"] > 0 else None,
        "peak_gpu_gib": max(peaks) if peaks else None,
        "eval_s": sum(r["eval_s"] for r in files.evals) / len(files.evals) if files.evals else None,
    }


def after_step(files: RunFiles) -> int | None:
    """The step whose predictions stand for the trained model: the best checkpoint's, else the last one."""
    steps = sorted(s for s in files.predictions if s > 0)
    best = files.run.get("progress", {}).get("best_step")
    if best in files.predictions:
        return best
    return steps[-1] if steps else None


def render(files: RunFiles) -> str:
    """The report's HTML."""
    run = files.run
    title = f"vlmtune run: {run.get('base_model') or files.out.name}"
    body = [
        f"<h1>{_text(title)}</h1>",
        _status(files),
        "<h2>Summary</h2>",
        _summary_table(files),
        "<h2>Data</h2>",
        _rows_table(run.get("rows", {})),
        "<h2>Curves</h2>",
        _plots(files),
        "<h2>Evaluations</h2>",
        _evaluations_table(files.evals),
        "<h2>Held-out samples</h2>",
        _samples(files),
        "<h2>Versions and configuration</h2>",
        _versions(run),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _status(files: RunFiles) -> str:
    progress = files.run.get("progress", {})
    steps = run_numbers(files)["steps"]
    if progress.get("finished"):
        return f'<p class="note">Finished: {steps} steps.</p>'
    return f'<p class="note">Not finished (still running, or stopped): written at step {steps}.</p>'


def _summary_table(files: RunFiles) -> str:
    run, numbers = files.run, run_numbers(files)
    towers = run.get("towers", {})
    lora = run.get("lora", {})
    trainable, total = run.get("trainable_parameters"), run.get("parameters")
    share = f" of {total:,} ({100 * trainable / total:.2f}%)" if trainable is not None and total else ""
    progress = run.get("progress", {})
    rows = [
        ("base_model", "base model", run.get("base_model"), _text(run.get("base_model"))),
        ("family", "family", run.get("family"), _text(f"{run.get('family')} ({run.get('model_type')})")),
        ("towers", "towers", towers, _text(" · ".join(f"{k} {towers[k]}" for k in _TOWERS if k in towers))),
        ("lora", "LoRA", lora, _text(f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}")),
        ("trainable_parameters", "trainable parameters", trainable, _text(f"{trainable or 0:,}{share}")),
        ("quant", "quantisation", run.get("quant"), _text(run.get("quant"))),
        ("dtype", "compute dtype", run.get("dtype"), _text(run.get("dtype"))),
        ("kernels", "Triton kernels", run.get("kernels"), "on" if run.get("kernels") else "off"),
        ("device", "device", run.get("device"), _text(run.get("device"))),
        ("steps", "steps", numbers["steps"], _text(f"{numbers['steps']} of {progress.get('max_steps', '?')}")),
        ("wall_time_s", "wall time", numbers["wall_time_s"], _duration(numbers["wall_time_s"])),
        ("tokens_per_s", "training tokens/s", numbers["tokens_per_s"], _number(numbers["tokens_per_s"], ",.0f")),
        ("step_time_s", "time per step", numbers["step_time_s"], _number(numbers["step_time_s"], ".3f", " s")),
        ("peak_gpu_gib", "peak GPU memory", numbers["peak_gpu_gib"], _gib(numbers["peak_gpu_gib"])),
        ("eval_s", "time per evaluation", numbers["eval_s"], _number(numbers["eval_s"], ".2f", " s")),
    ]
    if progress.get("best_metric"):
        best = progress.get("best_step")
        rows.append(("best_step", f"best checkpoint ({progress['best_metric']})", best, _text(best)))
    cells = "\n".join(f"<tr><th>{label}</th>{_cell(key, value, text)}</tr>" for key, label, value, text in rows)
    return f'<table class="summary">\n{cells}\n</table>'


def _rows_table(rows: dict[str, Any]) -> str:
    lines = ["<tr><th>split</th><th>kept</th><th>skipped</th><th>skipped by kind</th></tr>"]
    for split, counts in rows.items():
        skipped = counts.get("skipped", {})
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items())) or "none"
        lines.append(
            f"<tr><th>{_text(split)}</th>{_cell(f'{split}_kept', counts.get('kept'), _text(counts.get('kept')))}"
            f"{_cell(f'{split}_skipped', sum(skipped.values()), str(sum(skipped.values())))}"
            f"<td>{_text(kinds)}</td></tr>"
        )
    return '<table class="rows">\n' + "\n".join(lines) + "\n</table>"


def _plots(files: RunFiles) -> str:
    train, evals = files.train, files.evals
    steps, eval_steps = [r["step"] for r in train], [r["step"] for r in evals]
    plots = [
        line_plot(
            "loss",
            [
                ("train", steps, [r["loss"] for r in train], "-"),
                ("eval", eval_steps, [r.get("eval_loss") for r in evals], "o-"),
            ],
        ),
        line_plot("learning rate", [("lr", steps, [r["lr"] for r in train], "-")]),
        line_plot("gradient norm", [("grad norm", steps, [r["grad_norm"] for r in train], "-")]),
        line_plot(
            "held-out generation",
            [
                ("exact match", eval_steps, [r.get("exact_match") for r in evals], "o-"),
                ("CER", eval_steps, [r.get("cer") for r in evals], "o-"),
            ],
        ),
    ]
    images = [f'<img class="plot" alt="plot" src="{png_uri(png)}">' for png in plots if png is not None]
    return f'<div class="plots">{"".join(images)}</div>' if images else '<p class="note">No steps logged yet.</p>'


def _evaluations_table(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return '<p class="note">No evaluation (set TrainConfig.eval_rows).</p>'
    columns = [("eval_loss", "eval loss"), ("exact_match", "exact match"), ("cer", "CER"), ("bleu", "BLEU")]
    columns += [("eval_loss_s", "loss time (s)"), ("generation_s", "generation time (s)")]
    head = "<tr><th>step</th>" + "".join(f"<th>{label}</th>" for _, label in columns) + "</tr>"
    lines = [head]
    for r in evals:
        cells = "".join(_cell(key, r.get(key), _number(r.get(key), ".4f"), step=r["step"]) for key, _ in columns)
        lines.append(f"<tr>{_cell('step', r['step'], str(r['step']), step=r['step'])}{cells}</tr>")
    return '<table class="evaluations">\n' + "\n".join(lines) + "\n</table>"


def _samples(files: RunFiles) -> str:
    if not files.samples:
        return '<p class="note">No held-out samples (set TrainConfig.eval_rows and eval_samples).</p>'
    latex = files.run.get("config", {}).get("report_latex", False)
    after = after_step(files)
    before = files.predictions.get(0)
    after_label = "after training" if files.run.get("progress", {}).get("finished") else "latest"
    head = (
        "<tr><th>#</th><th>input</th><th>reference</th><th>before training (step 0)</th>"
        f"<th>{after_label} (step {after if after is not None else '—'})</th></tr>"
    )
    lines = [head]
    for index, sample in enumerate(files.samples[:MAX_SAMPLES]):
        image = files.out / run_files.SAMPLES / sample["image"] if sample.get("image") else None
        picture = (
            f'<img class="input" alt="input {index}" src="{png_uri(image.read_bytes())}">'
            if image is not None and image.exists()
            else '<span class="note">no image</span>'
        )
        reference = sample["reference"]
        cells = [
            f"<td>{index}</td>",
            f"<td>{picture}</td>",
            f'<td class="reference"><code>{_text(reference)}</code></td>',
            _prediction(before, 0, index, reference, latex),
            _prediction(files.predictions.get(after), after, index, reference, latex),
        ]
        lines.append(f'<tr class="sample" data-index="{index}">{"".join(cells)}</tr>')
    return '<table class="samples">\n' + "\n".join(lines) + "\n</table>"


def _prediction(predictions: list[str] | None, step: int | None, index: int, reference: str, latex: bool) -> str:
    if predictions is None or index >= len(predictions):
        return '<td class="prediction missing"><span class="note">not evaluated yet</span></td>'
    text = predictions[index]
    cer = character_error_rate([text], [reference])
    drawn = ""
    if latex:
        png = formula_png(text)
        drawn = (
            f'<img class="formula" alt="prediction drawn" src="{png_uri(png)}">'
            if png is not None
            else '<span class="mark" title="matplotlib mathtext cannot parse it">✗ not a drawable formula</span>'
        )
    return (
        f'<td class="prediction" data-step="{step}" data-index="{index}" data-cer="{json.dumps(cer)}">'
        f'{drawn}<code>{_text(text)}</code><span class="cer">CER {cer:.3f}</span></td>'
    )


def _versions(run: dict[str, Any]) -> str:
    versions = run.get("versions", {})
    cells = "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in sorted(versions.items()))
    config = json.dumps(run.get("config", {}), indent=2, sort_keys=True)
    return (
        f'<table class="versions">{cells}</table>\n'
        f"<details><summary>TrainConfig</summary><pre>{_text(config)}</pre></details>"
    )


def _cell(key: str, value: Any, text: str, step: int | None = None) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    attributes = f' data-key="{key}" data-value="{html.escape(json.dumps(value), quote=True)}"'
    if step is not None:
        attributes += f' data-step="{step}"'
    css = ' class="number"' if numeric else ""
    return f"<td{css}{attributes}>{text}</td>"


def _text(value: Any) -> str:
    return html.escape("—" if value is None else str(value))


def _number(value: float | None, spec: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{unit}"


def _gib(value: float | None) -> str:
    return "n/a (no CUDA)" if value is None else f"{value:.2f} GiB"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours} h {minutes} min {rest:.0f} s" if hours else f"{minutes} min {rest:.1f} s"
