"""Evaluation during training and the run's record: one 8-step run of the tiny Qwen2.5-VL (evaluations at steps
0, 4 and 8, checkpoints at 4 and 8, the best by CER kept) shared by the tests of its metrics.jsonl, report.html,
predictions and exported checkpoint; a killed run and its resume in a subprocess."""

import ast
import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlmtune
from vlmtune import run_files
from vlmtune.cli import main
from vlmtune.data.schema import DataError
from vlmtune.evaluate import generate
from vlmtune.train_eval import eval_arguments

SAMPLES, NEW_TOKENS = 3, 10
WORKER = Path(__file__).with_name("train_kill_worker.py")


def _bad_row(tmp: Path) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
        ],
        "images": [str(tmp / "missing.png")],
    }


@pytest.fixture(scope="module")
def run(tiny_qwen, latex_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model, processor, family = vlmtune.load(tiny_qwen)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="lora"))
    train_rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    test_rows = vlmtune.load_rows("latex_ocr", split="test", path=latex_data)
    held_out = [test_rows[i] for i in range(len(test_rows))]
    before = generate(model, processor, held_out[:SAMPLES], max_new_tokens=NEW_TOKENS)
    config = vlmtune.TrainConfig(
        output_dir=str(out),
        max_steps=8,
        batch_size=2,
        lr=5e-3,
        logging_steps=1,
        save_steps=4,
        on_bad_row="skip",
        eval_rows=[*held_out, _bad_row(out)],  # the bad row is last: the generated rows are the test split's first
        eval_steps=4,
        eval_samples=SAMPLES,
        eval_max_new_tokens=NEW_TOKENS,
        best_metric="cer",
        report_latex=True,
    )
    result = vlmtune.train(model, processor, family, train_rows, config)
    after = generate(result.model, processor, held_out[:SAMPLES], max_new_tokens=NEW_TOKENS)
    export = vlmtune.export(result.model, processor, out / "export", base_model=str(tiny_qwen))
    lines = run_files.read_lines(out / run_files.METRICS)
    return SimpleNamespace(
        out=out,
        result=result,
        before=before,
        after=after,
        export=export,
        train=[r for r in lines if r["kind"] == "train"],
        evals=[r for r in lines if r["kind"] == "eval"],
        data=latex_data,
        held_out=held_out,
    )


def test_metrics_jsonl_has_one_line_per_step_and_per_evaluation(run):
    assert [r["step"] for r in run.train] == list(range(1, 9))
    assert [r["step"] for r in run.evals] == [0, 4, 8]
    assert [r["loss"] for r in run.train] == run.result.losses
    assert [r["lr"] for r in run.train] == pytest.approx([5e-3 * (1 - s / 8) for s in range(8)])  # linear decay
    assert all(r["grad_norm"] > 0 and r["gpu_peak_gib"] is None for r in run.train)  # CPU: no GPU memory
    tokens = [r["tokens"] for r in run.train]
    assert tokens == sorted(tokens) and tokens[0] > 0
    for r in run.train:
        assert r["tokens_per_s"] > 0 and r["step_time_s"] == pytest.approx(r["train_s"])  # one step per line
    for r in run.evals:
        assert {"eval_loss", "exact_match", "cer", "bleu"} <= r.keys() and r["eval_s"] >= r["generation_s"] > 0
    assert run.evals[-1]["eval_loss"] < run.evals[0]["eval_loss"]
    assert run.result.evaluations == run.evals


def test_generation_metrics_are_logged_through_the_trainer(run):
    # What Trainer.log records is what TensorBoard / W&B receive (their callbacks' on_log); checkpoints keep it.
    state = json.loads((run.out / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    logged = {entry["step"]: entry for entry in state["log_history"] if "eval_cer" in entry}
    assert sorted(logged) == [0, 4, 8]
    for line in run.evals:
        assert logged[line["step"]]["eval_cer"] == line["cer"]
        assert logged[line["step"]]["eval_exact_match"] == line["exact_match"]
    assert [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e] == [r["eval_loss"] for r in run.evals]


def test_bad_eval_rows_are_skipped_and_counted_apart(run):
    assert (run.result.kept_eval_rows, run.result.skipped_eval_rows) == (6, {"missing image": 1})
    assert (run.result.kept_rows, run.result.skipped_rows) == (18, {})


def test_a_bad_eval_row_stops_the_run_naming_it(tiny_qwen, latex_data, tmp_path):
    model, processor, family = vlmtune.load(tiny_qwen)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig())
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    config = vlmtune.TrainConfig(output_dir=str(tmp_path), max_steps=1, eval_rows=[_bad_row(tmp_path)])
    with pytest.raises(DataError, match=r"^eval row 0: image file .*missing\.png' not found"):
        vlmtune.train(model, processor, family, rows, config)


def test_report_numbers_equal_metrics_jsonl(run, parse_report):
    report = parse_report((run.out / run_files.REPORT).read_text())
    values = {key: value for (key, step), value in report.values.items() if step is None}
    train_s = sum(r["train_s"] for r in run.train)
    assert values["steps"] == 8
    assert values["wall_time_s"] == max(r["elapsed_s"] for r in run.train + run.evals)
    assert values["tokens_per_s"] == run.train[-1]["tokens"] / train_s
    assert values["step_time_s"] == train_s / 8
    assert values["eval_s"] == sum(r["eval_s"] for r in run.evals) / 3
    assert values["peak_gpu_gib"] is None
    assert (values["train_kept"], values["eval_kept"], values["eval_skipped"]) == (18, 6, 1)
    assert values["best_step"] == run.result.best_step
    assert values["trainable_parameters"] == sum(p.numel() for p in run.result.model.parameters() if p.requires_grad)
    assert values["towers"] == {"vision": "lora", "projector": "frozen", "language": "lora"}
    for line in run.evals:
        for key in ("eval_loss", "exact_match", "cer", "bleu", "generation_s"):
            assert report.values[(key, str(line["step"]))] == line[key], (key, line["step"])


def test_every_embedded_image_decodes(run, parse_report):
    report = parse_report((run.out / run_files.REPORT).read_text())
    images = [source for _, _, source in report.sources]
    assert all(s.startswith("data:image/png;base64,") for s in images)  # nothing fetched from anywhere
    classes = [css for _, css, _ in report.sources]
    assert classes.count("plot") == 4 and classes.count("input") == SAMPLES
    for source in images:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            image.load()
            assert image.width > 0 and image.height > 0


def test_before_and_after_are_the_models_predictions_at_step_0_and_at_the_end(run, parse_report):
    report = parse_report((run.out / run_files.REPORT).read_text())
    by_step = {}
    for p in report.predictions:
        by_step.setdefault(p["step"], []).append(p["text"])
    best = run.result.best_step
    assert best in (4, 8) and sorted(by_step) == [0, best]
    assert by_step[0] == run.before  # generate() on the model before training
    assert by_step[best] == run.after  # generate() on the model train() returned (the best checkpoint)
    written = {r["step"]: r["predictions"] for r in run_files.read_lines(run.out / run_files.PREDICTIONS)}
    assert sorted(written) == [0, 4, 8] and written[0] == run.before


def test_the_best_checkpoint_is_returned_and_exported(run):
    cers = {r["step"]: r["cer"] for r in run.evals if r["step"] > 0}
    assert run.result.best_step == min(cers, key=lambda step: (cers[step], step))  # ties keep the first
    checkpoint = load_file(run.out / "checkpoints" / f"checkpoint-{run.result.best_step}" / "adapter_model.safetensors")
    exported = load_file(run.export / "adapter_model.safetensors")
    assert exported.keys() == checkpoint.keys()
    assert all(torch.equal(exported[k], checkpoint[k]) for k in exported)
    assert run.result.metrics == {k: run.evals[[0, 4, 8].index(run.result.best_step)][k] for k in run.result.metrics}


def test_evaluation_during_training_equals_vlmtune_eval_on_the_checkpoint(run, capsys):
    status = main(
        ["eval", "--adapter", str(run.export), "--data", str(run.data), "--n", str(SAMPLES)]
        + ["--max-new-tokens", str(NEW_TOKENS)]
    )
    assert status == 0
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    best = next(r for r in run.evals if r["step"] == run.result.best_step)
    assert printed == {k: best[k] for k in ("exact_match", "cer", "bleu")}


def test_vlmtune_report_rebuilds_the_same_file(run, capsys):
    path = run.out / run_files.REPORT
    written = path.read_bytes()
    path.unlink()
    assert main(["report", str(run.out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert path.read_bytes() == written


def test_eval_arguments_select_the_best_checkpoint_by_the_metric():
    config = vlmtune.TrainConfig(eval_rows=[{}], eval_steps=5, save_steps=10, best_metric="cer")
    arguments = eval_arguments(config, has_eval=True)
    assert arguments["metric_for_best_model"] == "eval_cer" and arguments["greater_is_better"] is False
    assert arguments["load_best_model_at_end"] and arguments["eval_on_start"]
    resumed = vlmtune.TrainConfig(eval_rows=[{}], eval_steps=5, resume_from_checkpoint=True)
    assert eval_arguments(resumed, has_eval=True)["eval_on_start"] is False  # step 0 is already in metrics.jsonl
    assert eval_arguments(vlmtune.TrainConfig(packing=True), has_eval=False)["include_num_input_tokens_seen"] == "all"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(best_metric="cer"), "set eval_steps > 0 and save_steps to a multiple"),
        (dict(best_metric="cer", eval_steps=4, save_steps=6), "multiple of it"),
        (dict(best_metric="wer", eval_steps=4, save_steps=4), "best_metric must be one of"),
        (dict(best_metric="cer", eval_steps=4, save_steps=4, eval_samples=0), "set eval_samples > 0"),
        (dict(eval_steps=-1), "eval_steps and eval_samples must be >= 0"),
    ],
)
def test_eval_settings_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        vlmtune.TrainConfig(**fields)


def test_export_records_the_eval_rows_as_a_count(run):
    record = vlmtune.export.__globals__["jsonable"](vlmtune.TrainConfig(eval_rows=run.held_out))
    assert record["eval_rows"] == {"rows": 6}


def test_a_killed_run_leaves_a_report_and_resuming_continues_metrics_jsonl(
    tiny_qwen, latex_data, tmp_path, parse_report
):
    out = tmp_path / "run"
    command = [sys.executable, str(WORKER), "--model", str(tiny_qwen), "--data", str(latex_data), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([*command, "--kill-at", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after checkpoint-2, with step 3 logged
    lines = run_files.read_lines(out / run_files.METRICS)
    assert max(r["step"] for r in lines) == 3
    report = parse_report((out / run_files.REPORT).read_text())  # written at checkpoint-2
    assert report.values[("steps", None)] == 2
    for _, _, source in report.sources:
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).load()

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = run_files.read_lines(out / run_files.METRICS)
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [0, 2, 4, 6]
    assert [r["step"] for r in run_files.read_lines(out / run_files.PREDICTIONS)] == [0, 2, 4, 6]
    elapsed = [r["elapsed_s"] for r in lines]
    assert elapsed == sorted(elapsed)  # the resumed run continues the wall clock
    report = parse_report((out / run_files.REPORT).read_text())
    assert report.values[("steps", None)] == 6 and sorted({p["step"] for p in report.predictions}) == [0, 6]


def test_packed_training_evaluates_on_packed_held_out_rows(tiny_qwen, latex_data, tmp_path):
    model, processor, family = vlmtune.load(tiny_qwen)
    model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
    rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
    test_rows = vlmtune.load_rows("latex_ocr", split="test", path=latex_data)
    config = vlmtune.TrainConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        lr=5e-3,
        logging_steps=1,
        packing=True,
        max_length=600,
        eval_rows=[test_rows[i] for i in range(3)],
        eval_samples=1,
        eval_max_new_tokens=4,
        report=False,
    )
    result = vlmtune.train(model, processor, family, rows, config)
    assert [e["step"] for e in result.evaluations] == [0, 2]  # eval_steps 0: before the first step and at the end
    assert all(e["eval_loss"] > 0 and e["cer"] is not None for e in result.evaluations)
    assert result.evaluations[1]["eval_loss"] < result.evaluations[0]["eval_loss"]
    assert not (tmp_path / run_files.METRICS).exists() and not (tmp_path / run_files.REPORT).exists()


@pytest.mark.gpu
def test_kernels_on_give_the_plain_models_evaluation(tiny_qwen, latex_data, tmp_path):
    # Generation runs with the kernels paused and the eval loss through the fused loss: both must match the plain run.
    results = []
    for kernels in (False, True):
        model, processor, family = vlmtune.load(tiny_qwen)
        model = vlmtune.apply_tuning(model, family, vlmtune.TuningConfig(vision="frozen"))
        rows = vlmtune.load_rows("latex_ocr", split="train", path=latex_data)
        test_rows = vlmtune.load_rows("latex_ocr", split="test", path=latex_data)
        config = vlmtune.TrainConfig(
            output_dir=str(tmp_path / str(kernels)),
            max_steps=2,
            batch_size=2,
            logging_steps=1,
            kernels=kernels,
            eval_rows=[test_rows[i] for i in range(4)],
            eval_samples=2,
            eval_max_new_tokens=8,
        )
        results.append(vlmtune.train(model, processor, family, rows, config).evaluations)
    plain, fused = results
    assert [e["eval_loss"] for e in fused] == pytest.approx([e["eval_loss"] for e in plain], rel=2e-2)
    assert fused[0]["cer"] == plain[0]["cer"]  # step 0: the same weights, generated without the kernels
