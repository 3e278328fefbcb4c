"""The report of a sweep: a self-contained HTML page with SVG figures, and a Markdown summary.

:func:`write_report` reads a :class:`~splitfed.bench.store.ResultStore` and writes into one folder

* ``index.html``: the DCS ranking, the recommendation per attack, per attack its MP–AP figure
  (Pareto frontier drawn) and table, MP and AP against the split point, the costs of each defense,
  per attack that reconstructs text its example reconstructions (original against reconstructed,
  in the undefended run and in the defended runs where it did worst and best), the runs that
  could not be scored (no undefended baseline, failed), how DCS is computed, and the library
  versions. CSS is inline, figures are SVG files under ``figures/`` referenced by
  ``<img>``; nothing is fetched from elsewhere. A few lines of inline script record, after the
  page has loaded, how many figures loaded (``<body data-figures="loaded/total">``) so that a
  headless browser can check the page;
* ``summary.md``: the ranking, the recommendations, the reconstruction examples and the failed
  runs, for a terminal or a PR;
* ``figures/*.svg``, drawn by :mod:`splitfed.bench.svg`.

Every value from the store is escaped. Output is deterministic: no timestamps, sorted rows.
"""

from __future__ import annotations

import html
import math
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitfed.bench.scores import (
    NO_DEFENSE,
    SETTING_AXES,
    Ranking,
    Score,
    defense_label,
    pareto_front,
    rank,
    recommend,
    scores,
    setting_of,
)
from splitfed.bench.store import (
    MAX_EXAMPLE_CHARS,
    MAX_EXAMPLES,
    AttackRow,
    ResultStore,
    RunRow,
    bounded_examples,
)
from splitfed.bench.svg import BarChart, Chart, color

_DASH = "—"
_NO_BASELINE = "no undefended baseline"


@dataclass(frozen=True)
class ReportPaths:
    """The files :func:`write_report` wrote.

    Attributes
    ----------
    out_dir : Path
        The report's folder.
    index : Path
        ``out_dir/index.html``.
    summary : Path
        ``out_dir/summary.md``.
    figures : tuple of Path
        The SVG figures, under ``out_dir/figures/``.
    """

    out_dir: Path
    index: Path
    summary: Path
    figures: tuple[Path, ...]


class _Html(str):
    """Text that is already HTML (table cells built from escaped parts)."""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: object) -> str:
    return value if isinstance(value, _Html) else _esc(value)


def _num(value: float | None, digits: int = 3) -> str:
    return _DASH if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _si(value: float | None, unit: str) -> str:
    """``value`` with an SI prefix: 1.23 MB, 4.5 GFLOP."""
    if value is None:
        return _DASH
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "attack"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def _strength_key(spec: Mapping[str, Any]) -> tuple[Any, ...]:
    """Undefended first, then by defense name, then by strength (numbers as numbers)."""
    defense = str(spec.get("defense", NO_DEFENSE))
    params = []
    for k, v in sorted((spec.get("strength") or {}).items()):
        number = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.inf
        params.append((k, number, str(v)))
    return (defense != NO_DEFENSE, defense, tuple(params))


def _bytes(run: RunRow) -> float | None:
    parts = [b for b in (run.bytes_to_model, run.bytes_to_data) if b is not None]
    return sum(parts) if parts else None


@dataclass(frozen=True)
class _Figure:
    file: str  # relative to the report folder
    title: str
    caption: str
    svg: str


@dataclass(frozen=True)
class _Point:
    label: str
    defense: str
    mp: float
    ap: float
    dcs: float
    n: int


@dataclass
class _Report:
    """Everything the page and the summary show, computed once from the store."""

    title: str
    store: Path
    beta: float
    max_mp_drop: float
    runs: list[RunRow]
    attacks: list[AttackRow]
    scores: list[Score] = field(default_factory=list)
    ranking: list[Ranking] = field(default_factory=list)
    recommendations: dict[str, Score] = field(default_factory=dict)
    attack_names: list[str] = field(default_factory=list)
    varying: tuple[int, ...] = ()
    label_order: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    figures: list[_Figure] = field(default_factory=list)
    #: Set when the report shows part of the store: what it left out, in words.
    scope: str | None = None

    def __post_init__(self) -> None:
        self.scores = scores(self.runs, self.attacks, beta=self.beta)
        self.ranking = rank(self.scores)
        self.recommendations = recommend(self.scores, max_mp_drop=self.max_mp_drop)
        self.attack_names = sorted({s.attack for s in self.scores})
        settings = {setting_of(r.spec) for r in self.runs}
        self.varying = tuple(i for i in range(len(SETTING_AXES)) if len({s[i] for s in settings}) > 1)
        for run in self.runs:
            self.label_order.setdefault(defense_label(run.spec), _strength_key(run.spec))

    # ---------------------------------------------------------------- lookups
    @property
    def done(self) -> list[RunRow]:
        return [r for r in self.runs if r.status == "done"]

    @property
    def undefended(self) -> dict[tuple[Any, ...], RunRow]:
        """The finished undefended run of each setting."""
        return {
            setting_of(r.spec): r
            for r in self.done
            if r.spec.get("defense", NO_DEFENSE) == NO_DEFENSE and r.mp is not None
        }

    def order(self, labels: Iterable[str]) -> list[str]:
        return sorted(set(labels), key=lambda s: (self.label_order.get(s, (True, s, ())), s))

    def attack_row(self) -> dict[tuple[str, str], AttackRow]:
        return {(a.run_key, a.attack): a for a in self.attacks if a.status == "done"}

    def setting_text(self, setting: tuple[Any, ...], *, full: bool = False) -> str:
        axes = range(len(SETTING_AXES)) if full else self.varying
        parts = [f"{SETTING_AXES[i]}={setting[i]}" for i in axes if setting[i] is not None]
        return ", ".join(parts) or _DASH

    def common_setting(self) -> str:
        if not self.runs:
            return _DASH
        first = setting_of(self.runs[0].spec)
        fixed = [i for i in range(len(SETTING_AXES)) if i not in self.varying and first[i] is not None]
        return ", ".join(f"{SETTING_AXES[i]}={first[i]}" for i in fixed) or _DASH

    def mp_metric(self) -> str:
        metrics = sorted({r.mp_metric for r in self.done if r.mp_metric})
        return ", ".join(metrics) or "task metric"

    def ap_metric(self, attack: str) -> str:
        metrics = sorted({a.ap_metric for a in self.attacks if a.attack == attack and a.ap_metric})
        return ", ".join(metrics) or "attack score"


# -------------------------------------------------------------------- figures
def _baseline_value(row: AttackRow) -> float | None:
    """The simplest baseline's AP on the same crossings (the linear inverter), if stored."""
    if not row.baseline:
        return None
    if row.ap_metric and row.ap_metric in row.baseline:
        return float(row.baseline[row.ap_metric])
    return float(next(iter(row.baseline.values()))) if len(row.baseline) == 1 else None


def _attack_points(report: _Report, attack: str) -> list[_Point]:
    """Per defense × strength, the mean (MP, AP, DCS) over the settings it was scored in."""
    groups: dict[str, list[Score]] = defaultdict(list)
    for s in report.scores:
        if s.attack == attack:
            groups[s.strength].append(s)
    out = []
    for label in report.order(groups):
        items = groups[label]
        out.append(
            _Point(
                label,
                items[0].defense,
                sum(s.mp for s in items) / len(items),
                sum(s.ap for s in items) / len(items),
                sum(s.dcs for s in items) / len(items),
                len(items),
            )
        )
    return out


def _mp_ap_figure(report: _Report, attack: str, slug: str) -> _Figure:
    points = _attack_points(report, attack)
    rows = report.attack_row()
    undefended_rows = [
        rows[(s.run_key, s.attack)]
        for s in report.scores
        if s.attack == attack and s.defense == NO_DEFENSE and (s.run_key, s.attack) in rows
    ]
    baseline = _mean(_baseline_value(r) for r in undefended_rows)
    chance = _mean(r.chance for r in undefended_rows)
    chart = Chart(
        title=f"{attack}: attack vs task performance",
        x_label=f"MP ({report.mp_metric()}), higher is better",
        y_label=f"AP ({report.ap_metric(attack)}), lower is better",
        include_y=[0.0],
    )
    defenses = sorted({p.defense for p in points if p.defense != NO_DEFENSE})
    for i, defense in enumerate(defenses):
        mine = [p for p in points if p.defense == defense]
        chart.scatter(
            [(p.mp, p.ap) for p in mine], name=defense, color=color(i + 1), labels=[p.label for p in mine]
        )
    bare = [p for p in points if p.defense == NO_DEFENSE]
    if bare:
        chart.scatter(
            [(p.mp, p.ap) for p in bare],
            name="undefended",
            color=color(7),
            labels=[p.label for p in bare],
            marker="star",
            css_class="undefended",
        )
    front = pareto_front([(p.mp, p.ap) for p in points])
    chart.line([(points[i].mp, points[i].ap) for i in front], name="Pareto frontier", color="#444444")
    if baseline is not None:
        chart.hline(baseline, name=f"linear baseline, undefended ({baseline:.3f})", color=color(3))
    if chance is not None:
        chart.hline(chance, name=f"chance ({chance:.3f})", color=color(8))
    notes = []
    if baseline is not None:
        notes.append(
            f"the dashed line at {baseline:.3f} is the simplest baseline (a linear inverter fit on the "
            "auxiliary text) against the undefended crossings: an attack under it does not do its job"
        )
    if chance is not None:
        notes.append(f"chance (the best constant guess) is {chance:.3f}")
    many = any(p.n > 1 for p in points)
    caption = (
        f"Every defense × strength against {attack}: x = MP, y = AP"
        + (", each point the mean over the settings it ran in" if many else "")
        + "; the star is the undefended run; the grey line joins the Pareto frontier "
        "(points no other beats on both MP and AP)" + ("; " + "; ".join(notes) if notes else "") + "."
    )
    return _Figure(f"figures/mp_ap_{slug}.svg", f"MP–AP: {attack}", caption, chart.render())


def _split_points(report: _Report) -> list[Any]:
    values = {r.spec.get("head_layers") for r in report.done if r.mp is not None}
    return sorted(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))


def _split_figures(report: _Report, slugs: Mapping[str, str]) -> list[_Figure]:
    """MP, and AP per attack, against the split point (head layers), a line per defense × strength."""
    splits = _split_points(report)
    if len(splits) < 2:
        return []
    runs = [r for r in report.done if r.mp is not None and r.spec.get("head_layers") in splits]
    by_key = {r.key: r for r in runs}
    labels = report.order(defense_label(r.spec) for r in runs)
    colors = {label: color(i) for i, label in enumerate(labels)}

    def chart_of(title: str, y_label: str, values: Iterable[tuple[str, Any, float]]) -> Chart:
        cells: dict[tuple[str, Any], list[float]] = defaultdict(list)
        for label, split, v in values:
            cells[(label, split)].append(v)
        chart = Chart(
            title=title,
            x_label="split point: layers on the data party (head_layers)",
            y_label=y_label,
            x_ticks=splits,
        )
        for label in labels:
            line = [
                (float(s), sum(cells[(label, s)]) / len(cells[(label, s)]))
                for s in splits
                if cells.get((label, s))
            ]
            if line:
                chart.line(line, name=label, color=colors[label], markers=True)
        return chart

    many = "; values are means over the other setting axes" if len(report.varying) > 1 else ""
    out = [
        _Figure(
            "figures/split_mp.svg",
            "MP against the split point",
            f"Main-task performance ({report.mp_metric()}) of each defense × strength at each split point{many}.",
            chart_of(
                "MP against the split point",
                f"MP ({report.mp_metric()})",
                ((defense_label(r.spec), r.spec["head_layers"], float(r.mp)) for r in runs),  # type: ignore[arg-type]
            ).render(),
        )
    ]
    for attack in sorted({a.attack for a in report.attacks if a.status == "done" and a.ap is not None}):
        rows = [a for a in report.attacks if a.attack == attack and a.status == "done" and a.ap is not None]
        values = [
            (defense_label(by_key[a.run_key].spec), by_key[a.run_key].spec["head_layers"], float(a.ap))  # type: ignore[arg-type]
            for a in rows
            if a.run_key in by_key
        ]
        if not values:
            continue
        out.append(
            _Figure(
                f"figures/split_ap_{slugs.get(attack, attack)}.svg",
                f"AP of {attack} against the split point",
                f"Performance of {attack} ({report.ap_metric(attack)}) against each defense × strength at each "
                f"split point{many}.",
                chart_of(
                    f"{attack}: AP against the split point", f"AP ({report.ap_metric(attack)})", values
                ).render(),
            )
        )
    return out


_COSTS: tuple[tuple[str, Callable[[RunRow], float | None]], ...] = (
    ("wall time", lambda r: r.seconds),
    ("bytes crossed", _bytes),
    ("data-party FLOPs", lambda r: r.data_party_flops),
)


def _cost_ratios(report: _Report) -> dict[str, list[float | None]]:
    """Per defense × strength, each cost over that of the undefended run of the same setting (mean)."""
    undefended = report.undefended
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in report.done:
        base = undefended.get(setting_of(run.spec))
        if base is None:
            continue
        for name, get in _COSTS:
            v, b = get(run), get(base)
            if v is not None and b:
                ratios[(defense_label(run.spec), name)].append(v / b)
    labels = report.order(label for label, _ in ratios)
    return {label: [_mean(ratios.get((label, name), [])) for name, _ in _COSTS] for label in labels}


def _cost_figure(report: _Report) -> _Figure | None:
    ratios = _cost_ratios(report)
    if not ratios:
        return None
    labels = list(ratios)
    chart = BarChart(
        title="Cost of each defense, undefended = 1", categories=labels, y_label="cost / undefended cost"
    )
    for k, (name, _) in enumerate(_COSTS):
        values = [ratios[label][k] for label in labels]
        if any(v is not None for v in values):
            chart.bars(values, name=name, color=color(k))
    chart.hline(1.0, name="undefended = 1")
    return _Figure(
        "figures/cost.svg",
        "Costs",
        "Wall time of the run, bytes crossed between the parties (both directions) and FLOPs on the data "
        "party, each divided by that of the undefended run in the same setting (normalized: undefended = 1; "
        "means over settings). The absolute values are in the table below.",
        chart.render(),
    )


# ---------------------------------------------------------------------- tables
def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, css: str) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


def _ranking_rows(report: _Report) -> tuple[list[str], list[list[object]]]:
    types = sorted({t for r in report.ranking for t in r.t_dcs})
    headers = ["defense (strength)", *(f"T-DCS {t}" for t in types), "C-DCS", "MP", "MP drop", "n"]
    rows: list[list[object]] = [
        [
            r.strength,
            *(_num(r.t_dcs.get(t)) for t in types),
            _num(r.c_dcs),
            _num(r.mp),
            _num(r.mp_drop),
            str(r.n),
        ]
        for r in report.ranking
    ]
    return headers, rows


def _recommendation_text(report: _Report, attack: str) -> tuple[str, str]:
    """(the defense, why) recommended against ``attack``, or "none within the bound"."""
    s = report.recommendations.get(attack)
    if s is None:
        return "none within the bound", f"no defense keeps the MP drop within {report.max_mp_drop:g}"
    where = report.setting_text(s.setting)
    detail = (
        f"DCS {s.dcs:.3f}; MP {s.mp:.3f} (drop {s.mp_star - s.mp:.3f} from {s.mp_star:.3f}); "
        f"AP {s.ap:.3f}" + (f" (undefended {s.ap_undefended:.3f})" if s.ap_undefended is not None else "")
    )
    return s.strength, detail + (f"; setting {where}" if where != _DASH else "")


def _attack_rows(report: _Report, attack: str) -> tuple[list[str], list[list[object]]]:
    rows = report.attack_row()
    headers = ["defense (strength)", "MP", "AP", "MP*", "AP undefended", "DCS", "baseline AP", "chance"]
    if report.varying:
        headers.insert(0, "setting")
    mine = [s for s in report.scores if s.attack == attack]
    mine.sort(key=lambda s: (str(s.setting), -s.dcs, s.strength))
    out: list[list[object]] = []
    for s in mine:
        row = rows.get((s.run_key, s.attack))
        cells: list[object] = [
            s.strength,
            _num(s.mp),
            _num(s.ap),
            _num(s.mp_star),
            _num(s.ap_undefended),
            _num(s.dcs),
            _num(_baseline_value(row) if row else None),
            _num(row.chance if row else None),
        ]
        if report.varying:
            cells.insert(0, report.setting_text(s.setting))
        out.append(cells)
    return headers, out


def _unbaselined(report: _Report) -> list[RunRow]:
    """Finished runs whose setting has no finished undefended run (they cannot be scored)."""
    undefended = report.undefended
    return [r for r in report.done if setting_of(r.spec) not in undefended]


def _failed(report: _Report) -> tuple[list[RunRow], list[tuple[AttackRow, RunRow | None]]]:
    by_key = {r.key: r for r in report.runs}
    runs = [r for r in report.runs if r.status != "done"]
    attacks = [(a, by_key.get(a.run_key)) for a in report.attacks if a.status != "done"]
    return runs, attacks


@dataclass(frozen=True)
class _Shown:
    """One run's example reconstructions by an attack, and why the run was picked."""

    role: str
    score: Score
    examples: list[dict[str, str]]


def _token_attacks(report: _Report) -> list[str]:
    """The scored attacks that reconstruct text: token F1 as their AP, or examples stored."""
    text = {
        a.attack for a in report.attacks if a.status == "done" and (a.ap_metric == "token_f1" or a.examples)
    }
    return [a for a in report.attack_names if a in text]


def _reconstructions(report: _Report, attack: str) -> list[_Shown]:
    """The undefended run and the defended runs where ``attack`` scored highest and lowest.

    The undefended run is the one in the setting of the lowest-AP defended run (the first
    setting when nothing was defended); ties go to the first setting and strength in order.
    """
    rows = report.attack_row()
    mine = sorted(
        (s for s in report.scores if s.attack == attack), key=lambda s: (str(s.setting), s.strength)
    )
    defended = [s for s in mine if s.defense != NO_DEFENSE]
    bare = [s for s in mine if s.defense == NO_DEFENSE]
    lowest = min(defended, key=lambda s: s.ap, default=None)
    highest = max(defended, key=lambda s: s.ap, default=None)
    picks: list[tuple[str, Score]] = []
    if bare:
        where = lowest.setting if lowest is not None else bare[0].setting
        picks.append(("undefended", next((s for s in bare if s.setting == where), bare[0])))
    if highest is not None and highest is not lowest:
        picks.append(("weakest defense (highest AP)", highest))
    if lowest is not None:
        picks.append(("strongest defense (lowest AP)" if highest is not lowest else "defended", lowest))
    return [
        _Shown(role, s, bounded_examples(row.examples) if (row := rows.get((s.run_key, s.attack))) else [])
        for role, s in picks
    ]


def _shown_label(report: _Report, item: _Shown) -> str:
    where = report.setting_text(item.score.setting)
    return f"{item.role}: {item.score.strength}" + (f" ({where})" if where != _DASH else "")


def _reconstructions_html(report: _Report, attacks: Sequence[str]) -> str:
    parts = [
        '<section id="reconstructions"><h2>Reconstructions</h2>',
        '<p class="note">What each attack that reconstructs text recovered, original against '
        "reconstructed: in the undefended run and in the defended runs where it scored highest and "
        f"lowest. The store keeps up to {MAX_EXAMPLES} examples per attack on a run, each cut to "
        f"{MAX_EXAMPLE_CHARS} characters.</p>",
    ]
    for attack in attacks:
        parts.append(f"<h3>{_esc(attack)}</h3>")
        body = []
        for item in _reconstructions(report, attack):
            examples: list[dict[str, str] | None] = list(item.examples) or [None]
            for i, example in enumerate(examples):
                cells = (
                    f'<td rowspan="{len(examples)}">{_esc(_shown_label(report, item))}</td>'
                    f'<td rowspan="{len(examples)}">{_num(item.score.ap)}</td>'
                    if i == 0
                    else ""
                )
                if example is None:
                    cells += '<td colspan="2" class="none">no examples stored</td>'
                else:
                    cells += (
                        f'<td class="text">{_esc(example["original"])}</td>'
                        f'<td class="text">{_esc(example["reconstructed"])}</td>'
                    )
                body.append(f"<tr>{cells}</tr>")
        head = "".join(
            f"<th>{_esc(h)}</th>"
            for h in ("run", f"AP ({report.ap_metric(attack)})", "original", "reconstructed")
        )
        parts.append(
            f'<table class="reconstructions">\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body)
            + "\n</tbody>\n</table>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _reconstructions_md(report: _Report, attacks: Sequence[str]) -> list[str]:
    lines = ["", "## Reconstruction examples", ""]
    for attack in attacks:
        lines += [f"### {_md(attack)}", ""]
        rows = [
            [_shown_label(report, item), _num(item.score.ap), e["original"], e["reconstructed"]]
            for item in _reconstructions(report, attack)
            for e in item.examples or [{"original": "(no examples stored)", "reconstructed": ""}]
        ]
        lines += _md_table(["run", f"AP ({report.ap_metric(attack)})", "original", "reconstructed"], rows)
        lines.append("")
    return lines[:-1]


def _versions(report: _Report) -> dict[str, list[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for run in report.runs:
        for lib, version in run.versions.items():
            seen[lib].add(str(version))
    return {lib: sorted(v) for lib, v in sorted(seen.items())}


def _counts(report: _Report) -> str:
    def count(rows: Sequence[RunRow] | Sequence[AttackRow]) -> str:
        states: dict[str, int] = defaultdict(int)
        for row in rows:
            states[row.status] += 1
        inner = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return f"{len(rows)}" + (f" ({inner})" if inner else "")

    text = f"runs: {count(report.runs)}; attacks: {count(report.attacks)}"
    return text + (f" ({report.scope})" if report.scope else "")


def _empty_reason(report: _Report) -> str | None:
    """Why nothing could be scored, or None when something was."""
    if report.scores:
        return None
    if not report.runs:
        return "The store holds no runs yet: run the sweep, then write the report again."
    if not report.done:
        return "No run has finished yet (see the failed runs below)."
    if not report.undefended:
        return (
            f"No setting has a finished undefended run, so nothing can be scored ({_NO_BASELINE}; see below)."
        )
    if not any(a.status == "done" and a.ap is not None for a in report.attacks):
        return "No attack has finished yet, so there is no AP to score."
    return "No finished attack belongs to a run with an undefended baseline."


# ------------------------------------------------------------------------ HTML
_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.6rem; }
.meta, figcaption, .note { color: #555; font-size: .92rem; }
nav a { margin-right: .9rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: left; vertical-align: top; }
thead th { background: #f2f2f2; } tbody tr:nth-child(even) { background: #fafafa; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.empty { padding: .8rem 1rem; background: #fff6e0; border: 1px solid #e6c36a; }
.none { color: #a33; }
td.text { font-family: Menlo, Consolas, monospace; font-size: .85rem; white-space: pre-wrap;
          overflow-wrap: anywhere; max-width: 28rem; }
pre { white-space: pre-wrap; margin: 0; font-size: .85rem; max-width: 50rem; }
code { background: #f4f4f4; padding: 0 .2rem; }
"""

# Counts the figures that loaded, for a headless browser to read from the dumped DOM.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.dataset.figures = loaded.length + "/" + images.length;
});
"""


def _figure_html(figure: _Figure) -> str:
    width, height = re.search(r'width="(\d+)" height="(\d+)"', figure.svg).groups()  # type: ignore[union-attr]
    return (
        f'<figure><img src="{_esc(figure.file)}" alt="{_esc(figure.title)}" width="{width}" height="{height}">'
        f"<figcaption>{_esc(figure.caption)}</figcaption></figure>"
    )


def _method_html(report: _Report) -> str:
    b = report.beta
    return f"""<p>For a defense at one strength in one setting ({_esc(", ".join(SETTING_AXES))}), against one attack:</p>
<ul>
<li><b>MP</b>, main-task performance: the task's metric ({_esc(report.mp_metric())}) after fine-tuning with the defense;
  <b>AP</b>, attack performance: the attack's score on what crossed the cut (higher means more leaked).</li>
<li><b>MP*</b> = the MP of the undefended run in the same setting; <b>AP*</b> = 0, the ideal defense.</li>
<li><b>DCS</b> = 1 / (1 + √((1 − β)(AP − AP*)² + β(MP − MP*)²)), with β = {b:g} here: 1 is a defense that stops
  the attack at no cost to the task; lower is worse on either axis.</li>
<li><b>T-DCS</b>: the mean DCS over the attacks of one type (inversion, label inference, …);
  <b>C-DCS</b>: the mean DCS over all attacks. Rankings average over the settings each defense ran in.</li>
<li>As in VFLAIR-LLM (Zou et al., 2025), the distance is to the undefended point: an MP <em>above</em> MP* is
  penalized like one below it (the either-side penalty), so a defense that happens to raise MP scores lower.</li>
<li>Runs whose setting has no finished undefended run cannot be scored (no MP*); they are listed as
  “{_NO_BASELINE}”. A recommendation is the defense with the best DCS whose MP drop (MP* − MP) is at most
  {report.max_mp_drop:g}.</li>
</ul>"""


def _html(report: _Report, figures_by_kind: Mapping[str, list[_Figure]]) -> str:
    parts: list[str] = []
    sweeps = ", ".join(sorted({r.sweep for r in report.runs})) or _DASH
    parts.append(f"<header><h1>{_esc(report.title)}</h1>")
    parts.append(
        f'<p class="meta">store <code>{_esc(report.store)}</code>; sweep {_esc(sweeps)}; {_esc(_counts(report))}; '
        f"β = {report.beta:g}; MP-drop bound for recommendations {report.max_mp_drop:g}.</p>"
    )
    if report.varying:
        parts.append(f'<p class="meta">Common to every run: {_esc(report.common_setting())}.</p>')
    parts.append("</header>")
    nav = [("ranking", "Ranking"), ("recommendations", "Recommendations"), ("attacks", "Per attack")]
    token_attacks = _token_attacks(report)
    if token_attacks:
        nav.append(("reconstructions", "Reconstructions"))
    if figures_by_kind.get("split"):
        nav.append(("split-points", "Split points"))
    nav += [
        ("costs", "Costs"),
        ("unscored", "Not scored"),
        ("method", "How DCS is computed"),
        ("versions", "Versions"),
    ]
    parts.append("<nav>" + "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in nav) + "</nav>")

    reason = _empty_reason(report)
    parts.append('<section id="ranking"><h2>Ranking</h2>')
    if reason:
        parts.append(f'<p class="empty">{_esc(reason)}</p>')
    else:
        headers, rows = _ranking_rows(report)
        parts.append(
            '<p class="note">Each defense × strength by C-DCS, best first (the undefended run is listed too: '
            "its DCS is what doing nothing scores).</p>"
        )
        parts.append(_table(headers, rows, css="ranking"))
    parts.append("</section>")

    parts.append(f'<section id="recommendations"><h2>Recommendations (MP drop ≤ {report.max_mp_drop:g})</h2>')
    if report.attack_names:
        rec_rows = []
        for attack in report.attack_names:
            name, why = _recommendation_text(report, attack)
            shown = (
                _Html(f'<span class="none">{_esc(name)}</span>')
                if attack not in report.recommendations
                else name
            )
            rec_rows.append([attack, shown, why])
        parts.append(_table(["attack", "recommended defense", "why"], rec_rows, css="recommendations"))
    else:
        parts.append('<p class="empty">No attack was scored, so there is nothing to recommend.</p>')
    parts.append("</section>")

    parts.append('<section id="attacks"><h2>Per attack</h2>')
    if not report.attack_names:
        parts.append('<p class="empty">No attack was scored.</p>')
    for attack, figure in zip(report.attack_names, figures_by_kind.get("mp_ap", []), strict=False):
        headers, rows = _attack_rows(report, attack)
        parts.append(f"<h3>{_esc(attack)}</h3>")
        parts.append(_figure_html(figure))
        parts.append(_table(headers, rows, css="attack"))
    parts.append("</section>")
    if token_attacks:
        parts.append(_reconstructions_html(report, token_attacks))

    if figures_by_kind.get("split"):
        parts.append('<section id="split-points"><h2>MP and AP against the split point</h2>')
        parts += [_figure_html(f) for f in figures_by_kind["split"]]
        parts.append("</section>")

    parts.append('<section id="costs"><h2>Costs</h2>')
    for figure in figures_by_kind.get("cost", []):
        parts.append(_figure_html(figure))
    if not figures_by_kind.get("cost"):
        parts.append('<p class="empty">No finished run has an undefended run to compare its costs with.</p>')
    cost_rows = []
    by_label: dict[str, list[RunRow]] = defaultdict(list)
    for run in report.done:
        by_label[defense_label(run.spec)].append(run)
    for label in report.order(by_label):
        runs = by_label[label]
        cost_rows.append(
            [
                label,
                _si(_mean(r.seconds for r in runs), "s"),
                _si(_mean(r.bytes_to_model for r in runs), "B"),
                _si(_mean(r.bytes_to_data for r in runs), "B"),
                _si(_mean(r.data_party_flops for r in runs), "FLOP"),
                str(len(runs)),
            ]
        )
    if cost_rows:
        parts.append(
            '<p class="note">Absolute costs, means over the finished runs of each defense × strength, as the '
            "sweep stored them.</p>"
        )
        parts.append(
            _table(
                [
                    "defense (strength)",
                    "wall time",
                    "bytes to model party",
                    "bytes to data party",
                    "data-party FLOPs",
                    "runs",
                ],
                cost_rows,
                css="costs",
            )
        )
    parts.append("</section>")

    parts.append('<section id="unscored"><h2>Runs not scored</h2>')
    unbaselined = _unbaselined(report)
    failed_runs, failed_attacks = _failed(report)
    if not (unbaselined or failed_runs or failed_attacks):
        parts.append('<p class="note">Every run and attack finished and was scored.</p>')
    if unbaselined:
        parts.append(f"<h3>{_esc(_NO_BASELINE.capitalize())}</h3>")
        parts.append(
            '<p class="note">These finished runs are in a setting without a finished undefended run, so '
            "they have no MP* and no DCS.</p>"
        )
        parts.append(
            _table(
                ["defense (strength)", "setting", "MP", "status"],
                [
                    [
                        defense_label(r.spec),
                        report.setting_text(setting_of(r.spec), full=True),
                        _num(r.mp),
                        _NO_BASELINE,
                    ]
                    for r in unbaselined
                ],
                css="unbaselined",
            )
        )
    if failed_runs:
        parts.append("<h3>Failed runs</h3>")
        parts.append(
            _table(
                ["defense (strength)", "setting", "status", "error"],
                [
                    [
                        defense_label(r.spec),
                        report.setting_text(setting_of(r.spec), full=True),
                        r.status,
                        _Html(f"<pre>{_esc(r.error or '')}</pre>"),
                    ]
                    for r in failed_runs
                ],
                css="failed",
            )
        )
    if failed_attacks:
        parts.append("<h3>Failed attacks</h3>")
        parts.append(
            _table(
                ["attack", "on run", "status", "error"],
                [
                    [
                        a.attack,
                        defense_label(run.spec) if run else a.run_key,
                        a.status,
                        _Html(f"<pre>{_esc(a.error or '')}</pre>"),
                    ]
                    for a, run in failed_attacks
                ],
                css="failed-attacks",
            )
        )
    parts.append("</section>")

    parts.append(f'<section id="method"><h2>How DCS is computed</h2>{_method_html(report)}</section>')
    parts.append('<section id="versions"><h2>Library versions</h2>')
    versions = _versions(report)
    if versions:
        parts.append(
            _table(
                ["library", "version(s)"],
                [[lib, ", ".join(v)] for lib, v in versions.items()],
                css="versions",
            )
        )
    else:
        parts.append('<p class="note">No versions stored.</p>')
    parts.append("</section>")

    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(report.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


# -------------------------------------------------------------------- Markdown
def _md(value: object) -> str:
    return _esc(value).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return out


def _markdown(report: _Report) -> str:
    lines = [f"# {_md(report.title)}", ""]
    lines.append(f"Store `{report.store}`; {_md(_counts(report))}; β = {report.beta:g}.")
    lines.append("")
    lines.append("## Ranking (C-DCS, best first)")
    lines.append("")
    reason = _empty_reason(report)
    if reason:
        lines.append(_md(reason))
    else:
        headers, rows = _ranking_rows(report)
        lines += _md_table(headers, rows)
    lines += ["", f"## Recommendations (MP drop ≤ {report.max_mp_drop:g})", ""]
    if not report.attack_names:
        lines.append("No attack was scored.")
    for attack in report.attack_names:
        name, why = _recommendation_text(report, attack)
        lines.append(f"- **{_md(attack)}**: {_md(name)} ({_md(why)})")
    token_attacks = _token_attacks(report)
    if token_attacks:
        lines += _reconstructions_md(report, token_attacks)
    unbaselined = _unbaselined(report)
    if unbaselined:
        lines += ["", f"## Runs with {_NO_BASELINE}", ""]
        lines += _md_table(
            ["defense (strength)", "setting", "MP"],
            [
                [defense_label(r.spec), report.setting_text(setting_of(r.spec), full=True), _num(r.mp)]
                for r in unbaselined
            ],
        )
    failed_runs, failed_attacks = _failed(report)
    lines += ["", "## Failed runs", ""]
    if failed_runs:
        lines += _md_table(
            ["defense (strength)", "setting", "status", "error"],
            [
                [
                    defense_label(r.spec),
                    report.setting_text(setting_of(r.spec), full=True),
                    r.status,
                    r.error or "",
                ]
                for r in failed_runs
            ],
        )
    else:
        lines.append("None.")
    if failed_attacks:
        lines += ["", "## Failed attacks", ""]
        lines += _md_table(
            ["attack", "on run", "status", "error"],
            [
                [a.attack, defense_label(r.spec) if r else a.run_key, a.status, a.error or ""]
                for a, r in failed_attacks
            ],
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- entry
def write_report(
    store_path: str | Path,
    out_dir: str | Path,
    *,
    beta: float = 0.5,
    max_mp_drop: float = 0.05,
    title: str | None = None,
    run_keys: Collection[str] | None = None,
    attack_keys: Collection[str] | None = None,
) -> ReportPaths:
    """Write the HTML report, its SVG figures and a Markdown summary of a results store.

    Parameters
    ----------
    store_path : str | Path
        The sweep's SQLite results store.
    out_dir : str | Path
        The folder to write ``index.html``, ``summary.md`` and ``figures/*.svg`` into (created when
        missing; files of an earlier report with the same names are replaced).
    beta : float, default 0.5
        DCS's weight of the task axis (see :func:`splitfed.bench.scores.dcs`).
    max_mp_drop : float, default 0.05
        The largest MP drop a recommended defense may cost.
    title : str, optional
        The page's title (default: from the store's file name).
    run_keys, attack_keys : collections of str, optional
        Report only these runs, and only these attacks of them (by store key; see
        :func:`sweep_keys` for those of a sweep file): a store that outlived a change of its
        sweep's grid keeps the runs of the old grid, which would otherwise be ranked beside the
        current ones. The page says how many stored rows it left out.

    Returns
    -------
    ReportPaths
        The files written.

    Raises
    ------
    FileNotFoundError
        If there is no store at ``store_path``.
    ValueError
        For ``beta`` outside ``[0, 1]`` or a negative ``max_mp_drop``.
    splitfed.bench.store.StoreError
        If the file is not a splitfed results store.
    """
    store_path, out_dir = Path(store_path), Path(out_dir)
    if not store_path.is_file():
        raise FileNotFoundError(f"no results store at {store_path}; run the sweep first or check the path")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1]; got {beta}")
    if max_mp_drop < 0:
        raise ValueError(f"max_mp_drop must be at least 0; got {max_mp_drop}")
    with ResultStore(store_path) as store:
        runs, attacks = store.runs(), store.attacks()
    scope = None
    if run_keys is not None or attack_keys is not None:
        kept_runs = [r for r in runs if run_keys is None or r.key in run_keys]
        kept = {r.key for r in kept_runs}
        kept_attacks = [
            a for a in attacks if a.run_key in kept and (attack_keys is None or a.attack_key in attack_keys)
        ]
        scope = (
            f"only the sweep grid; left out: runs {len(runs) - len(kept_runs)}, "
            f"attacks {len(attacks) - len(kept_attacks)} of other grids"
        )
        runs, attacks = kept_runs, kept_attacks
    report = _Report(
        title or f"splitfed benchmark: {store_path.stem}",
        store_path,
        beta,
        max_mp_drop,
        runs,
        attacks,
        scope=scope,
    )
    taken: set[str] = set()
    slugs = {name: _slug(name, taken) for name in sorted({a.attack for a in attacks})}
    figures: dict[str, list[_Figure]] = {
        "mp_ap": [_mp_ap_figure(report, attack, slugs[attack]) for attack in report.attack_names],
        "split": _split_figures(report, slugs),
    }
    cost = _cost_figure(report)
    figures["cost"] = [cost] if cost else []

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(exist_ok=True)
    written = []
    for figure in (f for kind in ("mp_ap", "split", "cost") for f in figures[kind]):
        path = out_dir / figure.file
        path.write_text(figure.svg, encoding="utf-8")
        written.append(path)
    index, summary = out_dir / "index.html", out_dir / "summary.md"
    index.write_text(_html(report, figures), encoding="utf-8")
    summary.write_text(_markdown(report), encoding="utf-8")
    return ReportPaths(out_dir, index, summary, tuple(written))


def sweep_keys(sweep_file: str | Path) -> tuple[set[str], set[str]]:
    """The store keys of every run and every attack of the sweep in ``sweep_file`` (for
    :func:`write_report`'s ``run_keys`` and ``attack_keys``).

    Raises
    ------
    splitfed.config.ConfigError
        For a missing or bad sweep file, naming what is wrong.
    """
    from splitfed.bench.sweep import attack_key, attack_specs, expand, load_sweep

    sweep, root = load_sweep(sweep_file)
    return {r.key for r in expand(sweep, root)}, {attack_key(a) for a in attack_specs(sweep)}
