"""The HTML report, its SVG figures and the Markdown summary, on hand-made results."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from splitfed.bench.report import ReportPaths, write_report
from splitfed.bench.scores import defense_label
from splitfed.bench.store import ResultStore, spec_key
from splitfed.bench.svg import BarChart, Chart, escape, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<script>alert(1)</script>"

# defense, strength, MP, {attack: AP}, seconds, bytes per direction, data-party FLOPs
_RUNS = [
    ("none", {}, 0.90, {"vmi": 0.95, "bli": 1.0}, 10.0, 1e6, 2e9),
    ("activation_dp", {"epsilon": 1}, 0.70, {"vmi": 0.10, "bli": 0.6}, 12.0, 1e6, 2.2e9),
    ("activation_dp", {"epsilon": 8}, 0.88, {"vmi": 0.40, "bli": 0.9}, 12.0, 1e6, 2.2e9),
    ("mid", {"bottleneck": 64}, 0.60, {"vmi": 0.50, "bli": 0.95}, 15.0, 5e5, 3e9),  # beaten by epsilon=1
]


def _reconstructed(defense: str, head: int) -> list[dict[str, str]]:
    """Four example reconstructions of vmi (the store keeps three), one longer than it keeps, with markup."""
    return [
        {
            "original": f"<i>secret</i> | text {k}" + " long" * 60 * (k == 0),
            "reconstructed": f"{defense}@{head} <b>guess</b> {k}",
        }
        for k in range(4)
    ]


def _store(tmp_path: Path, *, splits: tuple[int, ...] = (1, 2), runs: list | None = None) -> Path:
    """Two split points × four defenses × two attacks (one with a linear baseline and example
    reconstructions), and a failed run."""
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        base = {
            "model": "m",
            "task": "classification",
            "setting": "ht",
            "tail_layers": 0,
            "mode": "splitlora",
        }
        for head in splits:
            for defense, strength, mp, aps, seconds, nbytes, flops in runs or _RUNS:
                spec = base | {"head_layers": head, "seed": 0, "defense": defense, "strength": strength}
                key = spec_key(spec)
                store.put_run(
                    key,
                    sweep="s",
                    spec=spec,
                    status="done",
                    mp=mp - 0.02 * (head - 1),
                    mp_metric="accuracy",
                    seconds=seconds,
                    bytes_to_model=nbytes,
                    bytes_to_data=nbytes,
                    data_party_flops=flops * head,
                )
                for attack, ap in aps.items():
                    inversion = attack == "vmi"
                    store.put_attack(
                        key,
                        attack,
                        attack=attack,
                        spec={"name": attack, "type": "inversion" if inversion else "label inference"},
                        status="done",
                        ap=ap,
                        ap_metric="token_f1" if inversion else "label_accuracy",
                        baseline={"token_f1": 0.3} if inversion else {},
                        chance=0.05 if inversion else 0.5,
                        examples=_reconstructed(defense, head) if inversion else None,
                    )
        failed = base | {"head_layers": 1, "seed": 0, "defense": "sanitizer", "strength": {"k": 2}}
        store.put_run(spec_key(failed), sweep="s", spec=failed, status="failed", error="CUDA out of memory")
    return path


def _svg(paths: ReportPaths, name: str) -> ET.Element:
    return ET.parse(paths.out_dir / "figures" / name).getroot()


def _translate(element: ET.Element) -> tuple[float, float]:
    x, y = re.fullmatch(r"translate\(([-\d.]+),([-\d.]+)\)", element.get("transform", "")).groups()  # type: ignore[union-attr]
    return float(x), float(y)


def _points(root: ET.Element) -> dict[str, tuple[float, float]]:
    """The drawn points of a chart, by their label."""
    out = {}
    for g in root.iter(f"{SVG}g"):
        if "point" in g.get("class", "").split():
            label = g.find(f"{SVG}text[@class='point-label']")
            assert label is not None
            out[label.text or ""] = _translate(g)
    return out


class _Tables(HTMLParser):
    """Body rows of each table of a page, by the table's class."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, int] = {}
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("class") or ""
            self.rows.setdefault(self._table, 0)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.rows[self._table] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None


def _table_rows(page: str) -> dict[str, int]:
    parser = _Tables()
    parser.feed(page)
    return parser.rows


def test_every_figure_is_valid_svg_with_a_labelled_point_per_defense_strength(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report")
    names = sorted(p.name for p in paths.figures)
    assert names == [
        "cost.svg",
        "mp_ap_bli.svg",
        "mp_ap_vmi.svg",
        "split_ap_bli.svg",
        "split_ap_vmi.svg",
        "split_mp.svg",
    ]
    for figure in paths.figures:
        assert ET.parse(figure).getroot().tag == f"{SVG}svg"
    vmi = _svg(paths, "mp_ap_vmi.svg")
    labels = {defense_label({"defense": d, "strength": s}) for d, s, *_ in _RUNS}
    assert set(_points(vmi)) == labels  # one point per defense × strength (means over the two split points)
    undefended = [g for g in vmi.iter(f"{SVG}g") if "undefended" in g.get("class", "").split()]
    assert len(undefended) == 1
    references = {
        line.get("data-name", "") for line in vmi.iter(f"{SVG}line") if line.get("class") == "reference"
    }
    assert any(r.startswith("linear baseline, undefended (0.300)") for r in references)
    assert any(r.startswith("chance (0.050)") for r in references)
    bli = _svg(paths, "mp_ap_bli.svg")  # label inference has no linear baseline
    assert not any("linear baseline" in (line.get("data-name") or "") for line in bli.iter(f"{SVG}line"))


def test_the_pareto_line_passes_through_the_frontier_points_only(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report")
    root = _svg(paths, "mp_ap_vmi.svg")
    points = _points(root)
    (frontier,) = [p for p in root.iter(f"{SVG}polyline") if p.get("data-name") == "Pareto frontier"]
    vertices = [tuple(float(v) for v in pair.split(",")) for pair in (frontier.get("points") or "").split()]
    expected = ["activation_dp(epsilon=1)", "activation_dp(epsilon=8)", "none"]  # by MP; mid is beaten
    assert vertices == [points[label] for label in expected]
    assert points["mid(bottleneck=64)"] not in vertices


def test_split_point_figures_draw_a_line_per_defense_strength(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report")
    for name in ("split_mp.svg", "split_ap_vmi.svg", "split_ap_bli.svg"):
        lines = list(_svg(paths, name).iter(f"{SVG}polyline"))
        assert len(lines) == len(_RUNS)
        assert all(len((line.get("points") or "").split()) == 2 for line in lines)  # two split points each
    ticks = [t.text for t in _svg(paths, "split_mp.svg").iter(f"{SVG}text") if t.get("class") == "tick"]
    assert "1" in ticks and "2" in ticks


def test_a_single_split_point_draws_no_split_figure(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path, splits=(1,)), tmp_path / "report")
    assert not [p for p in paths.figures if p.name.startswith("split_")]
    assert "split-points" not in paths.index.read_text()


def test_cost_bars_are_normalized_to_the_undefended_run(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report")
    root = _svg(paths, "cost.svg")
    bars = [b for b in root.iter(f"{SVG}rect") if b.get("class") == "bar"]
    assert len(bars) == 3 * len(_RUNS)  # wall time, bytes, FLOPs for each defense × strength
    (one,) = [line for line in root.iter(f"{SVG}line") if line.get("class") == "reference"]
    for bar in bars:
        if bar.get("data-category") == "none":  # the undefended bars reach exactly 1
            assert bar.get("y") == one.get("y1")
    mid_time = next(
        b
        for b in bars
        if b.get("data-category") == "mid(bottleneck=64)" and b.get("data-series") == "wall time"
    )
    assert "1.5" in (mid_time.findtext(f"{SVG}title") or "")
    assert "undefended = 1" in paths.index.read_text()


def test_tables_are_filled_and_every_figure_is_on_the_page(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report", max_mp_drop=0.05)
    page = paths.index.read_text()
    rows = _table_rows(page)
    assert rows["ranking"] == len(_RUNS)
    assert rows["attack"] == 2 * 2 * len(_RUNS)  # two attacks: each defense × strength at two split points
    assert rows["recommendations"] == 2 and rows["costs"] == len(_RUNS)
    assert rows["failed"] == 1 and "CUDA out of memory" in page
    assert rows["versions"] >= 1
    for figure in paths.figures:
        assert f'src="figures/{figure.name}"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "AP*</b> = 0" in page and "β = 0.5" in page and "either-side penalty" in page


def test_recommendations_respect_the_bound(tmp_path: Path) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report", max_mp_drop=0.0)
    summary = paths.summary.read_text()
    assert "- **vmi**: none within the bound" in summary
    paths = write_report(_store(tmp_path), tmp_path / "report", max_mp_drop=0.05)
    assert "- **vmi**: activation_dp(epsilon=8)" in paths.summary.read_text()


def test_the_summary_has_the_ranking_table_and_the_failed_runs(tmp_path: Path) -> None:
    summary = write_report(_store(tmp_path), tmp_path / "report").summary.read_text()
    lines = summary.splitlines()
    header = lines.index(
        "| defense (strength) | T-DCS inversion | T-DCS label inference | C-DCS | MP | MP drop | n |"
    )
    assert lines[header + 1] == "|---|---|---|---|---|---|---|"
    assert lines[header + 2].startswith("| activation_dp(epsilon=1) |")  # best C-DCS first
    assert sum(1 for line in lines[header + 2 :] if line.startswith("| ") and line.count("|") == 8) >= len(
        _RUNS
    )
    assert "## Failed runs" in summary and "CUDA out of memory" in summary


def test_a_hostile_defense_name_is_escaped_everywhere(tmp_path: Path) -> None:
    runs = [*_RUNS[:2], (EVIL, {"p": "<b>"}, 0.8, {"vmi": 0.2, "bli": 0.7}, 11.0, 1e6, 2e9)]
    paths = write_report(_store(tmp_path, runs=runs), tmp_path / "report", title="a <b>bold</b> title")
    page = paths.index.read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in page and "<script>" in page  # only the page's own load-check script
    assert page.count("<script>") == 1
    for figure in paths.figures:
        text = figure.read_text()
        assert EVIL not in text
        ET.fromstring(text)  # still valid XML
    assert EVIL not in paths.summary.read_text()


def test_an_empty_store_is_a_clear_message_not_a_crash(tmp_path: Path) -> None:
    ResultStore(tmp_path / "empty.sqlite").close()
    paths = write_report(tmp_path / "empty.sqlite", tmp_path / "report")
    assert paths.figures == ()
    page = paths.index.read_text()
    assert "The store holds no runs yet" in page and 'class="empty"' in page
    assert "holds no runs yet" in paths.summary.read_text()


def test_runs_without_an_undefended_run_are_listed_as_such(tmp_path: Path) -> None:
    path = _store(tmp_path, splits=(1,))
    with ResultStore(path) as store:  # seed 1: defended runs only
        for eps in (1, 8):
            spec = {
                "model": "m",
                "task": "classification",
                "setting": "ht",
                "head_layers": 1,
                "tail_layers": 0,
                "mode": "splitlora",
                "seed": 1,
                "defense": "activation_dp",
                "strength": {"epsilon": eps},
            }
            store.put_run(spec_key(spec), sweep="s", spec=spec, status="done", mp=0.8)
    paths = write_report(path, tmp_path / "report")
    rows = _table_rows(paths.index.read_text())
    assert rows["unbaselined"] == 2
    assert "no undefended baseline" in paths.index.read_text()
    assert "## Runs with no undefended baseline" in paths.summary.read_text()

    only_defended = tmp_path / "defended"
    only_defended.mkdir()
    path = _store(only_defended, runs=[r for r in _RUNS if r[0] != "none"])
    page = write_report(path, tmp_path / "report2").index.read_text()
    assert "No setting has a finished undefended run" in page
    assert _table_rows(page)["unbaselined"] == 2 * (len(_RUNS) - 1)


def test_the_report_is_deterministic(tmp_path: Path) -> None:
    path = _store(tmp_path)
    first = write_report(path, tmp_path / "a")
    second = write_report(path, tmp_path / "b")
    for a, b in zip(
        (first.index, first.summary, *first.figures),
        (second.index, second.summary, *second.figures),
        strict=True,
    ):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_missing_store_or_bad_parameters_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results store"):
        write_report(tmp_path / "nothing.sqlite", tmp_path / "report")
    path = _store(tmp_path)
    with pytest.raises(ValueError, match="beta"):
        write_report(path, tmp_path / "report", beta=2.0)
    with pytest.raises(ValueError, match="max_mp_drop"):
        write_report(path, tmp_path / "report", max_mp_drop=-1)


def test_svg_ticks_escaping_and_series_checks() -> None:
    assert nice_ticks(0.1, 0.95) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0, 7) == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert escape('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"
    chart = Chart(title="t", x_label="x", y_label="y")
    with pytest.raises(ValueError, match="2 labels for 1 points"):
        chart.scatter([(0.0, 1.0)], name="s", color="#000", labels=["a", "b"])
    with pytest.raises(ValueError, match="unknown marker"):
        chart.scatter([(0.0, 1.0)], name="s", color="#000", marker="blob")
    bars = BarChart(title="b", categories=["a", "b"], y_label="y")
    with pytest.raises(ValueError, match="1 values for 2 categories"):
        bars.bars([1.0], name="s", color="#000")
    bars.bars([1.0, None], name="s", color="#000")
    assert len([r for r in ET.fromstring(bars.render()).iter(f"{SVG}rect") if r.get("class") == "bar"]) == 1


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_the_report_renders_in_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no chromium, chromium-browser or google-chrome on PATH (scripts/ensure_chromium.sh installs it)"
        )
    paths = write_report(_store(tmp_path), tmp_path / "report")
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            paths.index.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    found = re.search(r'data-figures="(\d+)/(\d+)"', dom)
    assert found, f"the page's load check did not run; DOM starts {dom[:500]!r}"
    loaded, total = int(found.group(1)), int(found.group(2))
    assert total == len(paths.figures) == 6 and loaded == total, f"{loaded}/{total} figures loaded"
    rows = _table_rows(dom)
    assert (
        rows["ranking"] == len(_RUNS) and rows["attack"] == 2 * 2 * len(_RUNS) and rows["costs"] == len(_RUNS)
    )
    assert rows["reconstructions"] == 3 * 3 and "none@1 &lt;b&gt;guess&lt;/b&gt; 0" in dom


def _section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start : page.index("</section>", start)]


def test_reconstructions_of_the_undefended_and_the_extreme_defended_runs_are_shown_escaped(
    tmp_path: Path,
) -> None:
    paths = write_report(_store(tmp_path), tmp_path / "report")
    page = paths.index.read_text()
    assert '<a href="#reconstructions">' in page
    shown = _section(page, "reconstructions")
    assert "<h3>vmi</h3>" in shown and "<h3>bli</h3>" not in shown  # label inference recovers no text
    # The undefended run, the defended run vmi did best against (mid, AP 0.50) and worst against
    # (epsilon=1, AP 0.10), at the first split point where the settings tie; three examples each.
    assert _table_rows(page)["reconstructions"] == 3 * 3
    for label, ap in (
        ("undefended: none (head_layers=1)", "0.950"),
        ("weakest defense (highest AP): mid(bottleneck=64) (head_layers=1)", "0.500"),
        ("strongest defense (lowest AP): activation_dp(epsilon=1) (head_layers=1)", "0.100"),
    ):
        assert f'<td rowspan="3">{label}</td><td rowspan="3">{ap}</td>' in shown
    assert "activation_dp(epsilon=8)" not in shown and "@2" not in shown
    assert "none@1 &lt;b&gt;guess&lt;/b&gt; 2" in shown and "<b>guess</b>" not in page
    assert "&lt;i&gt;secret&lt;/i&gt; | text 1" in shown and "<i>secret" not in page
    assert "guess&lt;/b&gt; 3" not in shown  # the fourth example was not stored
    long = re.search(r"&lt;i&gt;secret&lt;/i&gt; \| text 0[^<]*", shown)
    assert long and long.group(0).endswith("…") and len(html.unescape(long.group(0))) == 200

    summary = paths.summary.read_text()
    md = summary[summary.index("## Reconstruction examples") :]
    assert "### vmi" in md and "### bli" not in md
    assert (
        "| strongest defense (lowest AP): activation_dp(epsilon=1) (head_layers=1) | 0.100 | "
        "&lt;i&gt;secret&lt;/i&gt; \\| text 1 | activation_dp@1 &lt;b&gt;guess&lt;/b&gt; 1 |" in md
    )
    assert "<b>" not in summary


def test_a_store_written_before_examples_were_bounded_still_opens_and_reports(tmp_path: Path) -> None:
    """Rows as an older splitfed wrote them (every example, uncut, or none) read back bounded."""
    import json
    import sqlite3

    path = _store(tmp_path, splits=(1,))
    many = [{"original": "x" * 500, "reconstructed": f"<guess {k}>"} for k in range(10)]
    with sqlite3.connect(path) as db:  # the old writer stored what it was given
        db.execute("UPDATE attacks SET examples = ? WHERE attack = 'vmi'", (json.dumps(many),))
        db.execute(
            "UPDATE attacks SET examples = NULL WHERE attack = 'vmi' AND run_key = ?",
            (
                spec_key(
                    {
                        "model": "m",
                        "task": "classification",
                        "setting": "ht",
                        "tail_layers": 0,
                        "mode": "splitlora",
                        "head_layers": 1,
                        "seed": 0,
                        "defense": "mid",
                        "strength": {"bottleneck": 64},
                    }
                ),
            ),
        )
    with ResultStore(path) as store:
        assert {len(a.examples) for a in store.attacks() if a.attack == "vmi"} == {0, 10}
    page = write_report(path, tmp_path / "report").index.read_text()
    shown = _section(page, "reconstructions")
    assert _table_rows(page)["reconstructions"] == 3 + 1 + 3  # the row without examples says so
    assert "no examples stored" in shown
    assert "&lt;guess 2&gt;" in shown and "&lt;guess 3&gt;" not in shown
    assert "x" * 200 not in shown and "x" * 199 + "…" in shown
