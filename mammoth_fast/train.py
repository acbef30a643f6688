"""One training loop for every dataset: k-fold training and evaluation of a
``create_model`` name on slide features (the ``mammoth-fast train`` and
``mammoth-fast eval`` commands, :mod:`mammoth_fast.cli`), also used by the
real-data examples (MUSK, UCSB, MNIST-bags: :mod:`mammoth_fast.examples.train`).

Per fold (:func:`fit`): everything seeded with ``seed + fold`` (python, numpy,
torch), the model built by ``create_model``, AdamW (or the examples' Adam),
bf16 autocast on CUDA, bags padded with a mask into batches of
``batch_size`` (a batch of one bag goes without a mask), gradients accumulated
over ``accumulate`` batches, an epoch order drawn from a numpy generator
seeded per fold (or class-balanced draws), model selection on the validation
loss (the state with the lowest one is kept; optional early stopping after
``patience`` epochs without a lower one), a tqdm progress bar.

Several processes (``torchrun --nproc-per-node=G -m mammoth_fast train ...``):
DistributedDataParallel (NCCL on CUDA, gloo on CPU). Every process draws the
same epoch order; each global batch of ``G * batch_size`` bags is shared out,
``batch_size`` bags per process, and DDP averages the gradients, so G processes
at ``batch_size`` B take the steps one process takes at ``G * B`` (the loss
is a mean over each process's bags). The order is padded to a multiple of G by
repeating its first bags (as torch's DistributedSampler does). Evaluation is
shared out too, the logits gathered on every process; process 0 writes the
outputs and builds the features cache while the others wait.

What is learnt and measured is a task (:mod:`mammoth_fast.tasks`):
classification, or survival (``settings.task``; the NLL or Cox losses of
:mod:`mammoth_fast.survival`).

Outputs of :func:`run_train` under ``out``: ``results.json``, ``results.md``,
``run.json`` (settings, per fold the epoch kept and the loss history),
``classes.json`` (classification), ``splits/splits_{k}.csv`` (+ ``_bool``,
``_descriptor``), ``fold_{k}/checkpoint.pt``, ``fold_{k}/predictions.csv`` and,
for survival, ``fold_{k}/km.png``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import (DataError, FeatureFolder, SlideDataset, Split, collate_padded, load_or_build_cache, make_splits,
                   read_labels, read_splits, write_splits)
from .data.survival import read_survival_labels
from .layer import BACKENDS
from .mil.builder import ENCODER_DIMS, create_model, load_config, parse_name
from .tasks import (METRICS, Classification, Predictions, Survival, compute_metrics, epoch_order,  # noqa: F401
                    write_predictions)

PathLike = Union[str, Path]
CHECKPOINT_FORMAT = "mammoth_fast.train/1"


class TrainError(ValueError):
    """Settings that cannot work (a model name or override that create_model
    refuses, a device that is not there, a checkpoint not written by
    :func:`run_train`); the message stands alone, as :class:`DataError`'s."""


@dataclass
class TrainSettings:
    """How :func:`fit` trains one fold."""
    model: str  # create_model name, '<model>.<config>[.<encoder>[.<task>]]'
    overrides: Dict[str, Any] = field(default_factory=dict)  # create_model overrides (in_dim among them, see model_overrides)
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 1  # bags per step and process
    accumulate: int = 1  # batches whose gradients make one optimizer step
    patience: Optional[int] = None  # early stopping: epochs without a lower val loss; None trains all epochs
    balanced: bool = False  # class-balanced draws (with replacement) instead of a shuffle
    optimizer: str = "adamw"  # "adamw", or "adam" (the examples' protocol, Ilse et al. 2018)
    backend: str = "auto"  # Mammoth's backend; auto: triton on CUDA, sdpa elsewhere
    workers: int = 0  # DataLoader worker processes reading the bags
    task: str = "classification"  # or "survival" (mammoth_fast.tasks)
    loss: str = "nll"  # survival: "nll" (discrete time) or "cox" (partial likelihood over each optimizer step)
    bins: int = 4  # survival: time bins of the nll loss, and of the folds' strata
    alpha: float = 0.0  # survival nll: weight of the uncensored terms, (1 - alpha) * all + alpha * uncensored


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its device and its place among the DDP processes."""
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on process 0 while the others wait; a DataError or
        TrainError it raises is raised on every process."""
        error = None
        if self.main:
            try:
                fn()
            except (DataError, TrainError) as exc:
                error = exc
        if self.world > 1:
            box = [None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                error = (DataError if box[0][0] == "DataError" else TrainError)(box[0][1])
        if error is not None:
            raise error


CPU = Runtime(torch.device("cpu"))


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' (CUDA device ``local_rank`` when there is one, else the CPU), 'cpu',
    'cuda' (device ``local_rank``) or 'cuda:N'."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device {name!r}: no CUDA GPU is available (use --device cpu)")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise TrainError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def init_runtime(device: str = "auto") -> Runtime:
    """This process's Runtime; under torchrun (WORLD_SIZE > 1) it joins the
    process group (NCCL on CUDA, gloo on CPU) and takes GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, dist.get_rank(), world)


def close_runtime(rt: Runtime) -> None:
    """Leave the process group (all processes together)."""
    if rt.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator


def _parse(name: str):
    try:
        return parse_name(name)
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def model_overrides(name: str, in_dim: int, overrides: Optional[dict] = None) -> dict:
    """The create_model overrides that build ``name`` for features ``in_dim``
    wide: ``overrides`` plus ``in_dim`` when the name has no encoder part;
    with one, features of another width are a DataError."""
    overrides = dict(overrides or {})
    _, _, encoder, _ = _parse(name)
    if "in_dim" in overrides:
        raise TrainError("in_dim cannot be overridden: it follows the features' width (or the name's encoder)")
    if len(name.split(".")) < 3:
        return {**overrides, "in_dim": in_dim}
    if ENCODER_DIMS[encoder] != in_dim:
        raise DataError(f"the features are {in_dim} wide but model {name!r} takes {ENCODER_DIMS[encoder]} "
                        f"(encoder {encoder!r}): name the encoder that made these features, or leave the encoder "
                        f"part out ({'.'.join(name.split('.')[:2])}) to take the features' width")
    return overrides


def _moe_args(name: str, overrides: dict) -> Optional[dict]:
    """The moe_args that ``name`` built with ``overrides`` gets (None without any)."""
    model, config, _, _ = _parse(name)
    return overrides.get("moe_args", load_config(model, config).get("moe_args"))


def uses_mammoth(name: str, overrides: dict) -> bool:
    """Whether ``name`` built with ``overrides`` has a Mammoth patch embedding."""
    moe = _moe_args(name, overrides)
    return bool(moe) and moe.get("num_experts", 0) > 0


def backend_for(backend: str, device: torch.device) -> str:
    """Mammoth's backend: 'auto' is triton on CUDA and sdpa elsewhere."""
    if backend not in BACKENDS:
        raise TrainError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainError(f"the triton backend needs a CUDA device, not {device} (use --backend sdpa or eager, or set "
                         "TRITON_INTERPRET=1 to run the kernels under the slow Triton interpreter)")
    return backend


def build_model(name: str, num_classes: int, overrides: dict, backend: str = "auto",
                device: torch.device = CPU.device, checkpoint_path: Optional[PathLike] = None) -> nn.Module:
    """create_model(name, num_classes, checkpoint_path, **overrides) on ``device``,
    Mammoth's backend set in moe_args (:func:`backend_for`) when the model has one."""
    overrides = dict(overrides)
    if uses_mammoth(name, overrides):
        overrides["moe_args"] = {**_moe_args(name, overrides), "backend": backend_for(backend, device)}
    try:
        net = create_model(name, num_classes, checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
                           **overrides)
    except (ValueError, TypeError) as exc:
        raise TrainError(f"cannot build model {name!r}: {exc}") from None
    return net.to(device)


class _Guarded(Dataset):
    """A dataset whose DataError comes back as the item, so that it leaves a
    DataLoader worker as itself (a worker's exception comes back wrapped in
    its traceback's text)."""

    def __init__(self, dataset: SlideDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except DataError as exc:
            return exc


def _collate(items):
    bad = next((x for x in items if isinstance(x, DataError)), None)
    return bad if bad is not None else collate_padded(items)


def _loader(dataset: SlideDataset, batches: List[List[int]], workers: int, generator: torch.Generator,
            device: torch.device):
    """The padded batches (PaddedBatch) of ``batches`` (lists of indices);
    ``generator`` seeds the workers (torch's global generator is not drawn)."""
    loader = DataLoader(_Guarded(dataset), batch_sampler=batches, collate_fn=_collate, num_workers=workers,
                        generator=generator, pin_memory=device.type == "cuda")
    for batch in loader:
        if isinstance(batch, DataError):
            raise batch
        yield batch.to(device, non_blocking=True)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _forward(model: nn.Module, batch, **kwargs) -> dict:
    """The model on a padded batch; a single bag goes without its (all-True) mask."""
    mask = batch.mask if batch.features.shape[0] > 1 else None
    return model(batch.features, mask=mask, **kwargs)


def rank_batches(order: np.ndarray, batch_size: int, rt: Runtime) -> List[List[int]]:
    """This process's batches of an epoch's ``order``: the order padded to a
    multiple of the process count by repeating its start, process r taking
    every world-th index from r, in batches of ``batch_size`` (so global batch
    k is ``order[k*world*batch_size : (k+1)*world*batch_size]``)."""
    order = [int(i) for i in order]
    if rt.world > 1 and len(order) % rt.world:
        order += order[:rt.world - len(order) % rt.world]
    mine = order[rt.rank::rt.world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def predict(net: nn.Module, dataset: SlideDataset, batch_size: int = 1, rt: Runtime = CPU,
            workers: int = 0) -> Predictions:
    """``net``'s logits on every slide of ``dataset`` in eval mode, batches of
    ``batch_size`` in the dataset's order; under DDP each process takes every
    world-th slide and the logits are gathered on all of them."""
    net.eval()
    mine = list(range(rt.rank, len(dataset), rt.world))
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    logits = []
    for batch in _loader(dataset, batches, workers, torch.Generator(), rt.device):
        with _autocast(rt.device):
            logits.append(_forward(net, batch)["logits"].float().cpu())  # (B, C)
    local = torch.cat(logits).numpy() if logits else np.zeros((0, net.num_classes), np.float32)
    full = np.zeros((len(dataset), net.num_classes), np.float32)  # (S, C)
    for idx, part in rt.gather((mine, local)):
        full[idx] = part
    return Predictions(list(dataset.slide_ids), np.asarray(dataset.labels, dtype=np.int64), full)


@dataclass
class Fit:
    """A trained fold: the model holding the kept state, that state's epoch and
    the per-epoch losses."""
    model: nn.Module
    best_epoch: int
    history: List[Dict[str, float]]


def _optimizer(settings: TrainSettings, net: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    if settings.optimizer == "adam":  # fused: the default per-parameter loop dominates small CPU models' steps
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    raise TrainError(f"unknown optimizer {settings.optimizer!r}: adamw or adam")


def fit(settings: TrainSettings, task: Union[int, Classification, Survival], train_set: SlideDataset,
        val_set: Optional[SlideDataset], seed: int, rt: Runtime = CPU, bar: Optional[tqdm] = None) -> Fit:
    """Train one fold (see the module's docstring) on ``task`` (a number of
    classes is classification). Without ``val_set`` (or an empty one) the last
    epoch's state is kept. ``bar`` advances by one per epoch. A task whose loss
    spans the optimizer step (Cox) gets it over all the step's bags, one backward."""
    if isinstance(task, int):
        task = Classification([str(c) for c in range(task)])
    if task.step_loss and rt.world > 1:
        raise TrainError("the Cox loss under torchrun is not supported (its risk sets would span processes): "
                         "train with one process, or with --loss nll")
    seed_everything(seed)
    net = build_model(settings.model, task.num_outputs, settings.overrides, settings.backend, rt.device)
    model = net
    if rt.world > 1:  # unused parameters: DSMIL's, RRT's and WiKG's (as MIL-Lab's) get no gradient
        model = DistributedDataParallel(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                        find_unused_parameters=True)
    opt = _optimizer(settings, net)
    order_rng = np.random.default_rng(seed)
    draw = torch.Generator().manual_seed(seed)  # class-balanced draws and DataLoader worker seeds
    use_val = val_set is not None and len(val_set) > 0
    best_state, best_loss, best_epoch, stale = None, math.inf, -1, 0
    history: List[Dict[str, float]] = []
    for epoch in range(settings.epochs):
        net.train()
        order = task.epoch_order(train_set, settings.balanced, settings.batch_size * settings.accumulate,
                                 order_rng, draw)
        batches = rank_batches(order, settings.batch_size, rt)
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (loss sum, losses)
        held: List[tuple] = []  # step_loss: (logits, slide ids) of the step's batches so far
        for i, batch in enumerate(_loader(train_set, batches, settings.workers, draw, rt.device)):
            start = i - i % settings.accumulate
            group = min(settings.accumulate, len(batches) - start)  # batches in this optimizer step
            step = i - start == group - 1
            with model.no_sync() if rt.world > 1 and not step else contextlib.nullcontext():
                with _autocast(rt.device):
                    out = _forward(model, batch, **task.forward_kwargs(batch))
                if task.step_loss:
                    held.append((out["logits"], batch.slide_ids))
                    loss = None
                    if step:
                        loss = task.loss({"logits": torch.cat([h[0] for h in held])},
                                         [s for h in held for s in h[1]])
                        loss.backward()
                        held = []
                else:
                    loss = task.loss(out, batch.slide_ids)
                    (loss / group).backward()
            if loss is not None:
                total += torch.stack([loss.detach().double(), loss.new_ones((), dtype=torch.float64)])
            if step:
                opt.step()
                opt.zero_grad(set_to_none=True)
        if rt.world > 1:
            dist.all_reduce(total)
        record = {"epoch": epoch, "train_loss": float(total[0] / total[1].clamp(min=1))}
        if use_val:
            record["val_loss"] = task.val_loss(predict(net, val_set, settings.batch_size, rt, settings.workers))
            if record["val_loss"] < best_loss:
                best_loss, best_epoch, stale = record["val_loss"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
        history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
        if settings.patience is not None and use_val and stale >= settings.patience:
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    net.eval()
    return Fit(net, best_epoch, history)


def save_checkpoint(path: PathLike, net: nn.Module, meta: dict) -> None:
    """Write ``{"state_dict": ..., **meta}``: create_model's ``checkpoint_path``
    (and mammoth_fast.checkpoints.read_state_dict) read the state_dict from it."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, **meta}, path)


def read_checkpoint_meta(path: PathLike) -> dict:
    """What :func:`run_train` stored beside a checkpoint's state_dict (model_name,
    num_classes, classes, overrides, in_dim, columns, ...)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a checkpoint written by mammoth-fast train (a bare state_dict loads with "
                         "create_model(name, num_classes, checkpoint_path=...))")
    return {k: v for k, v in ckpt.items() if k != "state_dict"}


def load_trained(path: PathLike, backend: str = "auto", device: torch.device = CPU.device):
    """(model in eval mode, meta) from a checkpoint that :func:`run_train` wrote,
    rebuilt as ``create_model(meta['model_name'], meta['num_classes'],
    checkpoint_path=path, **meta['overrides'])``."""
    meta = read_checkpoint_meta(path)
    net = build_model(meta["model_name"], meta["num_classes"], meta["overrides"], backend, device, checkpoint_path=path)
    return net.eval(), meta


def summarize(per_fold: Sequence[Dict[str, Optional[float]]]):
    """(mean, std) over folds of each metric (population std; undefined values left out; None if all are)."""
    mean, std = {}, {}
    for key in per_fold[0]:
        vals = np.asarray([np.nan if f[key] is None else f[key] for f in per_fold], dtype=float)
        finite = vals[np.isfinite(vals)]
        mean[key] = float(finite.mean()) if finite.size else None
        std[key] = float(finite.std()) if finite.size else None
    return mean, std


def results_markdown(results: dict, title: str) -> str:
    """The mean ± std table (and per-fold values) of results.json's test metrics."""
    def cell(x):
        return "–" if x is None else f"{x:.3f}"

    folds = results["folds"]
    what = (f"survival, {results['loss']} loss" + (f" over {results['bins']} time bins" if results.get("bins") else "")
            if results.get("task") == "survival" else f"classes: {', '.join(results['classes'])}")
    lines = [f"# {title}", "", f"Test metrics over {len(folds)} folds, mean ± std (population std over folds); "
             f"{what}.", "",
             "| metric | mean ± std | " + " | ".join(f"fold {f['fold']}" for f in folds) + " |",
             "|---|---:|" + "---:|" * len(folds)]
    for key in results["mean"]:
        m, s = results["mean"][key], results["std"][key]
        lines.append(f"| {key} | {'–' if m is None else f'{m:.3f} ± {s:.3f}'} | "
                     + " | ".join(cell(f["test"][key]) for f in folds) + " |")
    return "\n".join(lines) + "\n"


def _fold_heatmaps(net: nn.Module, folder: FeatureFolder, slide_ids: Sequence[str], out: Path,
                   wsi_dir: Optional[PathLike], meta: dict, size: int, progress: bool, fold: int) -> None:
    """``mammoth-fast heatmap``'s outputs for a fold's test slides (see :func:`run_train`)."""
    from .heatmap import HeatmapOptions, write_heatmaps  # (the heatmap package imports this module)

    items = [(s, folder.path(s), None) for s in slide_ids]
    summary = write_heatmaps(net, items, out, slides=wsi_dir, meta=meta, options=HeatmapOptions(size=size),
                             progress=progress, skip_errors=True)
    if summary["errors"]:
        first = summary["errors"][0]
        warnings.warn(f"fold {fold}: no heatmap for {len(summary['errors'])} of {len(items)} test slides (listed in "
                      f"{out / 'heatmaps.json'}); first, {first['slide_id']!r}: {first['error']}")


def check_task_settings(settings: TrainSettings) -> None:
    """TrainError for a task setting that cannot work."""
    from .survival import LOSSES

    if settings.task not in ("classification", "survival"):
        raise TrainError(f"unknown task {settings.task!r}: classification or survival")
    if settings.task != "survival":
        return
    if settings.loss not in LOSSES:
        raise TrainError(f"unknown survival loss {settings.loss!r}: choose one of {', '.join(LOSSES)}")
    if settings.balanced:
        raise TrainError("--balanced draws classes equally often; survival has no classes (leave it out)")
    if settings.bins < 1:
        raise TrainError(f"bins must be at least 1, got {settings.bins}")
    if not 0.0 <= settings.alpha < 1.0:
        raise TrainError(f"alpha must be in [0, 1), got {settings.alpha}")
    if settings.loss == "cox" and settings.batch_size * settings.accumulate < 2:
        raise TrainError("the Cox loss compares the cases of an optimizer step, so it needs several bags per step: "
                         "raise --batch-size or --accumulate (their product is the bags per step; e.g. --accumulate 16)")


def _features_width(folder: FeatureFolder, slide_id: str) -> int:
    shape, _ = folder.shape(slide_id)
    if len(shape) != 2:
        raise DataError(f"slide {slide_id!r} ({folder.path(slide_id)}): features must be (N patches, D), "
                        f"got shape {shape}")
    return int(shape[1])


def run_train(features: PathLike, labels: PathLike, model: str, out: PathLike, settings: TrainSettings,
              folds: Optional[int] = None, seed: int = 0, splits_dir: Optional[PathLike] = None,
              val_frac: float = 0.1, label_col: str = "label", slide_col: str = "slide_id",
              case_col: str = "case_id", encoder: Optional[str] = None, cache_dir: Optional[PathLike] = None,
              rt: Runtime = CPU, progress: bool = True, time_col: str = "time", event_col: str = "event",
              heatmaps: bool = False, wsi_dir: Optional[PathLike] = None, heatmap_size: int = 2000) -> dict:
    """k-fold training of ``model`` on a features folder and label CSV (the
    ``mammoth-fast train`` command); writes the outputs listed in the module's
    docstring on process 0 and returns the results.json dict. Splits come from
    ``splits_dir`` (CLAM's splits_{k}.csv files, ``folds`` must then be None
    or their number) or are made by case (``folds``, default 5, ``val_frac``,
    ``seed``). ``settings.model`` and ``settings.overrides`` are set here from
    ``model`` and the features' width. ``settings.task`` "survival" reads the
    label CSV's ``time_col`` and ``event_col`` (:func:`read_survival_labels`)
    instead of ``label_col``; its folds are stratified by event and time bin.
    ``heatmaps``: each fold's test slides get ``mammoth-fast heatmap``'s scores
    and pictures (thumbnails ``heatmap_size`` wide) in ``fold_{k}/heatmaps/``,
    over their whole-slide images from ``wsi_dir`` (matched by slide id) when
    given; a slide that cannot be drawn (a .pt file without coords, a bad
    slide) is listed in ``heatmaps.json`` and warned about, the others are drawn."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a folder")
    _parse(model)
    check_task_settings(settings)
    if wsi_dir is not None and not heatmaps:
        raise TrainError("--slides gives the whole-slide images under the heatmaps: add --heatmaps")
    survival = settings.task == "survival"
    if survival:
        table = read_survival_labels(labels, time_col=time_col, event_col=event_col, slide_col=slide_col,
                                     case_col=case_col, strata_bins=settings.bins)
    else:
        table = read_labels(labels, label_col=label_col, slide_col=slide_col, case_col=case_col)
    if splits_dir is not None:
        splits = read_splits(splits_dir, table)
        if folds is not None and folds != len(splits):
            raise TrainError(f"{splits_dir} holds {len(splits)} splits, not --folds {folds}")
    else:
        splits = make_splits(table, folds=5 if folds is None else folds, val_frac=val_frac, seed=seed)
    used = {s for split in splits for part in split for s in part}
    slide_ids = [s for s in table.slide_ids if s in used]  # (table order)
    folder = FeatureFolder(features, encoder=encoder)
    SlideDataset(table, folder, slide_ids)  # every slide has a features file (DataError naming the first that has none)
    in_dim = _features_width(folder, slide_ids[0])
    folder.expected_dim = in_dim  # every read checks the width
    overrides = model_overrides(model, in_dim, settings.overrides)
    settings = TrainSettings(**{**asdict(settings), "model": model, "overrides": overrides})
    store = folder
    if cache_dir is not None:
        rt.on_main(lambda: load_or_build_cache(folder, slide_ids, cache_dir, progress=progress))
        store = load_or_build_cache(folder, slide_ids, cache_dir, progress=False)  # fresh now: opened, not rebuilt

    def write_inputs():
        out.mkdir(parents=True, exist_ok=True)
        write_splits(splits, out / "splits", table)
        if not survival:
            table.save_classes(out / "classes.json")

    rt.on_main(write_inputs)
    columns = ({"time": time_col, "event": event_col} if survival else {"label": label_col}) | \
        {"slide": slide_col, "case": case_col}
    fold_results, fold_runs = [], []
    for k, split in enumerate(splits):
        start = time.perf_counter()
        parts = {name: SlideDataset(table, store, [str(s) for s in ids])  # (make_splits gives numpy strings)
                 for name, ids in zip(Split._fields, split)}
        task = (Survival(table, settings.loss, parts["train"].slide_ids, settings.bins, settings.alpha,
                         where=f"fold {k}'s training part") if survival else Classification(table.classes))
        with tqdm(total=settings.epochs, desc=f"fold {k}", unit="epoch", disable=not (progress and rt.main),
                  leave=False) as bar:
            fitted = fit(settings, task, parts["train"], parts["val"], seed + k, rt, bar)
        evals = {name: predict(fitted.model, parts[name], settings.batch_size, rt, settings.workers)
                 for name in ("val", "test") if len(parts[name])}
        metrics = {name: task.metrics(p) for name, p in evals.items()}
        if "val" in evals:
            metrics["val"]["loss"] = task.val_loss(evals["val"])
        if survival and "test" in evals and not table.events[[table.index[s] for s in parts["test"].slide_ids]].any():
            warnings.warn(f"fold {k}: the test part ({len(parts['test'])} slides) has no event; its concordance "
                          "indices are undefined (null in results.json)")
        fold_results.append({"fold": k, "val": metrics.get("val", {}), "test": metrics.get("test", {})})
        fold_runs.append({"fold": k, "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                          "seconds": time.perf_counter() - start, "history": fitted.history,
                          "slides": {name: len(p) for name, p in parts.items()}, **({"bin_edges": task.meta()["bin_edges"]}
                                                                                     if survival else {})})
        if rt.main:
            fold_dir = out / f"fold_{k}"
            fold_dir.mkdir(exist_ok=True)
            save_checkpoint(fold_dir / "checkpoint.pt", fitted.model, {
                "format": CHECKPOINT_FORMAT, "model_name": model, **task.meta(), "overrides": overrides,
                "in_dim": in_dim, "fold": k, "columns": columns})
            if "test" in evals:
                task.write_predictions(fold_dir / "predictions.csv", evals["test"])
                if survival:
                    task.km_plot(fold_dir / "km.png", evals["test"], f"fold {k}, test")
                if heatmaps:
                    _fold_heatmaps(fitted.model, folder, parts["test"].slide_ids, fold_dir / "heatmaps", wsi_dir,
                                   {**task.meta(), "model_name": model}, heatmap_size, progress, k)
            test = metrics.get("test", {})
            print(f"fold {k}: " + ", ".join(f"{key} {'–' if test.get(key) is None else f'{test[key]:.3g}'}"
                                            for key in task.metric_keys)
                  + f" (epoch {fitted.best_epoch} kept of {len(fitted.history)})", flush=True)
    tested = [f["test"] for f in fold_results if f["test"]]
    if not tested:
        raise DataError("no fold has a test part: nothing to evaluate")
    mean, std = summarize(tested)
    head = ({"task": "survival", "loss": settings.loss, "bins": settings.bins if settings.loss == "nll" else None}
            if survival else {"classes": list(table.classes)})
    results = {**head, "folds": fold_results, "mean": mean, "std": std}
    if rt.main:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        md = results_markdown(results, f"{model} on {Path(labels).name}")
        (out / "results.md").write_text(md)
        run = {"features": str(features), "labels": str(labels), "model": model, "out": str(out), "seed": seed,
               "splits": None if splits_dir is None else str(splits_dir), "val_frac": val_frac,
               "encoder": encoder, "cache": None if cache_dir is None else str(cache_dir), "columns": columns,
               "in_dim": in_dim, "settings": asdict(settings), "device": str(rt.device), "processes": rt.world,
               "torch": torch.__version__, "folds": fold_runs}
        (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
        print(md, flush=True)
    return results


def run_eval(checkpoint: PathLike, features: PathLike, labels: PathLike, out: PathLike,
             label_col: Optional[str] = None, slide_col: Optional[str] = None, case_col: Optional[str] = None,
             encoder: Optional[str] = None, batch_size: int = 1, backend: str = "auto", workers: int = 0,
             rt: Runtime = CPU, time_col: Optional[str] = None, event_col: Optional[str] = None) -> dict:
    """Evaluate a checkpoint of :func:`run_train` on every slide of a label CSV
    (the ``mammoth-fast eval`` command): writes ``out/predictions.csv`` and
    ``out/metrics.json`` (and ``out/km.png`` for survival) and returns the
    metrics.json dict. Columns default to the ones the checkpoint was trained
    with; labels are mapped to its classes. A survival checkpoint keeps its time
    bins; the IPCW metrics estimate the censoring from the evaluated cases."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a folder")
    meta = read_checkpoint_meta(checkpoint)
    columns = meta.get("columns", {})
    slide_col, case_col = slide_col or columns.get("slide", "slide_id"), case_col or columns.get("case", "case_id")
    survival = meta.get("task") == "survival"
    if survival:
        table = read_survival_labels(labels, time_col=time_col or columns.get("time", "time"),
                                     event_col=event_col or columns.get("event", "event"), slide_col=slide_col,
                                     case_col=case_col)
        task = Survival(table, meta["loss"], table.slide_ids, alpha=meta["alpha"], edges=meta["bin_edges"],
                        where=str(labels))
    else:
        table = read_labels(labels, label_col=label_col or columns.get("label", "label"), slide_col=slide_col,
                            case_col=case_col, classes=meta["classes"])
        task = Classification(meta["classes"])
    folder = FeatureFolder(features, encoder=encoder)
    dataset = SlideDataset(table, folder)
    width = _features_width(folder, table.slide_ids[0])
    if width != meta["in_dim"]:
        raise DataError(f"the features are {width} wide (slide {table.slide_ids[0]!r}) but checkpoint {checkpoint} "
                        f"takes {meta['in_dim']}")
    folder.expected_dim = width
    net, _ = load_trained(checkpoint, backend, rt.device)
    preds = predict(net, dataset, batch_size, rt, workers)
    metrics = task.metrics(preds)
    metrics["loss"] = task.val_loss(preds)
    head = {"task": "survival", "loss": meta["loss"]} if survival else {"classes": list(meta["classes"])}
    result = {"checkpoint": str(checkpoint), "model_name": meta["model_name"], **head, "slides": len(dataset),
              "metrics": metrics}
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        task.write_predictions(out / "predictions.csv", preds)
        if survival:
            task.km_plot(out / "km.png", preds, Path(labels).name)
        (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        print(", ".join(f"{k} {'–' if v is None else f'{v:.3g}'}" for k, v in metrics.items()), flush=True)
    return result


__all__ = ["CHECKPOINT_FORMAT", "CPU", "Fit", "METRICS", "Predictions", "Runtime", "TrainError", "TrainSettings",
           "build_model", "close_runtime", "compute_metrics", "epoch_order", "fit", "init_runtime", "load_trained",
           "model_overrides", "predict", "rank_batches", "read_checkpoint_meta", "resolve_device", "results_markdown",
           "run_eval", "run_train", "save_checkpoint", "seed_everything", "summarize", "uses_mammoth",
           "write_predictions"]
