"""python -m htnet train|evaluate|synth|preprocess

Exit codes: 0 done, 1 training failed (diverged) or some samples failed to preprocess, 2 bad input (one line on
stderr)."""
import argparse
import sys
from pathlib import Path

import pandas as pd

from htnet.checkpoint import continued_config, prepare_folder
from htnet.data import CROP_MODES, load_release, make_synthetic, synthetic_cache
from htnet.errors import ArgumentParser, TrainingDiverged, UserError
from htnet.io import ensure_writable_dir, parse_yaml, read_yaml, write_files
from htnet.loso import (COMPILE_MODES, ENGINES, OPTIMIZERS, LosoConfig, check_environment, evaluate_weights,
                        lone_subjects_warning, parse_subjects, run_loso, select_subjects)
from htnet.metrics import PROTOCOLS, per_subject_accuracy, summary_table
from htnet.models import list_models
from htnet.preprocess import TVL1_PARAMS, preprocess

SYNTH_CACHE = ".cache/htnet-synth"
# LosoConfig keys with a `train` flag of the same name (besides the data flags model, device, crop_mode)
TRAIN_FLAGS = {
    **{key: {"type": int} for key in ("epochs", "batch_size", "seed", "inner_val_subjects", "inner_patience",
                                     "eval_every")},
    "lr": {"type": float}, "weight_decay": {"type": float}, "optimizer": {"choices": list(OPTIMIZERS)},
    "shuffle": {"action": "store_true", "default": None, "help": "shuffle each epoch (the reference does not)"},
    "engine": {"choices": list(ENGINES),
               "help": "batched: fold-models trained together; plain: one at a time, the reference recipe"},
    "fold_group_size": {"type": int, "help": "batched engine: fold-models per group (default: what memory allows)"},
    "save_weights": {"action": "store_true", "default": None,
                     "help": "write <out>/weights/<subject>.pth (the paper protocol's epoch, else the last)"},
    "bf16": {"action": argparse.BooleanOptionalAction, "default": None,
             "help": "bf16 autocast for grouped HTNet on a GPU that supports it (default: on)"},
    "compile": {"choices": COMPILE_MODES[1:], "help": "torch.compile the grouped model (default: off)"},
}


def model_args(pairs):
    """['dim=64', 'block_repeats=[1,1]'] -> {'dim': 64, 'block_repeats': [1, 1]}."""
    config = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--model-arg {pair!r} is not KEY=VALUE")
        config[key.strip()] = parse_yaml(value, f"--model-arg {pair}")
    return config


def load_data(args):
    """--data PATH, or the built-in synthetic set when none is given."""
    if not args.data and args.synth_subjects < 1:
        raise UserError(f"--synth-subjects must be at least 1, got {args.synth_subjects}")
    root = Path(args.data) if args.data else synthetic_cache(SYNTH_CACHE, args.synth_subjects)
    if not args.data:
        print(f"no --data given: using the built-in synthetic set at {root}", file=sys.stderr)
    return load_release(root, landmarks=args.landmarks, standardize=args.standardize,
                        min_samples_per_subject=args.min_samples_per_subject)


def add_data_arguments(p):
    p.add_argument("--data", help="release folder (default: the built-in synthetic set)")
    p.add_argument("--synth-subjects", type=int, default=4, help="subjects per dataset of the synthetic set")
    p.add_argument("--landmarks", default="auto", help="auto (the release's landmarks CSV), template, or a CSV path")
    p.add_argument("--standardize", action="store_true", help="per-channel standardisation")
    p.add_argument("--min-samples-per-subject", type=int, default=1, help="reject subjects with fewer samples")
    p.add_argument("--subjects", help="comma-separated subject ids, or a count taken across datasets")
    p.add_argument("--model", choices=list_models(), help="default: the --config file's model, else htnet")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="e.g. dim=64, block_repeats=[1,1,2]")
    p.add_argument("--crop-mode", default="reference", choices=CROP_MODES)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def build_parser():
    parser = ArgumentParser(prog="python -m htnet", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="LOSO cross-validation of one configuration")
    add_data_arguments(train)
    train.add_argument("--config", help="YAML file of LOSO config keys (flags override it)")
    for key, options in TRAIN_FLAGS.items():
        train.add_argument("--" + key.replace("_", "-"), **options)
    train.add_argument("--protocols", help=f"comma-separated, from {','.join(PROTOCOLS)}")
    train.add_argument("--out", default="outputs/train", help="folder for predictions, metrics, weights")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out (killed, or stopped): train only the folds not done")
    again.add_argument("--overwrite", action="store_true", help="clear the run in --out first")

    evaluate = commands.add_parser("evaluate", help="test every subject with saved per-subject weights")
    add_data_arguments(evaluate)
    evaluate.add_argument("--weights", required=True, help="folder of <subject>.pth state_dicts")
    evaluate.add_argument("--out", default="outputs/evaluate")

    synth = commands.add_parser("synth", help="write the synthetic composite in the release layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--subjects-per-dataset", type=int, default=4)
    synth.add_argument("--seed", type=int, default=0)

    pre = commands.add_parser("preprocess", help="raw onset/apex frames -> release flow images")
    pre.add_argument("--index", required=True, metavar="INDEX.csv",
                     help="dataset,subject,sample,label,onset[,apex,offset,source,face_x,face_y,face_w,face_h]")
    pre.add_argument("--frames-root", required=True, metavar="DIR", help="the index's paths are relative to it")
    pre.add_argument("--out", required=True, metavar="DIR", help="output folder (release layout)")
    pre.add_argument("--workers", type=int, help="parallel processes (default: number of CPU cores)")
    pre.add_argument("--face-size", type=int, default=224, help="face side for the flow, 0: the frame's (default 224)")
    pre.add_argument("--landmarks", metavar="CSV", help="sample, left_eye_x ... mouth_right_y in apex-face pixels")
    pre.add_argument("--no-progress", action="store_true")
    tvl1 = pre.add_argument_group("TV-L1 optical flow (OpenCV defaults)")
    for name, (default, typ, text) in TVL1_PARAMS.items():
        tvl1.add_argument("--tvl1-" + name.rstrip("_").replace("_", "-"), dest="tvl1_" + name, type=typ,
                          default=default, metavar=typ.__name__.upper(), help=f"{text} (default {default})")
    return parser


def train_config(args):
    """The --config file's LOSO keys under the flags; an error in a value from the file names the file."""
    from_file = read_yaml(args.config) if args.config else None
    from_file = {} if from_file is None else from_file
    if not isinstance(from_file, dict):
        raise UserError(f"{args.config}: expected a mapping of LOSO config keys, got a {type(from_file).__name__}")
    if from_file.get("model_config") is None:
        from_file.pop("model_config", None)
    elif not isinstance(from_file["model_config"], dict):
        raise UserError(f"{args.config}: model_config must be a mapping, got {from_file['model_config']!r}")
    flags = {key: getattr(args, key) for key in ["model", "device", "crop_mode", *TRAIN_FLAGS]}
    flags.update(subjects=parse_subjects(args.subjects), standardize=args.standardize or None,
                 protocols=args.protocols.split(",") if args.protocols else None,
                 model_config={**from_file.get("model_config", {}), **model_args(args.model_arg)})
    try:
        return LosoConfig.from_dict({**from_file, **{k: v for k, v in flags.items() if v is not None}})
    except UserError as e:
        if args.config and _error_of(from_file) == str(e):
            raise UserError(f"{args.config}: {e}") from None
        raise


def _error_of(values):
    try:
        LosoConfig.from_dict(values)
    except UserError as e:
        return str(e)


def cmd_train(args):
    config = train_config(args)
    check_environment()   # before --overwrite clears anything
    out = prepare_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        config = continued_config(out, config)   # before the data is read: a mismatch is told at once
    out = ensure_writable_dir(out)
    data = select_subjects(load_data(args), config.subjects)
    warning = lone_subjects_warning(data)
    if warning:
        print(warning, file=sys.stderr)
    result = run_loso(config, data, out_dir=out, resume=args.resume)
    metrics = result.metrics
    resumed = (f" ({metrics['fold_epochs_resumed']} kept from earlier attempts, {metrics['fold_epochs_attempt']} "
               f"trained in attempt {metrics['attempt']})") if args.resume else ""
    print(f"\n{config.model} LOSO on {data.source}: {result.folds_done} subjects, "
          f"{result.fold_epochs} fold-epochs{resumed}, {result.wall_time_s:.0f} s on {result.device}")
    print(summary_table(result.metrics, config.protocols).round(4).to_string())
    print(f"results in {out}/ (predictions.csv, metrics.json, history.csv, config.yaml"
          f"{', weights/' if config.save_weights else ''})")
    return 0


def cmd_evaluate(args):
    config = LosoConfig.from_dict({"model": args.model or "htnet", "model_config": model_args(args.model_arg),
                                   "crop_mode": args.crop_mode, "device": args.device,
                                   "subjects": parse_subjects(args.subjects), "protocols": ["final"]})
    out = ensure_writable_dir(args.out)
    predictions, metrics = evaluate_weights(args.weights, load_data(args), config)
    write_files({out / "predictions.csv": predictions.to_csv(index=False),  # as LosoResult.save: all or none
                 out / "metrics.json": pd.Series(metrics, dtype=float).to_json(indent=2)})
    print(per_subject_accuracy(predictions).round(3).to_string(index=False))
    print(summary_table(metrics, ["weights"]).round(4).to_string())
    print(f"results in {out}/ (predictions.csv, metrics.json)")
    return 0


def cmd_synth(args):
    root = make_synthetic(args.out, subjects_per_dataset=args.subjects_per_dataset, seed=args.seed)
    print(load_release(root).summary().to_string())
    print(f"written to {root}")
    return 0


def cmd_preprocess(args):
    tvl1 = {name: getattr(args, "tvl1_" + name) for name in TVL1_PARAMS}
    summary = preprocess(args.index, args.frames_root, args.out, workers=args.workers, face_size=args.face_size,
                         landmarks=args.landmarks, progress=not args.no_progress, **tvl1)
    failed = summary["failed"]
    print(f"preprocessed {summary['ok']} of {summary['total']} samples into {summary['out']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} failed:", *(f"  {sample}: {why}" for sample, why in failed), sep="\n", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "synth": cmd_synth, "preprocess": cmd_preprocess}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
