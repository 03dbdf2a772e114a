"""Evaluation benchmark: time and figures of an image -> image evaluation of 10k tiles, exact and per index type.

    python -m bench.eval [--n 10000] [--classes 9] [--cases 200] [--types flat ivf hnsw] [--bootstrap 1000]

Vectors are synthetic 512-d embeddings of a labelled set shaped like a pathology benchmark: each class
a direction, each case (patient) an offset shared by its tiles (the same-patient similarity that
leave-one-case-out removes), plus per-tile noise, L2-normalised. Each row runs the whole evaluation
(ranking with leave-one-case-out, Acc@1/3/5, mMV@5, mAP@10, per-class figures, 95 % bootstrap
intervals) and is compared with the exact brute-force row measured in the same run; ``top10 overlap``
is the share of each query's exact top 10 that the index also returned. The last row shows how much
same-case matches inflate the figures when leave-one-case-out is off.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench._machine import describe_machine
from search.evaluation.ranking import rank_exact, rank_index
from search.evaluation.reports import retrieval_report
from search.storage.vectors import VectorIndex

DEPTH = 10


def synthetic_set(n: int, n_classes: int, n_cases: int, dim: int = 512, seed: int = 0):
    """(vectors [n, dim], labels [n], cases [n]): cases nested in classes, uneven case sizes."""
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((n_classes, dim)).astype(np.float32)
    case_class = rng.integers(n_classes, size=n_cases)
    case_offset = rng.standard_normal((n_cases, dim)).astype(np.float32) * 0.9
    weights = rng.pareto(1.5, n_cases) + 1
    cases = rng.choice(n_cases, size=n, p=weights / weights.sum())
    labels = case_class[cases]
    vectors = classes[labels] * 0.45 + case_offset[cases] + rng.standard_normal((n, dim)).astype(np.float32) * 1.6
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, labels.astype(np.int64), cases.astype(np.int64)


def _relevant(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    n_labels = int(labels.max()) + 1
    key = groups * n_labels + labels
    return np.bincount(labels, minlength=n_labels)[labels] - np.bincount(key)[key]


@dataclass
class Row:
    name: str
    build_s: float
    rank_s: float
    report_s: float
    report: dict
    overlap: float | None


def _report(labels, ranked, groups, n_boot) -> tuple[dict, float]:
    start = time.perf_counter()
    classes = [f"class{c}" for c in range(int(labels.max()) + 1)]
    report = retrieval_report(labels, ranked, labels, _relevant(labels, groups), classes, ap_k=DEPTH, n_boot=n_boot)
    return report, time.perf_counter() - start


def run(n: int, n_classes: int, n_cases: int, types: Sequence[str], n_boot: int) -> list[Row]:
    vectors, labels, cases = synthetic_set(n, n_classes, n_cases)
    rows = []
    start = time.perf_counter()
    exact = rank_exact(vectors, vectors, DEPTH, query_groups=cases, db_groups=cases, query_labels=labels,
                       db_labels=labels)  # fmt: skip
    rank_s = time.perf_counter() - start
    report, report_s = _report(labels, exact, cases, n_boot)
    rows.append(Row("exact (numpy)", 0.0, rank_s, report_s, report, 1.0))
    ids = np.arange(n, dtype=np.int64)
    for kind in types:
        start = time.perf_counter()
        index = VectorIndex.build(ids, vectors, kind, device="cpu")
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        ranked = rank_index(index, vectors, ids, DEPTH, query_groups=cases, db_groups=cases)
        rank_s = time.perf_counter() - start
        report, report_s = _report(labels, ranked, cases, n_boot)
        overlap = np.mean([len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(1, (b >= 0).sum())
                           for a, b in zip(ranked, exact, strict=True)])  # fmt: skip
        name = f"{kind}" + (f" nprobe={index.nprobe}" if index.nprobe else "")
        rows.append(Row(name, build_s, rank_s, report_s, report, float(overlap)))
    start = time.perf_counter()
    itself = np.arange(n)
    leaky = rank_exact(vectors, vectors, DEPTH, query_groups=itself, db_groups=itself, query_labels=labels,
                       db_labels=labels)  # fmt: skip
    rank_s = time.perf_counter() - start
    report, report_s = _report(labels, leaky, itself, n_boot)
    rows.append(Row("exact, no leave-one-case-out", 0.0, rank_s, report_s, report, None))
    return rows


def _figure(report: dict, name: str) -> str:
    f = report["metrics"][name]
    return f"{f['value']:.3f} [{f['low']:.3f},{f['high']:.3f}]"


def format_table(rows: Sequence[Row]) -> str:
    base = rows[0]
    head = (f"{'search':<30} {'build s':>8} {'rank s':>8} {'x exact':>8} {'report s':>9} {'top10 overlap':>13}  "
            f"{'Acc@1':<21} {'mMV@5':<21} {'mAP@10':<21}")  # fmt: skip
    lines = [head]
    for r in rows:
        overlap = f"{r.overlap:.3f}" if r.overlap is not None else "-"
        lines.append(
            f"{r.name:<30} {r.build_s:>8.2f} {r.rank_s:>8.2f} {base.rank_s / r.rank_s:>8.2f} {r.report_s:>9.2f} "
            f"{overlap:>13}  {_figure(r.report, 'Acc@1'):<21} {_figure(r.report, 'mMV@5'):<21} "
            f"{_figure(r.report, 'mAP@10'):<21}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="tiles (default 10000)")
    parser.add_argument("--classes", type=int, default=9, help="classes (default 9, as CRC-VAL-HE-7K)")
    parser.add_argument("--cases", type=int, default=200, help="cases (default 200)")
    parser.add_argument("--types", nargs="+", default=["flat", "ivf", "hnsw"], help="index types")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    args = parser.parse_args(argv)
    print(describe_machine())
    print(f"{args.n} tiles, {args.classes} classes, {args.cases} cases, 512-d, depth {DEPTH}, "
          f"{args.bootstrap} bootstrap resamples")  # fmt: skip
    start = time.perf_counter()
    rows = run(args.n, args.classes, args.cases, args.types, args.bootstrap)
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
