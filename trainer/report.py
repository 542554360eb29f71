"""Generate ``docs/results.md`` from the experiment files ``results/*.json``.

The tables in the docs are never typed by hand: rerun ``segwatch-train report`` after an
experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _dodgers(result: dict) -> list[str]:
    test, train, op = result["test"], result["train"], result["operating_point"]
    paper = result["paper"]
    lines = [
        "## Dodgers Loop Sensor, U-Net",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, seed "
        f"{result['seed']}, {result['seconds']:.0f} s on the machine that ran it).",
        f"Training half {result['split']['train'][0]} to {result['split']['train'][1]}, "
        f"test half {result['split']['test'][0]} to {result['split']['test'][1]}. "
        "Scored through the agent's streaming pipeline (ONNX Runtime) with the bundle's "
        f"operating point: snapshot {op['snapshot_length']} samples, hop {op['hop']}, "
        f"threshold {op['threshold']}, on-delay {op['min_duration'] / 60:.0f} min.",
        "",
        "| | games detected | false alarms | alarms |",
        "|---|---|---|---|",
        f"| the paper (test half) | {paper['detected']} of {paper['events']} | a few | |",
        f"| this bundle, test half | {test['detected']} of {test['events']} | "
        f"{test['false_alarms']} | {test['alarms']} |",
        f"| this bundle, training half | {train['detected']} of {train['events']} | "
        f"{train['false_alarms']} | |",
        "",
    ]
    missing = paper["events"] - test["events"]
    if missing > 0:
        lines += [f"The test half holds {paper['events']} games; {missing} of them fall entirely "
                  "inside a sensor outage (no sample in the label window) and are not counted. "
                  f"Counted as missed, the bundle detects {test['detected']} of "
                  f"{paper['events']}.", ""]
    if result.get("seeds"):
        lines += ["Run-to-run spread (same command, other seeds):", "",
                  "| seed | test games detected | false alarms |", "|---|---|---|"]
        for seed in result["seeds"]:
            lines.append(f"| {seed['seed']} | {seed['detected']} of {seed['events']} | "
                         f"{seed['false_alarms']} |")
        lines.append("")
    cv = result.get("operating_point_cross_validation")
    if cv:
        lines += [f"Operating point by {cv['folds']}-fold cross-validation on the training half "
                  "(games detected and false alarms over the held-out folds):", "",
                  "| snapshot | threshold | detected | false alarms |", "|---|---|---|---|"]
        for t in cv["trials"]:
            chosen = (t["snapshot_length"], t["threshold"]) == (cv["snapshot_length"],
                                                                cv["threshold"])
            lines.append(f"| {t['snapshot_length']} | {t['threshold']} | {t['detected']} of "
                         f"{t['events']} | {t['false_alarms']}{' (chosen)' if chosen else ''} |")
        lines.append("")
    lines += ["Game by game (test half; label window in UTC):", "",
              "| game | label window | detected |", "|---|---|---|"]
    for game in test["games"]:
        window = f"{game['window_start'][:16]} .. {game['window_end'][11:16]}"
        lines.append(f"| {game['game']} | {window} | {'yes' if game['detected'] else 'no'} |")
    if test["false_alarm_spans"]:
        lines += ["", "False alarms (alarms that overlap no label window):", ""]
        lines += [f"- {a} .. {b}" for a, b in test["false_alarm_spans"]]
    return lines + [""]


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _pretrain(result: dict) -> list[str]:
    data, training, test = result["data"], result["training"], result["test"]
    op = result["operating_point"]
    lines = [
        "## Base model: pretraining on synthetic series",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, seed "
        f"{result['seed']}, {result['seconds']:.0f} s in all, {training['seconds']:.0f} s of "
        "training, on the machine that ran it). Bundle "
        f"`{result['bundle']}`, model id `{result['model_id']}`.",
        f"{data['series_seen']:,} streamed synthetic series of {data['model_length']} points, "
        f"each seen once ({training['epochs']} epochs of {training['steps_per_epoch']} "
        f"batches of {training['batch']}). Threshold {op['threshold']} chosen on "
        f"{data['validation']['series']} validation series (best mean IoU); IoU on "
        f"{test['series']} held-out series (seed {test['seed']}):",
        "",
        "| class | held-out IoU |",
        "|---|---|",
    ]
    lines += [f"| {name} | {_pct(value)} |" for name, value in test["per_class"].items()]
    lines += [f"| mean | {_pct(test['mean'])} |", "",
              f"Operating point of the bundle: snapshot {op['snapshot_length']} samples, hop "
              f"{op['hop']}, threshold {op['threshold']}, on-delay {op['min_duration']:g} s.",
              "", "![held-out synthetic series](figures/pretrain-heldout.png)", ""]
    return lines


def _curves(result: dict) -> list[str]:
    scores, paper, data = result["scores"], result["paper"], result["data"]
    training = result["training"]
    lines = [
        "## Synthetic curves with unusual shapes",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, "
        f"{result['seconds']:.0f} s on the machine that ran it). {data['series']:,} series of "
        f"{data['length']} points from `{data['generator']}` (seed {data['seed']}): "
        f"{data['train']} train, {data['test']} test. {training['epochs']} epochs, batch "
        f"{training['batch']}, Adam {training['lr']:g}, {training['loss']}; transfer from "
        f"`{result['base_model_id']}`. Test IoU at threshold {result['threshold']}, over "
        f"seeds {', '.join(map(str, result['seeds']))}:",
        "",
        "| model | the paper | mean | spread (sd) | min .. max | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for variant, score in scores.items():
        ours = paper["scratch"] if variant == "scratch" else paper["transfer"]
        per_seed = ", ".join(_pct(r["iou"]) for r in score["seeds"])
        lines.append(f"| {variant} | {_pct(ours)} | {_pct(score['mean'])} | "
                     f"{_pct(score['std'])} | {_pct(score['min'])} .. {_pct(score['max'])} | "
                     f"{per_seed} |")
    transfer = {v: s for v, s in scores.items() if v != "scratch"}
    if transfer:
        best = max(transfer, key=lambda v: transfer[v]["mean"])
        verdict = "beats" if transfer[best]["mean"] > paper["transfer"] else "falls short of"
        lines += ["", f"The best transfer strategy ({best}) {verdict} the paper's "
                      f"{_pct(paper['transfer'])}."]
        if "scratch" in scores:
            gain = 100 * (transfer[best]["mean"] - scores["scratch"]["mean"])
            paper_gain = 100 * (paper["transfer"] - paper["scratch"])
            lines[-1] += (f" Transfer minus scratch: {gain:+.1f} points here, "
                          f"{paper_gain:+.1f} in the paper"
                          + (": on this generator a U-Net from scratch learns the task from "
                             "700 series, and the base model's start does not help (see "
                             "`docs/transfer.md`)." if gain < 0 else "."))
    for variant, path in result.get("figures", {}).items():
        link = path[len("docs/"):] if path.startswith("docs/") else path  # from docs/
        lines += ["", f"Test snapshots, {variant}:", "", f"![{variant}]({link})"]
    return lines + [""]


def _nab(result: dict) -> list[str]:
    corpus = result["corpus"]
    op = result["operating_point"]
    lines = [
        "## NAB, zero-shot (base bundle, no fine-tuning)",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, "
        f"{result['seconds']:.0f} s). Bundle `{result['model_id']}` streamed through the "
        "agent's pipeline (ONNX Runtime) over "
        f"{corpus['files']} of NAB's {corpus['of']} files ({corpus['windows']} windows); "
        f"snapshot {op['snapshot_length']}, hop {op['hop']}. Anomaly score of a row: "
        f"{result['anomaly_score']}. NAB's standard profile; the threshold is swept over "
        "the corpus as NAB's optimizer does for every scoreboard entry, and the score at the "
        f"bundle's own threshold ({op['threshold']}) is given too. A score on 10 files is on "
        "NAB's scale but is not a scoreboard entry.",
        "",
        "| detector | NAB score, standard profile |",
        "|---|---|",
    ]
    board = result["scoreboard_standard"]
    for name, value in board.items():
        lines.append(f"| {name}, NAB scoreboard (58 files) | {value:.1f} |")
    labels = {"rows": "row by row", "timestamps": "on the files' timestamps"}
    for grid, scored in result["grids"].items():
        standard = scored["profiles"]["standard"]
        lines.append(f"| this base bundle, {labels.get(grid, grid)}, threshold swept "
                     f"({standard['threshold']:.3f}) | {standard['score']:.1f} |")
        lines.append(f"| this base bundle, {labels.get(grid, grid)}, bundle threshold | "
                     f"{standard['score_at_bundle_threshold']:.1f} |")
        if "alarms" in scored:
            alarms = scored["alarms"]
            lines.append(f"| this base bundle, {labels.get(grid, grid)}, the agent's alarms "
                         f"({alarms['detected']} of {alarms['windows']} windows, "
                         f"{alarms['false_positives']} false) | {alarms['score']:.1f} |")
    first = next(iter(result["grids"].values()))
    lines += ["", f"File by file ({first['grid']}; threshold swept):", "",
              "| file | windows | detected | false-positive rows |", "|---|---|---|---|"]
    for entry in first["files"]:
        lines.append(f"| {entry['file']} | {entry['windows']} | {entry['detected']} | "
                     f"{entry['false_positive_rows']} |")
    return lines + [""]


def _notes(result: dict) -> list[str]:
    """The results file's ``notes`` (where a result falls short of the paper, and why)."""
    if not result.get("notes"):
        return []
    return ["Notes:", ""] + [f"- {note}" for note in result["notes"]] + [""]


def _dodgers_transfer(result: dict) -> list[str]:
    op, training, spread = result["operating_point"], result["training"], result["spread"]
    scratch, paper = result.get("scratch"), result["paper"]
    seeds = ", ".join(str(r["seed"]) for r in result["seeds"])
    lines = [
        "## Dodgers Loop Sensor, U-Net transferred from the base model",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, seeds {seeds}, "
        f"{result['seconds']:.0f} s on the machine that ran it). Base `{result['base']['bundle']}`"
        f" (`{result['base']['model_id']}`), strategy `{result['strategy']}`, "
        f"{training['epochs']} epochs of {training['snapshots_per_epoch']} snapshots; same "
        "split, label windows, augmentation and streaming evaluation as the scratch run. "
        f"Operating point by 3-fold cross-validation on the training half: snapshot "
        f"{op['snapshot_length']} samples, threshold {op['threshold']}.",
        "",
        "| test half | games detected (per seed) | false alarms (per seed) | mean detected | "
        "mean false alarms |",
        "|---|---|---|---|---|",
        f"| the paper | {paper['detected']} of {paper['events']} | a few | | |",
    ]
    rows = []
    if scratch:
        rows.append((f"scratch (`{scratch['results']}`)", scratch["seeds"], scratch["spread"]))
    rows.append((f"transfer, {result['strategy']}", result["seeds"], spread))
    for name, seed_rows, sp in rows:
        detected = ", ".join(f"{r['detected']}" for r in seed_rows)
        false = ", ".join(f"{r['false_alarms']}" for r in seed_rows)
        lines.append(f"| {name} | {detected} of {seed_rows[0]['events']} | {false} | "
                     f"{sp['detected_mean']:.1f} | {sp['false_alarms_mean']:.1f} |")
    lines += [""] + _notes(result)
    return lines


def _emg(result: dict) -> list[str]:
    training, data = result["training"], result["data"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        "## EMG gestures, multi-class single-label (U-Net, MU-Net, MU-Net transfer)",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, seeds {seeds}, "
        f"{result['seconds']:.0f} s on the machine that ran it). {len(data['subjects'])} "
        f"subjects on a {data['grid_ms']:g} ms grid, snapshots of {data['snapshot_length']} "
        f"points, classes {', '.join(data['classes'][1:])} (background: rest and pauses). "
        f"Split by subject, its own per seed (7 train / 3 test). {training['epochs']} epochs "
        f"of {training['snapshots_per_epoch']} random snapshots, {training['optimizer']}, "
        f"{training['loss']}; inputs {training['normalization']}; augmentation: "
        f"{training['augmentation']}."
        + (f" Transfer from `{result['base']['bundle']}` (`{result['base']['model_id']}`)."
           if result.get("base") else ""),
        "Test IoU: mean over the 5 gestures, every point of the test subjects' recordings "
        f"(snapshots every {data['test_hop']} points, outputs averaged).",
        "",
        "| model | strategy | the paper | test IoU, mean ± sd | per seed |",
        "|---|---|---|---|---|",
    ]
    for kind, row in result["models"].items():
        per_seed = ", ".join(_pct(r["iou"]) for r in row["per_seed"])
        lines.append(f"| {kind.replace('_', ' ')} | {row['strategy']} | {_pct(row['paper'])} | "
                     f"{_pct(row['mean'])} ± {100 * row['std']:.2f} | {per_seed} |")
    lines += ["", "Splits (test subjects): " + "; ".join(
        f"seed {s['seed']}: {', '.join(s['test'])}" for s in result["split"]["seeds"]), ""]
    lines += _notes(result)
    for path in result.get("figures", []):
        link = path[len("docs/"):] if path.startswith("docs/") else path
        lines += [f"![{Path(path).stem}]({link})", ""]
    return lines


def _skab(result: dict) -> list[str]:
    op, training = result["operating_point"], result["training"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        "## Multivariate industrial loop: SKAB, MU-Net transferred from the base model",
        "",
        f"Command: `{result['command']}` (code `{result['code_version']}`, seeds {seeds}, "
        f"{result['seconds']:.0f} s on the machine that ran it). SKAB in place of the paper's "
        f"gasoil heating loop. {result['data']['runs']} experiments, 8 channels at 1 s. Split "
        f"by {result['split']['by']}. Inputs normalized per snapshot, or with fixed "
        "per-channel scales of the training runs in the rows marked fixed; "
        f"{training['epochs']} epochs of {training['snapshots_per_epoch']} snapshots, "
        f"{training['optimizer']}, "
        f"{training['loss']}. Each test run streamed through the agent's pipeline (ONNX "
        f"Runtime): snapshot {op['snapshot_length']} s, hop {op['hop']} s, threshold "
        f"{op['threshold']}, on-delay {op['min_duration']:g} s ({op['chosen']}). A row is "
        "predicted anomalous when an alarm covers it; scores are standard, not point-adjusted, "
        "summed over every tested experiment.",
        f"Scratch baseline run: {'yes' if result['scratch_baseline'] else 'no'}.",
        "",
        "| | events detected | false alarms | F1 | FAR % | MAR % |",
        "|---|---|---|---|---|---|",
        f"| the paper, gasoil loop (its own data) | {result['paper']} | | | | |",
    ]
    for kind, row in result["models"].items():
        p = row["pooled"]
        lines.append(f"| {kind.replace('_', ' ')}, all {p['runs']} experiments | "
                     f"{p['detected']} of {p['events']} | {p['false_alarms']} | {p['f1']:.2f} | "
                     f"{p['far']:.2f} | {p['mar']:.2f} |")
        for s in row["per_seed"]:
            lines.append(f"| &nbsp; seed {s['seed']} (fold {s['fold']}) | {s['detected']} of "
                         f"{s['events']} | {s['false_alarms']} | {s['f1']:.2f} | "
                         f"{s['far']:.2f} | {s['mar']:.2f} |")
    lines += ["", "SKAB's leaderboard (outlier detection, its own protocol):", "",
              "| method | F1 | FAR % | MAR % |", "|---|---|---|---|"]
    for name, row in result["leaderboard"].items():
        lines.append(f"| {name} | {row['f1']:.2f} | {row['far']:.2f} | {row['mar']:.2f} |")
    lines += [""] + _notes(result)
    return lines


def _bench_header(result: dict) -> list[str]:
    m = result["machine"]
    return [f"Command: `{result['command']}` (code `{result['code_version']}`, "
            f"{result['started']}), on {m['cpu_model']}, {m['cores']} cores; FP32 peak: "
            f"{m['fp32_peak_assumption']}.", ""]


def _targets_table(result: dict) -> list[str]:
    lines = ["| figure | measured | target | verdict |", "|---|---|---|---|"]
    for t in result.get("targets", []):
        value = "-" if t["value"] is None else f"{t['value']:,.3g}"
        target = "-" if t["target"] is None else f"{t['target']:,.3g}"
        lines.append(f"| {t['figure']} | {value} | {target} | {t['verdict']} |")
    return lines + [""]


def _bench_inference(result: dict) -> list[str]:
    lines = ["## Benchmark: inference", ""] + _bench_header(result)
    for name, model in result["models"].items():
        if "rows" not in model:
            lines += [f"{name}: not measured ({model.get('skipped')}).", ""]
            continue
        lines += [f"**{name}** (C = {model['channels']}, {model['multiply_adds'] / 1e6:.1f} M "
                  "multiply-adds per snapshot)", "",
                  "| backend | batch | snapshots/s | latency median (ms) | share of FP32 peak |",
                  "|---|---|---|---|---|"]
        for row in model["rows"]:
            lines.append(f"| {row['backend']} | {row['batch']} | {row['snapshots_per_s']:,.0f} | "
                         f"{row['latency_ms_median']:.2f} | {row['peak_share']:.0%} |")
        for backend, reason in model.get("not_measured", {}).items():
            lines.append(f"| {backend} | - | not measured: {reason} | | |")
        lines.append("")
    return lines + ["Targets (U-Net, default CPU backend, batch 64):", ""] + _targets_table(result)


def _bench_agent(result: dict) -> list[str]:
    lines = ["## Benchmark: the agent end to end", ""] + _bench_header(result)
    lines += [f"Backend: {result.get('agent_backend')}. 100 channels at once through a real "
              "Mosquitto on loopback.", ""]
    return lines + _targets_table(result)


def write_report(results_dir: Path = ROOT / "results", out: Path = ROOT / "docs" / "results.md"):
    lines = ["# Results", "",
             "Generated by `segwatch-train report` from `results/*.json`; do not edit by hand.",
             ""]
    path = results_dir / "dodgers-unet.json"
    if path.is_file():
        lines += _dodgers(json.loads(path.read_text()))
    cv_rows = [json.loads(p.read_text()) for p in sorted(results_dir.glob("dodgers-cv-*.json"))]
    if cv_rows:
        lines += ["## Dodgers training recipes, compared by cross-validation", "",
                  "Training half only, 3 folds in time; each row is the best operating point "
                  "of a recipe over the held-out folds.", "",
                  "| command | augmentation | best snapshot / threshold | detected | "
                  "false alarms | detected − false alarms |", "|---|---|---|---|---|---|"]
        for r in cv_rows:
            b = r["best"]
            lines.append(f"| `{r['command']}` | {'on' if r['augment'] else 'off'} | "
                         f"{b['snapshot_length']} / {b['threshold']} | {b['detected']} of "
                         f"{b['events']} | {b['false_alarms']} | {r['merit']} |")
        lines.append("")
    for name, section in (("pretrain.json", _pretrain), ("synthetic-curves.json", _curves),
                          ("nab-zero-shot.json", _nab),
                          ("dodgers-transfer.json", _dodgers_transfer), ("emg.json", _emg),
                          ("skab.json", _skab), ("bench-inference.json", _bench_inference),
                          ("bench-agent.json", _bench_agent)):
        path = results_dir / name
        if path.is_file():
            lines += section(json.loads(path.read_text()))
    out.write_text("\n".join(lines))
    return out
