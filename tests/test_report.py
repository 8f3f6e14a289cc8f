"""rlhf report: plots, page and summary of one run, a chain, a sweep or several runs; bad paths are one
`error:` line. Most runs here are written by hand (a manifest and metrics.jsonl is all a report reads);
sample generations need a real final/, trained for three steps."""

import json
import re
import subprocess
import sys
import uuid

import pytest
from matplotlib.image import imread

from rlhf_cli.report.build import write_report
from rlhf_cli.report.collect import collect_runs
from rlhf_cli.report.document import PageFormat, Table, render_html, render_markdown
from rlhf_cli.report.page import accuracy_table
from rlhf_cli.report.plots import metric_figure, overview_figure
from tests.conftest import QUICK, write_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, stage, rows, *, status="completed", final_metrics=None, parents=None, config=None, error=None):
    """A run directory as a stage leaves it: manifest.json and metrics.jsonl (no model)."""
    path.mkdir(parents=True)
    manifest = {"stage": stage, "run_id": uuid.uuid4().hex, "status": status, "parents": parents or {},
                "config": config or {"stage": stage, "train": {"max_steps": 10}}, "final_metrics": final_metrics}
    if error:
        manifest["error"] = error
    (path / "manifest.json").write_text(json.dumps(manifest))
    write_jsonl(path / "metrics.jsonl", rows)
    return manifest


def training_rows(start_loss, steps=10, **extra):
    return [{"step": s, "loss": start_loss - 0.1 * s, "lr": 1e-4, **extra} for s in range(1, steps + 1)]


def from_run(manifest):
    return {"path": "runs/default/sft/final", "run": "runs/default/sft", "stage": manifest["stage"], "run_id": manifest["run_id"]}


def write_chain(root):
    """runs/default as the default chain leaves it: sft, then rm, dpo and grpo from sft/final."""
    sft = write_run(root / "sft", "sft", training_rows(3.0) + [{"step": 10, "eval/loss": 1.2, "eval/accuracy": 0.522}],
                    final_metrics={"loss": 2.0, "steps": 10, "eval/loss": 1.2, "eval/accuracy": 0.522})
    write_run(root / "rm", "train-rm", training_rows(0.7, accuracy=0.8) + [{"step": 10, "eval/accuracy": 0.9}],
              final_metrics={"loss": 0.6, "accuracy": 0.8, "steps": 10, "eval/accuracy": 0.9}, parents={"model": from_run(sft)})
    write_run(root / "dpo", "dpo", [{"step": 0, "eval/accuracy": 0.522}] + training_rows(2.5) + [{"step": 10, "eval/accuracy": 0.792}],
              final_metrics={"loss": 1.5, "steps": 10, "eval/accuracy": 0.792},
              parents={"model": from_run(sft), "reference": from_run(sft)})
    write_run(root / "grpo", "grpo", training_rows(0.1, **{"reward/mean": 0.4, "kl": 0.01}) + [{"step": 10, "eval/accuracy": 0.692}],
              final_metrics={"reward/mean": 0.4, "kl": 0.01, "steps": 10, "eval/accuracy": 0.692}, parents={"model": from_run(sft)})


def image_sources(page):
    return set(re.findall(r'<img src="([^"]+)"', page))


def test_report_of_one_run_writes_valid_pngs_a_page_showing_each_and_says_where(rlhf, tmp_path):
    write_run(tmp_path / "run", "sft", training_rows(3.0) + [{"step": 5, "eval/accuracy": 0.25}, {"step": 10, "eval/accuracy": 0.5}],
              final_metrics={"loss": 2.0, "steps": 10, "eval/accuracy": 0.5})
    result = rlhf("report", "run", "--samples", "0")
    assert result.exit_code == 0, result.output
    report = tmp_path / "run/report"
    pngs = {path.name for path in report.glob("*.png")}
    assert pngs == {"overview.png", "loss.png", "lr.png", "eval-accuracy.png"}
    for name in pngs:
        data = (report / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
        height, width, _ = imread(report / name).shape
        assert height >= 300 and width >= 500, name
    page = (report / "index.html").read_text()
    assert image_sources(page) == pngs
    assert "<h2>Final metrics</h2>" in page and "<td>eval/accuracy</td><td>0.5</td>" in page
    assert "<td>run</td><td>sft</td><td>completed</td><td>10/10</td>" in page
    assert "<summary>run (sft)" in page  # the resolved config, folded
    assert result.output.strip().splitlines()[-1] == "report: run/report/index.html"


def test_a_chain_is_overlaid_with_the_accuracy_after_each_stage(rlhf, tmp_path):
    write_chain(tmp_path / "runs/default")
    runs = collect_runs([tmp_path / "runs/default"])
    assert [run.label for run in runs] == ["sft", "rm", "dpo", "grpo"]  # the order the chain runs in

    lines = metric_figure("loss", runs).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["sft", "rm", "dpo", "grpo"]
    assert list(lines[2].get_xdata()) == list(range(1, 11))
    assert list(lines[2].get_ydata()) == pytest.approx([2.5 - 0.1 * s for s in range(1, 11)])
    eval_lines = metric_figure("eval/accuracy", runs).axes[0].get_lines()
    assert {line.get_label(): list(line.get_ydata()) for line in eval_lines}["dpo"] == [0.522, 0.792]
    assert [line.get_label() for line in eval_lines] == ["sft", "rm", "dpo", "grpo"]  # every logged line

    # The overview's eval/accuracy is answer accuracy: train-rm's (pairs ranked right) is left out there.
    panels = {axes.get_title(): axes.get_lines() for axes in overview_figure(runs).axes}
    assert sorted(panels) == ["eval/accuracy", "kl", "loss", "reward/mean"]
    assert [line.get_label() for line in panels["eval/accuracy"]] == ["sft", "dpo", "grpo"]
    assert [line.get_label() for line in panels["loss"]] == ["sft", "rm", "dpo", "grpo"]
    assert panels["eval/accuracy"][1].get_color() == lines[2].get_color()  # dpo's colour in every plot

    # train-rm's eval/accuracy ranks preference pairs, so it is left out of the answer-accuracy table.
    assert accuracy_table(runs).rows == [["sft", "sft", "–", "0.522", "–"],
                                         ["dpo", "dpo", "sft", "0.792", "+0.270 over sft"],
                                         ["grpo", "grpo", "sft", "0.692", "+0.170 over sft"]]
    result = rlhf("report", "runs/default", "--samples", "0")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "runs/default/report/index.html").read_text()
    assert "<h2>Held-out accuracy</h2>" in page
    assert "<td>dpo</td><td>dpo</td><td>sft</td><td>0.792</td><td>+0.270 over sft</td>" in page
    assert "<td>model, reference: sft</td>" in page  # what dpo chained from
    assert image_sources(page) == {path.name for path in (tmp_path / "runs/default/report").glob("*.png")}


def test_sweep_jobs_and_several_run_dirs_are_overlaid_one_line_each(rlhf, tmp_path):
    sweep = tmp_path / "runs/lr-sweep/2026-01-01_00-00-00"
    for job, start_loss in (("10_train.lr=0.3", 4.0), ("9_train.lr=0.1", 3.0)):
        write_run(sweep / job, "sft", training_rows(start_loss))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    runs = collect_runs([sweep])
    assert [run.label for run in runs] == ["9_train.lr=0.1", "10_train.lr=0.3"]  # job order, not string order
    lines = metric_figure("loss", runs).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["9_train.lr=0.1", "10_train.lr=0.3"]
    assert [line.get_ydata()[0] for line in lines] == pytest.approx([2.9, 3.9])

    write_run(tmp_path / "other/sft", "sft", training_rows(5.0))
    result = rlhf("report", str(sweep), "other/sft", "--out", "compare", "--samples", "0")
    assert result.exit_code == 0, result.output
    runs = collect_runs([sweep, tmp_path / "other/sft"])
    assert [line.get_label() for line in metric_figure("loss", runs).axes[0].get_lines()] == [
        "runs/lr-sweep/2026-01-01_00-00-00/9_train.lr=0.1", "runs/lr-sweep/2026-01-01_00-00-00/10_train.lr=0.3", "other/sft"]
    assert result.output.strip().splitlines()[-1] == "report: compare/index.html"


def test_markdown_page(rlhf, tmp_path):
    write_chain(tmp_path / "runs/default")
    result = rlhf("report", "runs/default", "--format", "md", "--samples", "0")
    assert result.exit_code == 0, result.output
    report = tmp_path / "runs/default/report"
    page = (report / "index.md").read_text()
    assert not (report / "index.html").exists()
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)) == {path.name for path in report.glob("*.png")}
    assert "| dpo | dpo | sft | 0.792 | +0.270 over sft |" in page
    assert "<details><summary>grpo (grpo)" in page and "```yaml" in page


def test_text_from_runs_is_shown_as_written_not_read_as_markup():
    table = Table(["prompt", "completion"], [["Q: 3*4*5=", "<b>60</b> | _x_"]])
    assert "| Q: 3\\*4\\*5= | \\<b\\>60\\</b\\> \\| \\_x\\_ |" in render_markdown("t", [table])
    assert "<td>&lt;b&gt;60&lt;/b&gt; | _x_</td>" in render_html("t", [table])


def test_running_and_failed_runs_are_reported_with_their_status(rlhf, tmp_path):
    write_run(tmp_path / "runs/sft", "sft", training_rows(3.0), final_metrics={"loss": 2.0, "steps": 10})
    write_run(tmp_path / "runs/dpo", "dpo", training_rows(2.5, steps=4), status="running", config={"train": {"max_steps": 50}})
    write_run(tmp_path / "runs/grpo", "grpo", training_rows(0.1, steps=2), status="failed", error="RuntimeError: out of memory")
    result = rlhf("report", "runs", "--samples", "0")
    assert result.exit_code == 0, result.output
    assert re.search(r"dpo\s+dpo\s+running\s+4/50", result.output)
    assert re.search(r"grpo\s+grpo\s+failed\s+2/10", result.output)
    page = (tmp_path / "runs/report/index.html").read_text()
    assert "<td>running</td>" in page and "grpo failed: RuntimeError: out of memory" in page


def test_rerunning_replaces_the_report_and_a_crash_leaves_the_previous_one(rlhf, tmp_path, monkeypatch):
    write_run(tmp_path / "runs/sft", "sft", training_rows(3.0))
    assert rlhf("report", "runs/sft", "--samples", "0").exit_code == 0
    report = tmp_path / "runs/sft/report"
    (report / "stale.png").write_bytes(b"old")
    assert rlhf("report", "runs/sft", "--samples", "0").exit_code == 0
    assert not (report / "stale.png").exists() and (report / "index.html").is_file()

    before = {path.name: path.read_bytes() for path in report.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing the page")

    monkeypatch.setattr("rlhf_cli.report.build.render", crash)
    with pytest.raises(RuntimeError):
        write_report([tmp_path / "runs/sft"], None, 0, PageFormat.html)
    assert {path.name: path.read_bytes() for path in report.iterdir()} == before
    assert sorted(path.name for path in (tmp_path / "runs/sft").iterdir()) == ["manifest.json", "metrics.jsonl", "report"]
    with pytest.raises(RuntimeError):
        write_report([tmp_path / "runs/sft"], tmp_path / "first", 0, PageFormat.html)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs"]


# (case id, arguments, text the error line must contain)
BAD_PATHS = [
    ("missing", ["nowhere"], "nowhere: no such directory"),
    ("a-file", ["notes.txt"], "notes.txt: not a directory"),
    ("no-runs", ["empty"], "empty: not a run directory (no manifest.json"),
    ("runs-a-level-down", ["runs"], "runs: not a run directory (no manifest.json in it or in its direct subdirectories); "
                                    "the runs are a level down: pass one of runs/default"),
    ("no-metrics", ["nometrics"], "nometrics: holds no metrics"),
    ("corrupt-metrics", ["corrupt"], "corrupt/metrics.jsonl:1: not a JSON object"),
    ("several-without-out", ["runs/default/sft", "runs/default/dpo"], "several RUN_DIRs: say where their report goes with --out DIR"),
    ("out-is-a-run", ["runs/default", "--out", "runs/default/sft"], "runs/default/sft: holds the runs being reported"),
    ("out-is-not-a-report", ["runs/default", "--out", "empty"], "empty: not an earlier report"),
]


@pytest.mark.parametrize("args,expected", [case[1:] for case in BAD_PATHS], ids=[case[0] for case in BAD_PATHS])
def test_bad_paths_are_one_error_line(rlhf, tmp_path, args, expected):
    write_chain(tmp_path / "runs/default")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/unrelated.txt").write_text("x")
    write_run(tmp_path / "nometrics", "sft", [])
    write_run(tmp_path / "corrupt", "sft", [])
    (tmp_path / "corrupt/metrics.jsonl").write_text("{oops\n" + json.dumps({"step": 1, "loss": 1.0}) + "\n")
    result = rlhf("report", *args, "--samples", "0")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.output
    assert sorted(path.name for path in (tmp_path / "runs/default").iterdir()) == ["dpo", "grpo", "rm", "sft"]
    assert (tmp_path / "empty/unrelated.txt").is_file()


def test_an_unexpected_failure_is_one_error_line_and_debug_shows_the_traceback(rlhf, tmp_path, monkeypatch):
    write_run(tmp_path / "run", "sft", training_rows(3.0))

    def broken(*args, **kwargs):
        raise ValueError("no plot today")

    monkeypatch.setattr("rlhf_cli.report.build.write_plots", broken)
    result = rlhf("report", "run", "--samples", "0")
    assert result.exit_code == 1
    assert result.output.strip() == "error: ValueError: no plot today (run with --debug for the traceback)"
    result = rlhf("report", "run", "--samples", "0", "--debug")
    assert isinstance(result.exception, ValueError)


def test_a_cut_off_last_metrics_line_is_left_out(tmp_path):
    run = tmp_path / "run"
    write_run(run, "sft", training_rows(3.0, steps=3))
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "lo')  # a run killed while logging
    assert collect_runs([run])[0].series["loss"].steps == [1, 2, 3]


def test_sample_generations_of_each_policy_with_the_expected_answers(rlhf, tmp_path):
    from rlhf_cli.data.builtin import builtin_rows

    assert rlhf("sft", *QUICK).exit_code == 0  # runs/default/sft, evaluated on builtin:arith_eval
    write_run(tmp_path / "runs/default/rm", "train-rm", training_rows(0.7))
    (tmp_path / "runs/default/rm/final").mkdir()  # a reward model: nothing to generate, not even tried
    write_run(tmp_path / "runs/default/dpo", "dpo", training_rows(2.5),
              config={"stage": "dpo", "eval": {"accuracy_data": "missing.jsonl", "generate": 8}})
    (tmp_path / "runs/default/dpo/final").mkdir()

    result = rlhf("report", "runs/default", "--samples", "2")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "runs/default/report/index.html").read_text()
    samples = page[page.index("<h2>Sample generations</h2>"):page.index("<h2>Resolved configs</h2>")]
    first = [row for row in builtin_rows("arith_eval") if row.data.get("answer") is not None][:2]
    assert samples.count("<h3>") == 2 and "<h3>sft (sft)</h3>" in samples and "rm (train-rm)" not in samples
    for row in first:
        assert f"<td>{row.data['prompt']}</td><td>{row.data['answer']}</td>" in samples
    assert samples.count("<tr>") == 1 + 2  # header and the two samples
    # Rows that cannot be loaded are noted, on the page and the terminal; the report is still written.
    assert "<h3>dpo (dpo)</h3>\n<p>No samples: missing.jsonl: no such file</p>" in samples
    assert "dpo: no sample generations: missing.jsonl: no such file" in result.output


def test_the_cli_starts_without_loading_plotting_or_torch():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, rlhf_cli.cli; print(' '.join(m for m in ('matplotlib', 'torch') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert loaded.stdout.strip() == ""


def test_the_eval_json_of_rlhf_eval_beside_the_runs_is_shown(rlhf, tmp_path):
    write_chain(tmp_path / "runs/default")
    (tmp_path / "runs/default/eval").mkdir()
    (tmp_path / "runs/default/eval/eval.json").write_text(json.dumps({
        "model": {"path": "runs/default/dpo/final"}, "metrics": {"accuracy": 0.75, "win_rate": 0.6125},
        "skipped": {"rm_accuracy": "model.path is a causal LM"}}))
    result = rlhf("report", "runs/default", "--samples", "0")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "runs/default/report/index.html").read_text()
    assert "Evaluations (rlhf eval)" in page
    assert "0.6125" in page and "runs/default/dpo/final" in page and "model.path is a causal LM" in page
