"""The ``mammoth-fast`` command (also ``python -m mammoth_fast``):

    mammoth-fast train --features DIR --labels CSV --model NAME --out DIR [options]
    mammoth-fast eval --checkpoint CKPT --features DIR --labels CSV --out DIR [options]
    mammoth-fast heatmap --checkpoint CKPT --features H5|DIR|LIST --out DIR [--slide WSI] [options]
    torchrun --nproc-per-node=G -m mammoth_fast train ...      (data-parallel on G GPUs)

``train`` runs k-fold training and evaluation (:func:`mammoth_fast.train.run_train`),
``eval`` evaluates one of its checkpoints on a label CSV
(:func:`mammoth_fast.train.run_eval`), ``heatmap`` scores and draws slides' patches
with one (:func:`mammoth_fast.heatmap.run_heatmap`). Bad input (a missing or unreadable file,
a slide without features, a wrong column, a bad flag value) prints one line,
``mammoth-fast <command>: error: ...``, and exits non-zero without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

PROG = "mammoth-fast"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, not the usage block: the flag at fault and where the flags are listed."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _float_in(low: float, low_open: bool, high: Optional[float] = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if low_open else value >= low) or (high is not None and not value < high):
            where = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value
    return parse


def _model_name(text: str) -> str:
    from .mil.builder import parse_name

    try:
        parse_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"embed_dim\": 256}}', got {text!r}")
    return value


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    """--features and --labels (train and eval)."""
    p.add_argument("--features", required=True, metavar="DIR",
                   help="slide features: a TRIDENT run folder (holding features_{encoder}/), one features_{encoder}/ "
                        "folder, a CLAM features folder (h5_files/, pt_files/) or a folder of {slide}.h5 / {slide}.pt "
                        "files; any float dtype")
    p.add_argument("--labels", required=True, metavar="CSV",
                   help="label table, one row per slide with its slide id, case (patient) id and label (survival: "
                        "follow-up time and event); labels may be strings (classes: the distinct labels, sorted)")


def _add_column_flags(p: argparse.ArgumentParser, from_checkpoint: bool) -> None:
    """The label CSV's column names and --encoder (train and eval)."""
    for flag, default, what in (("--label-col", "label", "label (classification)"),
                                ("--time-col", "time", "follow-up time (survival; any unit, >= 0)"),
                                ("--event-col", "event", "event indicator (survival; 1: event observed, 0: censored)"),
                                ("--slide-col", "slide_id", "slide id"), ("--case-col", "case_id", "case (patient) id")):
        p.add_argument(flag, default=None if from_checkpoint else default, metavar="NAME",
                       help=f"the CSV's {what} column (default: "
                            + ("the one the checkpoint was trained with, else " if from_checkpoint else "")
                            + f"{default})")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="with a TRIDENT run folder holding several features_{encoder}/ folders: the encoder to use")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """--device, --backend, --workers (train and eval)."""
    from .layer import BACKENDS

    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="Mammoth's backend, for models that use it: auto picks triton on CUDA and sdpa on the CPU "
                        "(default: auto)")
    p.add_argument("--workers", type=_int_at_least(0), default=0, metavar="N",
                   help="DataLoader worker processes reading the feature files (default: 0, read in the main process; "
                        "with --cache reading is cheap)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,heatmap}")

    t = sub.add_parser("train", help="k-fold training and evaluation of a MIL model on slide features",
                       description="k-fold training and evaluation of a MIL model on slide features. Writes "
                                   "OUT/results.json, OUT/results.md, OUT/run.json, OUT/classes.json (classification), "
                                   "OUT/splits/splits_{k}.csv, OUT/fold_{k}/checkpoint.pt and "
                                   "OUT/fold_{k}/predictions.csv (survival: one row per case with its risk, and "
                                   "OUT/fold_{k}/km.png). Several GPUs: "
                                   "torchrun --nproc-per-node=G -m mammoth_fast train ...")
    _add_input_flags(t)
    t.add_argument("--model", required=True, type=_model_name, metavar="NAME",
                   help="create_model name <model>.<config>[.<encoder>], e.g. abmil.base_mammoth; without an "
                        "encoder part the model takes the features' width, with one the widths must agree")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    t.add_argument("--task", choices=("classification", "survival"), default="classification",
                   help="classification of --label-col, or survival: time to event from --time-col and --event-col, "
                        "one outcome per case (default: classification)")
    t.add_argument("--loss", choices=("nll", "cox"), default="nll",
                   help="survival loss: nll, the discrete-time likelihood over --bins time bins (MCAT / Patho-Bench), "
                        "or cox, the Cox partial likelihood over each optimizer step's bags (needs --batch-size x "
                        "--accumulate >= 2; each step gets events where there are enough) (default: nll)")
    t.add_argument("--bins", type=_int_at_least(1), default=4, metavar="K",
                   help="survival: time bins, quantiles of the training cases' uncensored times (the nll loss's "
                        "outputs); the folds are stratified by event and bin (default: 4)")
    t.add_argument("--alpha", type=_float_in(0.0, False, 1.0), default=0.0,
                   help="survival nll: extra weight of the uncensored cases' terms, (1 - alpha) * all + alpha * "
                        "uncensored (MCAT's alpha_surv) (default: 0)")
    t.add_argument("--folds", type=_int_at_least(2), default=None, metavar="K",
                   help="number of folds, split by case, stratified by label (survival: by event and time bin) "
                        "(default: 5; with --splits: the number of splits_{k}.csv files)")
    t.add_argument("--splits", default=None, metavar="DIR",
                   help="reuse these splits: a folder of CLAM's splits_{k}.csv files (columns train, val, test)")
    t.add_argument("--val-frac", type=_float_in(0.0, False, 1.0), default=0.1, metavar="F",
                   help="share of the slides (by case) held out of each fold's training cases for validation "
                        "(model selection, early stopping); 0: none, the last epoch is kept (default: 0.1)")
    t.add_argument("--epochs", type=_int_at_least(1), default=20, metavar="N", help="epochs per fold (default: 20)")
    t.add_argument("--lr", type=_float_in(0.0, True), default=1e-4, help="AdamW learning rate (default: 1e-4)")
    t.add_argument("--weight-decay", type=_float_in(0.0, False), default=1e-5, metavar="WD",
                   help="AdamW weight decay (default: 1e-5)")
    t.add_argument("--batch-size", type=_int_at_least(1), default=1, metavar="B",
                   help="bags per step (per process under torchrun), padded with a mask (default: 1)")
    t.add_argument("--accumulate", type=_int_at_least(1), default=1, metavar="N",
                   help="gradient accumulation: batches per optimizer step (default: 1)")
    t.add_argument("--patience", type=_int_at_least(1), default=None, metavar="N",
                   help="early stopping: stop a fold after N epochs without a lower validation loss (default: "
                        "train every epoch; the epoch of lowest validation loss is kept either way)")
    t.add_argument("--balanced", action="store_true",
                   help="class-balanced sampling: each epoch draws as many slides as the training part holds, "
                        "every class equally often (with replacement)")
    t.add_argument("--seed", type=int, default=0, help="seed of the splits and of fold k's training (seed + k) "
                                                       "(default: 0)")
    _add_column_flags(t, False)
    t.add_argument("--cache", default=None, metavar="DIR",
                   help="build (once; rebuilt when the feature files change) a memory-mapped cache of all bags "
                        "in DIR and read the epochs from it")
    t.add_argument("--heatmaps", action="store_true",
                   help="also write mammoth-fast heatmap's scores and pictures for each fold's test slides into "
                        "OUT/fold_{k}/heatmaps/ (needs .h5 features with coords; a slide without is listed and "
                        "skipped)")
    t.add_argument("--slides", dest="wsi_dir", default=None, metavar="DIR",
                   help="with --heatmaps: whole-slide images (any format openslide reads) matched by slide id, "
                        "drawn under the heatmaps (default: a blank canvas of each slide's extent)")
    t.add_argument("--heatmap-size", type=_int_at_least(64), default=2000, metavar="PX",
                   help="with --heatmaps: the pictures' longest side in pixels (default: 2000)")
    t.add_argument("--overrides", type=_json_object, default={}, metavar="JSON",
                   help="create_model overrides as a JSON object, e.g. '{\"embed_dim\": 256, \"dropout\": 0.1}'")
    _add_run_flags(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint of train on a label CSV",
                       description="Evaluate a checkpoint written by train (OUT/fold_{k}/checkpoint.pt) on every "
                                   "slide of a label CSV; writes OUT/predictions.csv and OUT/metrics.json.")
    e.add_argument("--checkpoint", required=True, metavar="CKPT", help="a fold_{k}/checkpoint.pt of train")
    _add_input_flags(e)
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    _add_column_flags(e, True)
    e.add_argument("--batch-size", type=_int_at_least(1), default=1, metavar="B",
                   help="bags per forward (default: 1)")
    _add_run_flags(e)

    from .heatmap.command import add_parser as add_heatmap_parser

    add_heatmap_parser(sub, _int_at_least, _model_name)  # mammoth_fast.heatmap.run_heatmap
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; 0 on success, 1 on bad input (one line on stderr), 2 on bad flags."""
    args = build_parser().parse_args(argv)
    if args.command == "heatmap":
        from .heatmap.command import run as run_heatmap_command

        return run_heatmap_command(args, PROG)
    from .data import DataError
    from .train import TrainError, TrainSettings, close_runtime, init_runtime, run_eval, run_train

    try:
        rt = init_runtime(args.device)
        try:
            if args.command == "train":
                settings = TrainSettings(model=args.model, overrides=args.overrides, epochs=args.epochs, lr=args.lr,
                                         weight_decay=args.weight_decay, batch_size=args.batch_size,
                                         accumulate=args.accumulate, patience=args.patience, balanced=args.balanced,
                                         backend=args.backend, workers=args.workers, task=args.task, loss=args.loss,
                                         bins=args.bins, alpha=args.alpha)
                run_train(args.features, args.labels, args.model, args.out, settings, folds=args.folds,
                          seed=args.seed, splits_dir=args.splits, val_frac=args.val_frac, label_col=args.label_col,
                          slide_col=args.slide_col, case_col=args.case_col, encoder=args.encoder,
                          cache_dir=args.cache, rt=rt, time_col=args.time_col, event_col=args.event_col,
                          heatmaps=args.heatmaps, wsi_dir=args.wsi_dir, heatmap_size=args.heatmap_size)
            else:
                run_eval(args.checkpoint, args.features, args.labels, args.out, label_col=args.label_col,
                         slide_col=args.slide_col, case_col=args.case_col, encoder=args.encoder,
                         batch_size=args.batch_size, backend=args.backend, workers=args.workers, rt=rt,
                         time_col=args.time_col, event_col=args.event_col)
        finally:
            close_runtime(rt)
    except (DataError, TrainError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
