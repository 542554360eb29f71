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

    pretrain = sub.add_parser("pretrain", help="pretrain the base U-Net on streamed synthetic "
                              "series and export its bundle (docs/transfer.md)")
    pretrain.add_argument("--series", type=int, default=160_000,
                          help="synthetic series seen in training, each once (default: sized "
                               "for 8 to 15 minutes on 2 shared CPU cores; raise it on a GPU)")
    pretrain.add_argument("--epochs", type=int, default=10)
    pretrain.add_argument("--batch", type=int, default=32)
    pretrain.add_argument("--seed", type=int, default=1)
    pretrain.add_argument("--out", type=Path, default=ROOT / "models" / "base-unet")
    pretrain.add_argument("--results", type=Path, default=ROOT / "results" / "pretrain.json")

    curves = sub.add_parser("curves", help="synthetic curves with unusual shapes: U-Net from "
                            "scratch and transferred from the base bundle")
    curves.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    curves.add_argument("--base", type=Path, default=ROOT / "models" / "base-unet")
    curves.add_argument("--epochs", type=int, default=None,
                        help="epochs of each run (default: trainer.curves.EPOCHS)")
    curves.add_argument("--results", type=Path,
                        default=ROOT / "results" / "synthetic-curves.json")

    nab = sub.add_parser("nab", help="score the base bundle zero-shot on the NAB series, "
                         "through the agent's streaming pipeline")
    nab.add_argument("--data", type=Path, default=None,
                     help="NAB folder with data/ and labels/ (default: ../shared/data/nab)")
    nab.add_argument("--bundle", type=Path, default=ROOT / "models" / "base-unet")
    nab.add_argument("--results", type=Path, default=ROOT / "results" / "nab-zero-shot.json")

    finetune = sub.add_parser("finetune", help="fine-tune a base bundle on your own channels "
                              "and labelled spans (a task YAML; docs/transfer.md)")
    finetune.add_argument("--config", type=Path, required=True, help="the task's YAML file")
    finetune.add_argument("--out", type=Path, default=None,
                          help="bundle folder to write (default: the task's 'out')")

    emg = sub.add_parser("emg", help="EMG gestures: U-Net and MU-Net from scratch, MU-Net "
                         "transferred from the base bundle (split by subject)")
    emg.add_argument("--data", type=Path, default=None,
                     help="folder of subject folders (default: ../shared/data/emg_gestures)")
    emg.add_argument("--base", type=Path, default=ROOT / "models" / "base-unet")
    emg.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                     help="one run per seed, each with its own split of subjects")
    emg.add_argument("--epochs", type=int, default=None, help="default: trainer.emg.EPOCHS")
    emg.add_argument("--snapshots-per-epoch", type=int, default=None)
    emg.add_argument("--models", nargs="+", default=None,
                     help="unet_scratch munet_scratch munet_transfer (default: all three)")
    emg.add_argument("--results", type=Path, default=ROOT / "results" / "emg.json")

    skab = sub.add_parser("skab", help="SKAB: MU-Net transferred from the base bundle, 3 folds "
                          "by experiment, streamed through the agent's pipeline")
    skab.add_argument("--data", type=Path, default=None,
                      help="SKAB folder with valve1/, valve2/, other/, anomaly-free/ "
                           "(default: ../shared/data/skab)")
    skab.add_argument("--base", type=Path, default=ROOT / "models" / "base-unet")
    skab.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                      help="seed k trains on two folds and tests fold (k - 1) mod 3")
    skab.add_argument("--epochs", type=int, default=None, help="default: trainer.skab.EPOCHS")
    skab.add_argument("--snapshots-per-epoch", type=int, default=None)
    skab.add_argument("--models", nargs="+", default=["munet_transfer"],
                      help="munet_transfer and/or munet_scratch (the scratch baseline)")
    skab.add_argument("--normalization", nargs="+", choices=["snapshot", "fixed"],
                      default=["snapshot", "fixed"],
                      help="input normalizations to run, each a row of the results "
                           "(default: both)")
    skab.add_argument("--out", type=Path, default=None,
                      help="keep the first seed's first model's bundle in this folder")
    skab.add_argument("--results", type=Path, default=ROOT / "results" / "skab.json")

    dtransfer = sub.add_parser("dodgers-transfer", help="Dodgers with the base bundle "
                               "fine-tuned on the training half, scored as the scratch run")
    dtransfer.add_argument("--data", type=Path, default=None)
    dtransfer.add_argument("--base", type=Path, default=ROOT / "models" / "base-unet")
    dtransfer.add_argument("--strategy", choices=["freeze", "multipliers"], default="freeze")
    dtransfer.add_argument("--epochs", type=int, default=6,
                           help="half the scratch run's 12, to fit six trainings (three for the "
                                "operating point, three seeds) in about 15 minutes on 2 cores")
    dtransfer.add_argument("--snapshots-per-epoch", type=int, default=4096)
    dtransfer.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    dtransfer.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    dtransfer.add_argument("--out", type=Path, default=None,
                           help="keep the first seed's bundle in this folder")
    dtransfer.add_argument("--results", type=Path,
                           default=ROOT / "results" / "dodgers-transfer.json")

    sub.add_parser("report", help="regenerate docs/results.md from results/*.json")

    args = parser.parse_args(argv)
    try:
        if args.command != "report":
            import keras  # noqa: F401  (the trainer's models; not in the agent's install)
    except ImportError:
        print("segwatch-train: TensorFlow/Keras is not installed; install the trainer with "
              "pip install '.[trainer]' (or '.[trainer-gpu]' on a CUDA machine)",
              file=sys.stderr)
        return 2
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
    elif args.command == "pretrain":
        from trainer import pretrain as task

        task.run(args.out, args.results, args.series, args.epochs, args.batch, args.seed,
                 command)
    elif args.command == "curves":
        from trainer import curves as task

        task.run(args.base, args.results, tuple(args.seeds), command, epochs=args.epochs)
    elif args.command == "nab":
        from trainer import nab as task

        task.run(args.bundle, args.data or task.DEFAULT_DATA, args.results, command)
    elif args.command == "finetune":
        from trainer import finetune as task

        try:
            task.run(args.config, command, out=args.out)
        except task.TaskError as exc:
            parser.error(str(exc))
    elif args.command == "emg":
        from trainer import emg as task

        task.run(args.data or task.DEFAULT_EMG, args.base, args.results, tuple(args.seeds),
                 args.epochs or task.EPOCHS,
                 args.snapshots_per_epoch or task.SNAPSHOTS_PER_EPOCH,
                 tuple(args.models or task.MODELS), command)
    elif args.command == "skab":
        from trainer import skab as task

        task.run(args.data or task.DEFAULT_SKAB, args.base, args.results, tuple(args.seeds),
                 args.epochs or task.EPOCHS,
                 args.snapshots_per_epoch or task.SNAPSHOTS_PER_EPOCH, tuple(args.models),
                 command, args.out, tuple(args.normalization))
    elif args.command == "dodgers-transfer":
        from trainer import dodgers as scratch
        from trainer import dodgers_transfer as task

        data = args.data or scratch.DEFAULT_DATA
        if not (data / "Dodgers.data").is_file():
            parser.error(f"no Dodgers.data in {data}; pass --data FOLDER")
        task.run(data, args.base, args.results, args.epochs, args.snapshots_per_epoch,
                 tuple(args.seeds), args.strategy, command, args.augment, args.out)
    elif args.command == "report":
        from trainer.report import write_report

        print(f"wrote {write_report()}")
    return 0
