"""``napari-glimpse merge``: merge the CSVs of 'predict --shard' runs."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    mg = sub.add_parser("merge", help="merge the CSVs of 'predict --shard' runs (and their confidence CSVs) into one")
    mg.add_argument("csvs", nargs="+", metavar="CSV", help="landmark CSVs written by predict (e.g. one per shard)")
    mg.add_argument("--out", required=True, help="merged CSV, rows sorted by image name (as one predict run's)")
    mg.add_argument("--confidence-out", help="merged confidence CSV (default: OUT with _confidence); written when "
                                             "every CSV has its NAME_confidence.csv beside it")


def run(a: argparse.Namespace) -> int:
    from .._shards import run_merge

    return run_merge(a.csvs, a.out, a.confidence_out)
