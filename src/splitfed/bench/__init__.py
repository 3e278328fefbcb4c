"""The privacy–utility benchmark: sweeps of runs × defenses × attacks, their store, scores and report.

:mod:`~splitfed.bench.sweep`
    a sweep's YAML, its grid of runs, and running it (resumable: stored runs are skipped);
:mod:`~splitfed.bench.store`
    the SQLite store every result goes to;
:mod:`~splitfed.bench.scores`
    MP, AP, DCS (VFLAIR-LLM's defense capability score), T-DCS, C-DCS, Pareto frontiers;
:mod:`~splitfed.bench.report`
    the HTML report with figures and a Markdown summary.
"""
