"""`mammoth-fast` error paths: every bad input prints one line naming the
problem (the file, slide, column or flag) and exits non-zero, without a
traceback; `--help` explains every flag; `python -m mammoth_fast` runs the same."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import run_cli
from mammoth_fast.cli import main
from mammoth_fast.data.synthetic import make_synthetic_set, write_trident_h5

TINY = json.dumps({"embed_dim": 8, "attn_dim": 4, "dropout": 0.0})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_synthetic_set(root, layout="trident", num_cases=6, slides_per_case=(1, 1), dim=8, patches=(2, 20),
                              seed=1)


def train_args(data, out, *extra):
    return ["train", "--features", str(data.features_dir), "--labels", str(data.labels_csv), "--model", "abmil.base",
            "--out", str(out), "--folds", "2", "--epochs", "1", "--val-frac", "0", "--overrides", TINY, *extra]


def assert_clean_error(rc, lines, code, *needles):
    assert rc == code, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("mammoth-fast ") and "error: " in lines[0] and "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--lr", "-1"], "--lr: must be > 0"),
    (["--folds", "1"], "--folds: must be at least 2"),
    (["--val-frac", "1.5"], "--val-frac: must be >= 0 and < 1"),
    (["--overrides", "{embed_dim: 8"], "--overrides: not valid JSON"),
    (["--overrides", "[1]"], "--overrides: expected a JSON object"),
    (["--backend", "cuda"], "--backend: invalid choice"),
    (["--batch-size", "two"], "--batch-size: expected an integer"),
])
def test_bad_flag_values(data, tmp_path, capsys, extra, needle):
    assert_clean_error(*run_cli(train_args(data, tmp_path / "out", *extra), capsys), 2, needle)


def test_missing_flag_and_bad_model_name(data, tmp_path, capsys):
    assert_clean_error(*run_cli(["train", "--features", str(data.features_dir)], capsys), 2, "required")
    args = train_args(data, tmp_path / "out")
    args[args.index("abmil.base")] = "abmil.huge"
    assert_clean_error(*run_cli(args, capsys), 2, "--model", "unknown model name 'abmil.huge'")


def test_bad_input_files(data, tmp_path, capsys):
    args = train_args(data, tmp_path / "out")
    swap = lambda flag, value: [value if a == args[args.index(flag) + 1] else a for a in args]  # noqa: E731
    assert_clean_error(*run_cli(swap("--features", str(tmp_path / "nowhere")), capsys), 1, "nowhere: no such features folder")
    assert_clean_error(*run_cli(swap("--labels", str(tmp_path / "none.csv")), capsys), 1, "none.csv: no such label table")
    assert_clean_error(*run_cli([*args, "--label-col", "subtype"], capsys), 1, "no label column 'subtype'")
    assert_clean_error(*run_cli([*args, "--splits", str(tmp_path / "nosplits")], capsys), 1, "no such splits folder")
    assert_clean_error(*run_cli([*args, "--overrides", '{"nonsense": 1}'], capsys), 1, "unknown override(s) ['nonsense']")
    assert_clean_error(*run_cli(swap("--model", "abmil.base.uni"), capsys), 1,
                       "the features are 8 wide but model 'abmil.base.uni' takes 1024")
    missing = tmp_path / "labels.csv"
    missing.write_text(data.labels_csv.read_text() + "case_099,ghost_slide,tumor\n")
    assert_clean_error(*run_cli(swap("--labels", str(missing)), capsys), 1, "slide 'ghost_slide'", "no features file")
    (tmp_path / "out_file").write_text("")
    assert_clean_error(*run_cli(swap("--out", str(tmp_path / "out_file")), capsys), 1, "exists and is not a folder")
    if not torch.cuda.is_available():
        assert_clean_error(*run_cli([*args, "--device", "cuda"], capsys), 1, "no CUDA GPU is available")


def test_several_encoders_need_encoder_flag(data, tmp_path, capsys):
    root = tmp_path / "run"
    for enc in ("uni_v1", "conch_v15"):
        for slide in data.slide_ids:
            write_trident_h5(root / f"features_{enc}" / f"{slide}.h5", np.ones((3, 8), np.float32))
    args = train_args(data, tmp_path / "out")
    args[args.index("--features") + 1] = str(root)
    assert_clean_error(*run_cli(args, capsys), 1, "several encoders' features")
    assert_clean_error(*run_cli([*args, "--encoder", "virchow"], capsys), 1, "no features_virchow/ folder")


@pytest.mark.parametrize("problem", ["nan", "empty", "not_hdf5", "no_features"])
@pytest.mark.parametrize("reader", ["cache", "worker"])
def test_bad_slide_named(data, tmp_path, capsys, problem, reader):
    """A bad bag found while building the cache, or in a DataLoader worker during an epoch."""
    folder = tmp_path / "features_synthetic"
    for slide in data.slide_ids:
        (folder / f"{slide}.h5").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{slide}.h5").write_bytes((data.features_dir / f"{slide}.h5").read_bytes())
    bad = data.slide_ids[-1]
    path = folder / f"{bad}.h5"
    if problem == "nan":
        feats = np.ones((4, 8), np.float16)
        feats[2, 3] = np.nan
        write_trident_h5(path, feats)
    elif problem == "empty":
        write_trident_h5(path, np.zeros((0, 8), np.float16))
    elif problem == "not_hdf5":
        path.write_text("not an HDF5 file")
    else:
        with h5py.File(path, "w") as f:
            f["coords"] = np.zeros((2, 2), np.int64)
    args = train_args(data, tmp_path / "out")
    args[args.index("--features") + 1] = str(folder)
    extra = ["--cache", str(tmp_path / "cache")] if reader == "cache" else ["--workers", "1"]
    message = {"nan": "hold NaN or Inf", "empty": "empty slide", "not_hdf5": "not an HDF5 file",
               "no_features": "no 'features' dataset"}[problem]
    assert_clean_error(*run_cli([*args, *extra], capsys), 1, f"slide {bad!r}", message)


def test_eval_errors(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(data, out)) == 0
    capsys.readouterr()
    ckpt = out / "fold_0" / "checkpoint.pt"
    args = ["eval", "--checkpoint", str(ckpt), "--features", str(data.features_dir), "--labels", str(data.labels_csv),
            "--out", str(tmp_path / "ev")]
    swap = lambda flag, value: [value if a == args[args.index(flag) + 1] else a for a in args]  # noqa: E731
    assert_clean_error(*run_cli(swap("--checkpoint", str(tmp_path / "none.pt")), capsys), 1, "none.pt: no such checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], plain)
    assert_clean_error(*run_cli(swap("--checkpoint", str(plain)), capsys), 1, "not a checkpoint written by mammoth-fast")
    (tmp_path / "junk.pt").write_text("junk")
    assert_clean_error(*run_cli(swap("--checkpoint", str(tmp_path / "junk.pt")), capsys), 1, "cannot be read as a checkpoint")
    other = tmp_path / "other.csv"
    other.write_text(data.labels_csv.read_text().replace(",tumor", ",normal"))
    assert_clean_error(*run_cli(swap("--labels", str(other)), capsys), 1, "label 'normal', not one of the classes")
    wide = tmp_path / "wide"
    for slide in data.slide_ids:
        write_trident_h5(wide / f"{slide}.h5", np.ones((3, 12), np.float32))
    assert_clean_error(*run_cli(swap("--features", str(wide)), capsys), 1, "the features are 12 wide", "takes 8")


def _python_m(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mammoth_fast", *args], capture_output=True, text=True, env=env,
                          timeout=120, **kw)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = ["--features", "--labels", "--model", "--out", "--folds", "--epochs", "--lr", "--weight-decay",
             "--batch-size", "--seed", "--splits", "--label-col", "--slide-col", "--case-col", "--device", "--backend",
             "--cache", "--patience", "--accumulate", "--balanced", "--encoder", "--overrides", "--val-frac",
             "--workers"]
    for flag in flags:  # each flag has its line of help after the usage block
        assert any(line.strip().startswith(flag) and len(line.split()) > 2 or line.strip().startswith(flag + " ")
                   for line in text.split("usage:")[1].split("options:")[1].splitlines()), flag


def test_python_m_clean_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = subprocess.run([sys.executable, "-m", "mammoth_fast", "train", "--features", str(tmp_path / "nowhere"),
                             "--labels", str(tmp_path / "x.csv"), "--model", "abmil.base", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [f"mammoth-fast train: error: {tmp_path / 'x.csv'}: no such label table"]
