"""The report stage: tables from finished, failed and missing trials; figures from real MLflow runs and weights."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from markdown_it import MarkdownIt

from pipeline.commands import parser_of
from pipeline.config import PARAMS, RESULTS, load_params, results_dir
from pipeline.models import backbone_info
from pipeline.paper import PAPER_TABLES
from pipeline.report import TABLES, build_reports, build_table, results_file, run
from pipeline.report.figures import attention_figure, curves, head_maps, trained_attention
from pipeline.report.render import scale_lines
from pipeline.report.specs import paper_rows

FIXTURES = Path(__file__).parent / "fixtures" / "report" / "results"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    build_reports(FIXTURES, out)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table of a Markdown text as rows of cell texts (header first), via a CommonMark parser."""
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    tables, rows, cells = [], None, None
    for tok in tokens:
        if tok.type == "table_open":
            rows = []
        elif tok.type == "table_close":
            tables.append(rows)
            rows = cells = None
        elif tok.type == "tr_open":
            cells = []
        elif tok.type == "tr_close":
            rows.append(cells)
        elif tok.type == "inline" and cells is not None and rows is not None:
            cells.append(tok.content)
    return tables


def body(path: Path) -> list[list[str]]:
    """The rows of a report's table (the proxy's second table, its comparison with the paper, follows it)."""
    tables = md_tables(path.read_text())
    assert len(tables) == 1 + (path.stem == "proxy"), path
    return tables[0][1:]


@pytest.mark.slow
def test_every_table_has_every_paper_row_in_order_in_both_formats(built: Path) -> None:
    for name, spec in TABLES.items():
        expected = [int(r["row"]) for r in paper_rows(spec)]
        rows = read_csv(built / f"{name}.csv")
        assert [int(r["row"]) for r in rows] == expected, name
        md = [r for r in body(built / f"{name}.md") if not r[0].startswith("*")]  # Table 10 section rows
        assert len(md) == len(expected), name
        assert [r["network"] for r in rows] == [r[0].rstrip("⁰¹²³⁴⁵⁶⁷⁸⁹").split(" [")[0] for r in md], name


@pytest.mark.slow
def test_csv_columns_follow_the_interface(built: Path) -> None:
    metrics = {name: ["params", "madds", "top1", "top5"] for name in TABLES}
    metrics["table9"] = ["scratch_top1", "scratch_map", "finetune_top1", "finetune_map"]
    with open(PAPER_TABLES / "table10_speed.csv", newline="") as f:
        metrics["table10"] = next(csv.reader(f))
    for name, wanted in metrics.items():
        with open(built / f"{name}.csv", newline="") as f:
            header = next(csv.reader(f))
        paper = [f"paper_{m}" for m in wanted if m != "key"]
        assert {"row", "status", "reason", *wanted, *paper} <= set(header), name
        if TABLES[name].seeded:
            assert {"n", "trained_params", "trained_madds", "edited", "above_chance"} <= set(header), name
            assert {f"{m}_{s}" for m in wanted if "map" not in m and m not in ("params", "madds")
                    for s in ("std", "delta", "delta_low", "delta_high")} <= set(header), name
        for record in read_csv(built / f"{name}.csv"):
            values = [record[c] for c in wanted + paper if c != "key"]
            assert not any(v and ("*" in v or "↑" in v or "—" in v or "M" in v or "G" in v) for v in values)
            for v in values:
                if v:
                    float(v)


@pytest.mark.slow
def test_table4_means_intervals_and_marks_only_resolved_differences(built: Path) -> None:
    """Two seeds per row: means ± std, the paired difference to the baseline with its t interval, an arrow
    only when the interval excludes zero, bold only when it shows an improvement."""
    rows = body(built / "table4.md")
    header = md_tables((built / "table4.md").read_text())[0][0]
    assert header == ["Network", "r", "N", "n", "Params", "Params paper", "MAdds", "MAdds paper", "Top-1 (%)",
                      "Top-1 (%) paper", "Top-5 (%)", "Top-5 (%) paper", "Last-epoch top-1 (%)"]
    col = {h: i for i, h in enumerate(header)}
    base, r2, r3, r4, r6, r7 = rows[0], rows[1], rows[2], rows[3], rows[5], rows[6]
    # Params and MAdds: the model at the paper's settings, not the trained one's (23.53M, 0.08G at 10 classes)
    assert (base[0], base[col["r"]], base[col["n"]], base[col["Params"]], base[col["MAdds"]]) == \
        ("ResNet50", "-", "2", "25.56M", "4.09G")
    assert base[col["Top-1 (%)"]] == "50.25 ±0.35" and base[col["Top-1 (%) paper"]] == "76.23"
    # diffs 1.02 and 1.10: mean 1.06 ± t(0.975, 1)·0.057/√2 = [0.55, 1.57], resolved and better
    assert r2[col["Top-1 (%)"]] == "**51.31 ±0.41 (↑1.06 [0.55, 1.57])**"
    assert r2[col["Top-5 (%)"]] == "80.20 ±0.99 (−0.05 [−5.77, 5.67])"  # unresolved: no arrow, no bold
    assert r2[col["Top-1 (%) paper"]] == "76.84 (↑0.61)" and r2[col["Last-epoch top-1 (%)"]] == "50.88"
    # one reused trial for rows 4 and 7; diffs 2.5 and -0.5 leave the sign open
    assert r4[col["Top-1 (%)"]] == r7[col["Top-1 (%)"]] == "51.25 ±1.77 (+1.00 [−18.06, 20.06])"
    assert r4[col["Top-1 (%) paper"]] == "**77.25 (↑1.02)**"  # the paper's own best, as printed
    assert r3[col["n"]] == "1" and r3[col["Top-1 (%)"]] == "50.90 (+0.40)"  # one pair: no interval, no mark
    assert r6[col["Top-1 (%)"]] == "49.30 ±0.42 (↓0.95 [−1.59, −0.31])"  # resolved but worse: arrow, no bold
    bold = [r[col["Top-1 (%)"]] for r in rows if r[col["Top-1 (%)"]].startswith("**")]
    assert bold == [r2[col["Top-1 (%)"]]]
    records = read_csv(built / "table4.csv")
    assert records[1]["n"] == "2" and float(records[1]["top1_std"]) == pytest.approx(0.4101, abs=1e-4)
    assert float(records[1]["top1_delta"]) == pytest.approx(1.06)
    assert float(records[1]["top1_delta_low"]) == pytest.approx(0.5518, abs=1e-4)
    assert float(records[1]["top1_delta_high"]) == pytest.approx(1.5682, abs=1e-4)
    assert records[0]["top1_delta"] == "" and records[2]["top1_delta_low"] == ""  # a baseline; one pair
    assert records[1]["params"] == "25564032" and records[1]["trained_params"] == "23528532"
    text = (built / "table4.md").read_text()
    assert "**Seeds:** 0, 1." in text and "**Chance level:** top-1 10.00%, top-5 50.00%" in text
    (resolved,) = [line for line in text.splitlines() if line.startswith("**Resolved differences**")]
    assert "Top-1 (%) (↑1.06 [0.55, 1.57])" in resolved and "Top-1 (%) (↓0.95 [−1.59, −0.31])" in resolved
    assert "Top-5 (%) (−0.05" not in resolved and "unresolved at these seeds" in resolved


def test_the_scale_line_names_each_departure_from_the_papers_settings() -> None:
    meta = {"profile": "smoke", "epochs": 2, "departures": ["2 epochs of the recipe's 100", "64 px of 224"]}
    text = "\n".join(scale_lines(meta, None))
    assert "Departs from the paper's settings to fit its budget: 2 epochs of the recipe's 100; 64 px of 224" in text
    assert "Departs" not in "\n".join(scale_lines({**meta, "profile": "imagenet", "departures": []}, None))


@pytest.mark.slow
def test_failed_and_missing_trials_show_a_dash_and_a_footnote(built: Path) -> None:
    text = (built / "table4.md").read_text()
    rows = body(built / "table4.md")
    failed, absent, edited, interrupted = rows[2], rows[4], rows[5], rows[7]

    def mark(reason: str, rows: str) -> str:
        """The superscript of the footnote `N. reason (paper rows)`, failing when there is none."""
        found = re.search(rf"^(\d+)\. {re.escape(reason)} \(paper rows? {rows}\)$", text, re.MULTILINE)
        assert found, f"no footnote {reason!r} for paper rows {rows} in\n{text}"
        return found.group(1).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))

    guess = mark("NOAH's dropout 0.1 is its family's: the authors' commands do not state it for resnet50 "
                 "(docs/fidelity.md)", "2, 3, 4, 5, 6, 7, 8")
    assert failed[0] == "+ NOAH" + guess + mark("mean over the 1 of 2 seeds that finished", "3")
    assert absent[8] == absent[10] == "—" + mark("no result for this row in table4.json", "5")
    assert absent[4] == "25.56M"  # Params are known without training
    # a row edited in params.yaml: labelled with what it ran, and not compared with the paper
    assert edited[0] == "+ NOAH [backbone=resnet18]" + guess
    assert edited[5] == edited[9] == "—" + mark("this row ran with other settings than the paper's row: its paper "
                                                "values are not compared", "6")
    assert edited[4] == "11.69M"  # its own model, at the paper's settings
    assert interrupted[8] == "—" + mark("seed 0: trial MISSING: sweep interrupted before this trial started; seed 1: "
                                        "trial MISSING: sweep interrupted before this trial started", "8")
    mark("trained on cpu-B, unlike most of this table (cpu-A)", "4, 7")
    records = read_csv(built / "table4.csv")
    assert [r["status"] for r in records] == ["FINISHED", "FINISHED", "FAILED", "FINISHED", "MISSING", "FINISHED",
                                              "FINISHED", "MISSING"]
    assert records[2]["top1"] == "50.9" and records[2]["reason"].startswith(
        "seed 0: trial FAILED: loss became NaN at epoch 2; ")
    assert records[0]["paper_params"] == "25560000" and records[0]["paper_madds"] == "3860000000"
    assert records[5]["backbone"] == "resnet18" and records[5]["edited"] == "backbone=resnet18"
    assert records[5]["paper_top1"] == records[5]["paper_params"] == ""
    assert [r["above_chance"] for r in records[:3]] == ["true"] * 3 and records[4]["above_chance"] == ""


@pytest.mark.slow
def test_report_params_and_madds_are_the_papers_models(tmp_path: Path) -> None:
    """Whatever trained them (here: nothing yet), every row of Tables 4–9 and 11 reports its model at the
    paper's settings: Params within 1% of the paper's, MAdds within 8% (Table 9 prints none: its ReID model)."""
    build_reports(tmp_path / "no-results", tmp_path / "reports")
    for name in ("table4", "table5", "table6", "table7", "table8", "table9", "table11"):
        for record in read_csv(tmp_path / "reports" / f"{name}.csv"):
            params, madds = int(record["params"]), int(record["madds"])
            if name == "table9":
                assert 24e6 < params < 26e6 and madds > 5e9, record  # ResNet50 at 256×256, 751 identities
                continue
            assert abs(params / float(record["paper_params"]) - 1) <= 0.01, (name, record["row"], params)
            assert abs(madds / float(record["paper_madds"]) - 1) <= 0.08, (name, record["row"], madds)


def test_rows_not_above_chance_are_flagged(tmp_path: Path) -> None:
    """52.5% over 2 × 100 images is far above 10% chance; 12% over 2 × 100 is not, and says so."""
    data = json.loads((FIXTURES / "table4.json").read_text())
    for seed_run in data["rows"][1]["runs"]:
        seed_run["best_top1"] = 12.0
    (tmp_path / "table4.json").write_text(json.dumps(data))
    build_reports(tmp_path, tmp_path / "reports")
    text = (tmp_path / "reports" / "table4.md").read_text()
    assert "Top-1 (%) not above chance (10.00%): nothing can be read into this row's accuracy (paper row 2)" in text
    assert [r["above_chance"] for r in read_csv(tmp_path / "reports" / "table4.csv")][:2] == ["true", "false"]


@pytest.mark.parametrize("dropout,edited", [(0.2, True), (0.1, False)])
def test_a_row_edited_in_params_is_labelled_with_its_setting_and_not_compared(
        tmp_path: Path, dropout: float, edited: bool) -> None:
    """Table 7's average-pooling row given a dropout in params.yaml: 0.2 is another model than the paper's row
    and says so; 0.1 is ResNet18's own NOAH dropout (backbones.csv), so that row is still the paper's."""
    from pipeline.study.results import row_result
    from pipeline.study.rows import table_rows

    data = yaml.safe_load(PARAMS.read_text())
    data["tables"]["table7"]["rows"]["avg"]["head"]["dropout"] = dropout
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    rows = [row_result(rt, {}, f"sqlite:///{tmp_path / 'mlflow.db'}", {})
            for rt in table_rows(load_params(tmp_path / "params.yaml"), "table7")]
    for i, row in enumerate(rows):
        row["runs"] = [{"seed": 0, "status": "FINISHED", "best_top1": 40.0 + i, "top1": 40.0 + i, "top5": 90.0}]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table7.json").write_text(json.dumps({"meta": {"profile": "smoke"}, "rows": rows}))
    build_reports(tmp_path / "results", tmp_path / "reports")
    avg = body(tmp_path / "reports" / "table7.md")[3]
    record = read_csv(tmp_path / "reports" / "table7.csv")[3]
    if edited:
        assert avg[0].startswith("+ NOAH [dropout=0.2]") and avg[1] == "Average pooling"
        assert avg[8].startswith("—") and avg[4].startswith("—")  # no paper Top-1, no paper Params
        assert record["edited"] == "dropout=0.2" and record["paper_top1"] == "" and record["top1"] == "43"
    else:
        assert avg[0].startswith("+ NOAH") and "[" not in avg[0] and avg[8] == "71.12 (↑0.87)"
        assert record["edited"] == "" and record["paper_top1"] == "71.12"


def test_the_tables_of_the_study_stage_have_their_results_in_its_out_folder(tmp_path: Path) -> None:
    """The study writes a table of `study.tables` into results/study/ (the stage's out), any other into results/
    (Tables 1-3 and the proxy, trained by name outside `dvc repro`); the report reads results/study/ first."""
    params = load_params()
    assert [results_dir(params, t) for t in ("table4", "table11", "table1", "proxy")] == \
        [RESULTS / "study", RESULTS / "study", RESULTS, RESULTS]
    (tmp_path / "study").mkdir()
    (tmp_path / "table7.json").write_text("{}")
    assert results_file(tmp_path, "table7") == tmp_path / "table7.json"
    (tmp_path / "study" / "table7.json").write_text("{}")
    assert results_file(tmp_path, "table7") == tmp_path / "study" / "table7.json"
    assert results_file(tmp_path, "table1") == tmp_path / "table1.json"


@pytest.mark.slow
def test_missing_and_unreadable_results_files_keep_every_row(built: Path) -> None:
    for name, why in (("table7", "table7.json not produced yet (the `study` stage has not written it)"),
                      ("table6", "table6.json could not be read (JSONDecodeError")):
        text = (built / f"{name}.md").read_text()
        assert why in text.split("\n")[2]  # the scale line says why there is no scale
        rows = body(built / f"{name}.md")
        assert all(cell == "—¹" for r in rows for cell in (r[7], r[9], r[11])), name  # trained columns
        assert all(r[2] == "0" and r[3].endswith("M") for r in rows), name  # no seed; Params need no training
        assert f"1. {why}" in text
        assert {r["status"] for r in read_csv(built / f"{name}.csv")} == {"MISSING"}
    assert "Activation" in md_tables((built / "table6.md").read_text())[0][0]
    assert "`benchmark` stage has not written it" not in (built / "table10.md").read_text()


@pytest.mark.slow
def test_table9_and_table10_layouts(built: Path) -> None:
    rows = body(built / "table9.md")  # each row trains twice: from scratch and fine-tuned, each with a status
    assert [r[0] for r in rows] == ["ResNet50-FC", "+ NOAH¹²"]  # NOAH's reid reading and its dropout: guesses
    assert rows[0][1:4] == ["1", "24.94M", "—"]  # the ReID model at 751 identities, 256×256; no paper figure
    assert rows[0][6:10] == ["40.0", "91.5", "20.0", "78.2"]
    # one seed: no interval, so the differences are shown unmarked (the paper's are as printed)
    assert rows[1][6:10] == ["41.5 (+1.5)", "**93.5 (↑2.0)**", "19.0 (−1.0)", "**81.8 (↑3.6)**"]
    assert rows[0][10] == "45.0" and rows[1][10] == rows[1][12] == "—³"
    assert "With one seed no interval exists" in (built / "table9.md").read_text()
    assert "3. finetune trial FAILED: loss became NaN at epoch 1 (paper row 2)" in (built / "table9.md").read_text()
    records = read_csv(built / "table9.csv")
    assert [r["status"] for r in records] == ["FINISHED", "FAILED"]
    assert records[1]["scratch_top1"] == "41.5" and records[1]["finetune_top1"] == ""
    assert records[1]["run_id"] == "reid-2s;reid-2f" and records[1]["n"] == "0"
    text = (built / "table10.md").read_text()
    rows = body(built / "table10.md")
    assert [r[0] for r in rows if r[0].startswith("*")] == ["*CNNs*", "*ViTs*", "*MLPs*"]
    r18 = next(r for r in rows if r[0] == "ResNet18")
    assert r18[1:3] == ["11.69M", "11.69M"] and r18[5] == "10.50"
    assert r18[3].startswith("—")  # no GPU figure recorded
    # the lowest overhead is bold only because its interval lies wholly below the next lowest's (7.00)
    assert r18[-2] == "**4.76 [4.00, 5.50]**"
    r152 = next(r for r in rows if r[0] == "ResNet152")
    assert re.fullmatch(r"12\.00 \[6\.00, 18\.00\][⁰¹²³⁴⁵⁶⁷⁸⁹]+", r152[-2]), r152[-2]
    assert ("CPU overhead: the 95% interval after 5 timed rounds is not narrower than the paper's overhead "
            "(2.79%), so it cannot confirm or refute it (paper row 1)") in text
    assert "no result for this row in table10.json (paper rows 2, 3, 5," in text
    records = {r["key"]: r for r in read_csv(built / "table10.csv")}
    assert records["resnet18"]["row"] == "4" and records["resnet18"]["cpu_overhead_pct"] == "4.76"
    assert records["resnet18"]["paper_gpu_overhead_pct"] == "11.53" and records["resnet18"]["gpu_overhead_pct"] == ""
    assert (records["resnet18"]["cpu_overhead_low"], records["resnet18"]["cpu_resolved"]) == ("4", "1")
    assert (records["resnet152"]["cpu_rounds"], records["resnet152"]["cpu_resolved"]) == ("5", "0")


@pytest.mark.slow
def test_dvc_metrics_and_plot_data_are_keyed_by_row_name(built: Path) -> None:
    """What `dvc metrics show` and `dvc plots show` read: per row name the values the report shows (with n and std:
    Table 4 has two seeds), Table 9's four metrics, Table 10's overheads per backbone; top-1 beside the paper's,
    none for a row that ran with other settings; no file for a table without results or with unreadable ones."""
    metrics = {p.stem: json.loads(p.read_text())[p.stem] for p in (built / "metrics").glob("*.json")}
    assert set(metrics) == {"table4", "table9", "table10"}
    records = {r["name"]: r for r in read_csv(built / "table4.csv") if r["name"]}
    assert list(metrics["table4"]) == list(records) == ["baseline", "r1_2", "r1_4", "r1_8", "n2", "n4", "n8"]
    for name, values in metrics["table4"].items():
        for key in ("top1", "top5", "top1_std", "top5_std", "n"):
            assert (values.get(key) is None) == (records[name][key] == ""), (name, key)
            if key in values:
                assert values[key] == pytest.approx(float(records[name][key]), abs=1e-4), (name, key)
    assert metrics["table4"]["r1_4"] == {"top1": 50.9, "top5": 80.0, "n": 1}  # one finished seed: no std
    assert metrics["table9"] == {"baseline": {"scratch_top1": 40.0, "scratch_map": 20.0, "finetune_top1": 45.0,
                                              "finetune_map": 25.0},
                                 "noah": {"scratch_top1": 41.5, "scratch_map": 19.0}}  # fine-tuning FAILED
    assert metrics["table10"]["resnet18"] == {"cpu_overhead_pct": 4.76}
    bars = {r["row"]: float(r["top1"]) for r in read_csv(built / "plots" / "top1" / "table4.csv")}
    assert bars["r1_2 (ours)"] == 51.31 and bars["r1_2 (paper)"] == 76.84
    assert "n2 (ours)" in bars and "n2 (paper)" not in bars  # edited in params.yaml: not the paper's row
    assert [p.name for p in (built / "plots").rglob("*.csv")] == ["table4.csv"]  # no MLflow store: no curves


@pytest.mark.slow
def test_each_report_opens_with_its_scale(built: Path) -> None:
    lines = (built / "table4.md").read_text().splitlines()
    assert lines[0].startswith("# Table 4")
    scale = lines[2]
    for part in ("dataset `builtin`", "num_classes `10`", "img_size `32`", "width `1.0`", "epochs `2`",
                 "profile `smoke`", "commit `0123abc`", "date `2026-11-24 21:00 UTC`"):
        assert part in scale
    assert lines[3] == ">" and "not from ImageNet" in lines[4]
    timing = (built / "table10.md").read_text().splitlines()
    assert "img_size `224` · cpu `x86_64` · commit `0123abc`" in timing[2] and "profile" not in timing[2]
    assert "Not recorded" not in "\n".join(timing[3:6]) and "not on the paper's hardware" in timing[4]
    index = (built / "README.md").read_text()
    for name in TABLES:
        assert f"[{name}.md]({name}.md)" in index and f"[{name}.csv]({name}.csv)" in index
    assert "| Table 4 |" in index and "| 5 | 1 | 2 |" in index and "| 1 | 1 | 0 |" in index  # Tables 4, 9
    assert index.count("Not drawn:") == 2  # no tracking URI anywhere: the figures say so instead


@pytest.mark.slow
def test_markdown_parses_as_pipe_tables_with_consistent_widths(built: Path) -> None:
    for name in TABLES:
        table, *comparison = md_tables((built / f"{name}.md").read_text())
        assert all(len({len(r) for r in t}) == 1 for t in (table, *comparison)), name
        metrics = TABLES[name].metrics
        assert len(table[0]) == 1 + len(TABLES[name].settings) + TABLES[name].seeded + len(metrics) + \
            sum(bool(m.paper) for m in metrics)
    (index,) = md_tables((built / "README.md").read_text())
    assert len(index) == 1 + len(TABLES)


@pytest.mark.slow
def test_cli_writes_reports_and_figures_from_real_mlflow_runs(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("table6", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = {}
    for head, gain in (("baseline", 0.0), ("noah", 5.0)):
        run_ = client.create_run(exp, run_name=head)
        for epoch in range(3):
            client.log_metric(run_.info.run_id, "val_top1", 30 + 10 * epoch + gain, step=epoch)
            client.log_metric(run_.info.run_id, "train_loss", 1.4 - 0.3 * epoch - gain / 50, step=epoch)
        client.log_metric(run_.info.run_id, "top1", 50 + gain)
        client.set_terminated(run_.info.run_id)
        ids[head] = run_.info.run_id
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"row": 1, "backbone": "resnet18", "runs": [{"seed": 0, "status": "FINISHED", "run_id": ids["baseline"],
                                                         "top1": 50.0, "top5": 90.0}]},
            {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5},
             "runs": [{"seed": 0, "status": "FINISHED", "run_id": ids["noah"], "top1": 55.0, "top5": 91.0}]}]
    meta = {"profile": "smoke", "dataset": "builtin", "num_classes": 4, "img_size": 32, "epochs": 3}
    (results / "table6.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    parser = parser_of("report")
    assert run(parser.parse_args(["--results", str(results), "--out", str(tmp_path / "reports"),
                                  "--tracking-uri", uri])) == 0
    png = tmp_path / "reports" / "figures" / "curves.png"
    assert png.read_bytes()[:8] == PNG
    index = (tmp_path / "reports" / "README.md").read_text()
    assert "![Validation top-1 (solid) and training loss (dashed)" in index and "(figures/curves.png)" in index
    assert f"run {ids['noah']} logged no weights" in index
    assert len(list((tmp_path / "reports").glob("*.md"))) == len(TABLES) + 1  # and the index, README.md
    # a run id the store does not hold is a note, not a crash
    rows[0]["runs"][0]["run_id"] = "0" * 32
    (results / "table6.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    fig = curves({"table6": _lines(results)}, uri, tmp_path / "again.png")
    assert fig.path is None and "ResNet18 (Table 6)" in fig.note
    # weights that cannot be used are a note too
    torch.save({"stem.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    client.log_artifact(ids["noah"], str(tmp_path / "weights.pt"), "weights")
    fig = trained_attention({"table6": _lines(results)}, meta, uri, tmp_path, tmp_path / "maps.png")
    assert fig.path is None and f"prepared validation data not found at {tmp_path}" in fig.note
    # a store that does not exist is reported, never created
    absent = tmp_path / "absent.db"
    fig = curves({"table6": _lines(results)}, f"sqlite:///{absent}", tmp_path / "again.png")
    assert fig.path is None and "does not exist" in fig.note and not absent.exists()


def _lines(results: Path):
    from pipeline.report.render import build_lines, load_results

    return build_lines(TABLES["table6"], load_results(results / "table6.json", TABLES["table6"]))


class TinyNet(torch.nn.Module):
    """A real conv stem feeding the real NoahHead: what `head_maps` hooks into."""

    def __init__(self) -> None:
        super().__init__()
        from pipeline.config import HeadConfig
        from pipeline.models.noah import NoahHead

        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.head = NoahHead(HeadConfig(N=2, r=0.5), 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def test_attention_maps_are_the_heads_own_and_are_drawn(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, images, labels = TinyNet(), torch.randn(2, 3, 16, 16), torch.tensor([2, 0])
    attn, value, poca, (h, w) = head_maps(model, images, labels)
    assert (h, w) == (4, 4) and attn.shape == value.shape == (2, 2, 4, 4) and poca.shape == (2, 4, 4)
    torch.testing.assert_close(attn.sum((-1, -2)), torch.ones(2, 2))  # spatial softmax per block
    torch.testing.assert_close(poca, (attn * value).sum(1))
    logits = model(images)
    torch.testing.assert_close(poca.sum((-1, -2)), logits[torch.arange(2), labels])
    fig = attention_figure(model, images, labels, [0.5] * 3, [0.25] * 3, tmp_path / "maps.png", "maps")
    assert fig.path.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_attention_figure_from_the_checkpoint_of_a_trained_run(tmp_path: Path) -> None:
    """End to end: the trainer trains one epoch (weights kept in its checkpoint, not logged, as by default);
    the report finds them, rebuilds the model from the run's logged config and draws the maps."""
    from mlflow import MlflowClient
    from PIL import Image

    from pipeline.__main__ import main
    from pipeline.config import MlflowConfig, TrainConfig
    from pipeline.training.run import run_trial
    from pipeline.training.trial import resolve_trial

    src = tmp_path / "src"
    for split in ("train", "val"):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
            (src / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), tuple(v + 10 * i for v in colour)).save(src / split / f"c{c}" / f"{i}.png")
    data = tmp_path / "data"
    assert main(["prepare", "--source", "imagefolder", "--root", str(src), "--out", str(data)]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = {"name": "tiny", "lr": 0.01, "batch_size": 2, "epochs": 1}
    trial = resolve_trial({"backbone": "resnet18", "data_dir": str(data), "head": {"kind": "noah"}, "recipe": recipe,
                           "img_size": 32}, {})
    result = run_trial(trial, train=TrainConfig(checkpoint_root=str(tmp_path / "ckpt"), progress="off"),
                       tracking=MlflowConfig(tracking_uri=uri), experiment="table7")
    client = MlflowClient(uri)
    baseline = client.create_run(client.get_experiment_by_name("table7").experiment_id).info.run_id
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"row": 1, "backbone": "resnet18", "runs": [{"seed": 0, "status": "FINISHED", "run_id": baseline,
                                                         "top1": 50.0}]},
            {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5},
             "runs": [{"seed": 0, "status": "FINISHED", "run_id": result["run_id"], "trial_id": result["trial_id"],
                       "top1": result["top1"]}]}]
    (results / "table7.json").write_text(json.dumps({"meta": {"profile": "smoke"}, "rows": rows}))
    build_reports(results, tmp_path / "reports", uri)
    assert "its trainer checkpoint is not in None" in (tmp_path / "reports" / "README.md").read_text()
    build_reports(results, tmp_path / "reports", uri, checkpoints=tmp_path / "ckpt")
    assert (tmp_path / "reports" / "figures" / "attention.png").read_bytes()[:8] == PNG
    index = (tmp_path / "reports" / "README.md").read_text()
    assert "(figures/attention.png)" in index and f"run {result['run_id'][:8]}" in index


def _finished(seed_top1: tuple[float, float]) -> list[dict]:
    return [{"seed": s, "status": "FINISHED", "best_top1": t, "top1": t, "top5": 90.0, "run_id": f"r{s}{t}"}
            for s, t in enumerate(seed_top1)]


@pytest.fixture
def another_backbone(monkeypatch: pytest.MonkeyPatch) -> str:
    """A 27th registered backbone the paper does not print (ResNet34, built like the ResNets)."""
    from pipeline.models import backbones as registry

    info = dataclasses.replace(registry.backbone_info("resnet18"), key="resnet34", name="ResNet34",
                               dropout_source="guess")
    monkeypatch.setitem(registry._INFO, "resnet34", info)
    monkeypatch.setitem(registry._REGISTRY, "resnet34", registry._REGISTRY["resnet18"])
    return "resnet34"


def test_a_result_without_a_paper_row_is_shown_with_empty_paper_columns(tmp_path: Path, another_backbone: str):
    """Table 1 results for a registered backbone the paper does not print (rows 21-22) and Table 4's results with
    a row params.yaml adds (row 9): each follows the paper's rows, labelled, its measured values and its delta to
    its own baseline shown, its paper columns empty, with a note and never an edit or a comparison."""
    printed = len(paper_rows(TABLES["table1"]))
    rows = [{"row": 1, "name": "resnet18_baseline", "backbone": "resnet18", "head": {"kind": "baseline"},
             "runs": _finished((40.0, 41.0))},
            {"row": printed + 1, "name": "resnet34_baseline", "backbone": another_backbone,
             "head": {"kind": "baseline"}, "runs": _finished((42.0, 43.0))},
            {"row": printed + 2, "name": "resnet34_noah", "backbone": another_backbone,
             "head": {"kind": "noah", "N": 8, "r": 0.25}, "runs": _finished((45.0, 46.5))}]
    table4 = json.loads((FIXTURES / "table4.json").read_text())
    table4["rows"].append({**table4["rows"][1], "row": 9, "name": "n2_r1_4",
                           "head": {"kind": "noah", "N": 2, "r": 0.25}})
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table1.json").write_text(json.dumps({"meta": {"profile": "smoke"}, "rows": rows}))
    (tmp_path / "results" / "table4.json").write_text(json.dumps(table4))
    for name in ("table1", "table4"):
        build_table(TABLES[name], tmp_path / "results", tmp_path / "reports")
    text = (tmp_path / "reports" / "table1.md").read_text()
    md, records = body(tmp_path / "reports" / "table1.md"), read_csv(tmp_path / "reports" / "table1.csv")
    assert len(md) == len(records) == printed + 2  # every paper row, then the two
    assert [r["row"] for r in records] == [str(n) for n in range(1, printed + 3)]
    base, noah = md[-2:]
    assert base[0].startswith("ResNet34") and noah[0].startswith("+ NOAH") and "[" not in noah[0]
    assert all(cell == "—" for cell in noah[3:10:2])  # Params, MAdds, Top-1, Top-5 paper columns: empty
    assert noah[6].startswith("**45.75") and "↑3.25" in noah[6]  # measured, against its own baseline
    assert "the paper prints no such row: nothing here is compared with the paper" in text
    assert "other settings than the paper's row" not in text
    extra = records[-1]
    assert (extra["key"], extra["backbone"], extra["head"], extra["network"]) == (another_backbone,) * 2 + (
        "noah", "+ NOAH")
    assert extra["paper_top1"] == extra["paper_params"] == extra["edited"] == "" and extra["top1"] == "45.75"
    assert int(extra["params"]) > 0  # counted at the paper's settings like every row
    table4_md, table4_csv = body(tmp_path / "reports" / "table4.md"), read_csv(tmp_path / "reports" / "table4.csv")
    assert len(table4_md) == len(paper_rows(TABLES["table4"])) + 1
    assert table4_md[-1][0].startswith("+ NOAH") and table4_csv[-1]["row"] == "9"
    assert table4_csv[-1]["paper_top1"] == table4_csv[-1]["edited"] == "" and table4_csv[-1]["top1"] != ""


def test_table10_times_a_backbone_the_paper_does_not_within_its_family(tmp_path: Path, another_backbone: str):
    """A benchmark row of an unprinted backbone (no row number, as a hand-made file may give) joins the CNNs."""
    data = json.loads((FIXTURES / "table10.json").read_text())
    data["rows"].append({**data["rows"][0], "key": another_backbone, "cpu_resolved": None})
    data["rows"][-1].pop("row", None)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table10.json").write_text(json.dumps(data))
    _, lines = build_table(TABLES["table10"], tmp_path / "results", tmp_path / "reports")
    printed = len(paper_rows(TABLES["table10"]))
    families = [backbone_info(ln.paper["key"]).family for ln in lines]
    assert len(lines) == printed + 1 and families == sorted(families, key=["cnn", "vit", "mlp"].index)
    cnns = families.count("cnn")
    assert lines[cnns - 1].paper["key"] == another_backbone and not lines[cnns - 1].printed
    record = read_csv(tmp_path / "reports" / "table10.csv")[cnns - 1]
    assert record["network"] == "ResNet34" and record["paper_cpu_overhead_pct"] == ""
    assert record["row"] == str(printed + 1) and record["cpu_overhead_pct"] != ""
