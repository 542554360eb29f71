"""``segwatch-train``: train, evaluate and export models."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="segwatch-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dodgers = sub.add_parser("dodgers", help="train, export and evaluate the Dodgers U-Net")
    dodgers.add_argument("--data", type=Path, default=None,
                         help="folder with Dodgers.data and Dodgers.events "
                              "(default: ../shared/data/dodgers)")
    dodgers.add_argument("--out", type=Path, default=ROOT / "models" / "dodgers-unet",
                         help="bundle folder to write (default: models/dodgers-unet)")
    dodgers.add_argument("--results", type=Path, default=ROOT / "results" / "dodgers-unet.json")
    dodgers.add_argument("--epochs", type=int, default=12)
    dodgers.add_argument("--snapshots-per-epoch", type=int, default=4096)
    dodgers.add_argument("--seed", type=int, default=1, help="seed of the shipped bundle")
    dodgers.add_argument("--spread-seeds", type=int, nargs="*", default=[2, 3],
                         help="more seeds, trained and scored only for the run-to-run spread")
    dodgers.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                         help="random amplitude scaling and jitter of training snapshots "
                              "(default: on; chosen by cross-validation, docs/dodgers.md)")

    cv = sub.add_parser("dodgers-cv", help="only the cross-validation on the Dodgers training "
                        "half, to compare training recipes")
    cv.add_argument("--data", type=Path, default=None)
    cv.add_argument("--epochs", type=int, default=12)
    cv.add_argument("--snapshots-per-epoch", type=int, default=4096)
    cv.add_argument("--seed", type=int, default=1)
    cv.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)

    sub.add_parser("report", help="regenerate docs/results.md from results/*.json")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    logging.getLogger("agent.inference").setLevel(logging.WARNING)
    command = "segwatch-train " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    if args.command == "dodgers":
        from trainer import dodgers as task

        data = args.data or task.DEFAULT_DATA
        if not (data / "Dodgers.data").is_file():
            parser.error(f"no Dodgers.data in {data}; pass --data FOLDER")
        task.run(data, args.out, args.results, args.epochs, args.snapshots_per_epoch,
                 args.seed, command, tuple(args.spread_seeds), args.augment)
    elif args.command == "dodgers-cv":
        from trainer import dodgers as task

        suffix = "augment" if args.augment else "no-augment"
        task.run_cross_validation(args.data or task.DEFAULT_DATA,
                                  ROOT / "results" / f"dodgers-cv-{suffix}.json", args.epochs,
                                  args.snapshots_per_epoch, args.seed, args.augment, command)
    elif args.command == "report":
        from trainer.report import write_report

        print(f"wrote {write_report()}")
    return 0
