"""Reading slide bags from TRIDENT and CLAM feature folders (mammoth_fast.data.features)
on synthetic sets written here, and every bad input's error."""
import h5py
import numpy as np
import pytest
import torch

from mammoth_fast.data import DataError, FeatureFolder, detect_layout, read_bag, read_features
from mammoth_fast.data.synthetic import make_synthetic_set, write_clam_h5, write_pt, write_trident_h5

# bags of 1 to 250 patches here; 5,000 in test_big_bags_and_trident_chunks only, to stay quick
SIZES = [1, 2, 37, 3, 64, 1, 250, 9, 17, 120, 5, 33, 2, 80, 11, 4, 60, 7, 1, 90, 3, 12, 45, 6, 30]


def _set(tmp_path, layout, dtype, formats=("h5",)):
    """6 cases of 1-3 slides, slide i of SIZES[i % len(SIZES)] patches."""
    return make_synthetic_set(tmp_path, layout, num_cases=6, dim=24, sizes=SIZES, dtype=dtype, formats=formats,
                              seed=0)


def _written(path):
    """What the writer put in a file, read back raw: features (N, D), coords or None."""
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True).numpy(), None
    with h5py.File(path, "r") as f:
        return f["features"][()], f["coords"][()]


@pytest.mark.parametrize("layout", ["trident", "clam"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_reads_every_bag_exactly(tmp_path, layout, dtype):
    syn = _set(tmp_path, layout, dtype, formats=("h5", "pt"))
    assert len(syn.slide_ids) > 6 and len(set(syn.case_ids)) == 6  # several slides per case
    folder = FeatureFolder(syn.features_dir, expected_dim=24)
    assert folder.layout.kind == layout
    for i, slide in enumerate(syn.slide_ids):
        n = SIZES[i % len(SIZES)]
        path = folder.path(slide)
        assert path.suffix == ".h5"  # preferred to the .pt: it has the coords
        raw, coords = _written(path)
        assert raw.dtype == dtype and raw.shape == (n, 24)
        feats = folder[slide]
        assert feats.dtype == torch.float32 and torch.equal(feats, torch.from_numpy(raw.astype(np.float32)))
        bag = folder.bag(slide)
        assert torch.equal(bag.features, feats) and bag.coords.dtype == torch.int64
        assert torch.equal(bag.coords, torch.from_numpy(coords.astype(np.int64)))
        pt_raw, _ = _written(folder.layout.pt_dir / f"{slide}.pt")
        assert torch.equal(read_features(folder.layout.pt_dir / f"{slide}.pt"), torch.from_numpy(pt_raw).float())


def test_big_bags_and_trident_chunks(tmp_path):
    rng = np.random.default_rng(1)
    big16 = rng.standard_normal((5000, 24), dtype=np.float32).astype(np.float16)
    big32 = rng.standard_normal((5000, 24), dtype=np.float32)
    trident = write_trident_h5(tmp_path / "features_uni" / "big.h5", big16, encoder="uni")
    clam = write_clam_h5(tmp_path / "clam" / "h5_files" / "big.h5", big32)
    with h5py.File(trident, "r") as f:
        assert f["features"].chunks == (1, 24) and f["coords"].chunks == (1, 2)  # as TRIDENT writes
    bag = FeatureFolder(tmp_path / "features_uni").bag("big")
    assert torch.equal(bag.features, torch.from_numpy(big16).float()) and bag.coords.shape == (5000, 2)
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["patch_size"] == 256
    assert bag.attrs["name"] == "big" and isinstance(bag.attrs["name"], str)
    bag = FeatureFolder(tmp_path / "clam").bag("big")
    assert torch.equal(bag.features, torch.from_numpy(big32)) and bag.attrs == {}
    assert bag.coords.dtype == torch.int64 and bag.coords.shape == (5000, 2)
    # a .pt holds the features alone
    pt = read_bag(write_pt(tmp_path / "x.pt", np.ones((3, 24), np.float16)))
    assert pt.coords is None and pt.attrs == {} and pt.features.dtype == torch.float32


def test_other_float_dtypes_become_float32(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 5))
    torch.save(torch.from_numpy(x).to(torch.bfloat16), tmp_path / "bf16.pt")
    assert torch.equal(read_features(tmp_path / "bf16.pt"), torch.from_numpy(x).to(torch.bfloat16).float())
    write_clam_h5(tmp_path / "f64.h5", x)
    assert torch.equal(read_features(tmp_path / "f64.h5"), torch.from_numpy(x).float())
    torch.save(x.astype(np.float16), tmp_path / "numpy.pt")  # a numpy array in a .pt
    assert torch.equal(read_features(tmp_path / "numpy.pt"), torch.from_numpy(x.astype(np.float16)).float())


def test_layouts_detected(tmp_path):
    syn = make_synthetic_set(tmp_path / "run", "trident", num_cases=2, patches=(1, 3), encoder="uni_v1")
    run = tmp_path / "run"
    assert detect_layout(run).h5_dir == run / "features_uni_v1"  # a TRIDENT run folder
    assert detect_layout(run / "features_uni_v1").kind == "trident"
    write_trident_h5(run / "features_conch_v15" / "a.h5", np.ones((2, 3), np.float16))
    with pytest.raises(DataError, match="several encoders.*features_conch_v15, features_uni_v1"):
        detect_layout(run)
    assert detect_layout(run, encoder="conch_v15").h5_dir == run / "features_conch_v15"
    with pytest.raises(DataError, match="no features_gigapath/"):
        detect_layout(run, encoder="gigapath")
    clam = make_synthetic_set(tmp_path / "clam", "clam", num_cases=2, patches=(1, 3), formats=("pt",))
    layout = detect_layout(clam.features_dir)
    assert layout.kind == "clam" and layout.h5_dir is None and layout.pt_dir == tmp_path / "clam" / "pt_files"
    assert detect_layout(tmp_path / "clam" / "pt_files").kind == "clam"
    assert FeatureFolder(clam.features_dir)[clam.slide_ids[0]].dtype == torch.float32
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no slide features found"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere: no such features folder"):
        detect_layout(tmp_path / "nowhere")
    # a label table's slide id may keep the image's suffix
    assert FeatureFolder(syn.features_dir).path(syn.slide_ids[0] + ".svs").name == syn.slide_ids[0] + ".h5"


def _bad(path, what):
    """Write a bad features file of kind ``what`` at ``path``."""
    good = np.ones((4, 8), np.float32)
    if what == "not_hdf5":
        path.write_text("slide_id,label\n")
    elif what == "no_features":
        with h5py.File(path, "w") as f:
            f["coords"] = np.zeros((4, 2), np.int64)
    elif what == "empty":
        write_trident_h5(path, np.zeros((0, 8), np.float16))
    elif what == "nan":
        good[2, 3] = np.nan
        write_clam_h5(path, good)
    elif what == "inf":
        good[1, 0] = -np.inf
        write_trident_h5(path, good.astype(np.float16))
    elif what == "ints":
        write_clam_h5(path, good.astype(np.int32))
    elif what == "one_d":
        write_clam_h5(path, good[0])
    elif what == "coords":
        write_trident_h5(path, good, coords=np.zeros((3, 2), np.int64))
    elif what == "pt_garbage":
        path.write_bytes(b"not a pickle")
    elif what == "pt_dict":
        torch.save({"features": torch.ones(4, 8)}, path)
    return path


@pytest.mark.parametrize("what, suffix, message", [
    ("not_hdf5", ".h5", "not an HDF5 file"),
    ("no_features", ".h5", r"no 'features' dataset \(holds: coords\)"),
    ("empty", ".h5", r"empty slide \(0 patches\)"),
    ("nan", ".h5", r"1 of 4 patches hold NaN or Inf \(first: row 2\)"),
    ("inf", ".h5", r"1 of 4 patches hold NaN or Inf \(first: row 1\)"),
    ("ints", ".h5", "features must be floating point, got int32"),
    ("one_d", ".h5", r"features must be \(N patches, D\), got shape \(8,\)"),
    ("coords", ".h5", r"coords have shape \(3, 2\), expected \(4, 2\)"),
    ("pt_garbage", ".pt", "cannot be read as a PyTorch features file"),
    ("pt_dict", ".pt", r"holds a dict, expected the features tensor \(N, D\)"),
])
def test_bad_file_errors_name_the_file(tmp_path, what, suffix, message):
    path = _bad(tmp_path / f"slide_{what}{suffix}", what)
    with pytest.raises(DataError, match=message) as info:
        read_bag(path)
    assert str(path) in str(info.value)
    # through a folder, the error names the slide as well
    with pytest.raises(DataError, match=message) as info:
        FeatureFolder(tmp_path).bag(f"slide_{what}")
    assert str(info.value).startswith(f"slide 'slide_{what}' ({path}): ")


def test_missing_file_and_wrong_width(tmp_path):
    write_trident_h5(tmp_path / "features_uni" / "s1.h5", np.ones((3, 16), np.float16))
    folder = FeatureFolder(tmp_path, expected_dim=1024)
    with pytest.raises(DataError, match=r"slide 's1' \(.*s1.h5\): feature width 16, expected 1024"):
        folder["s1"]
    with pytest.raises(DataError, match=r"slide 's2': no features file \(looked for .*features_uni/s2.h5, "
                                        r".*features_uni/s2.pt\)"):
        folder["s2"]
    with pytest.raises(DataError, match=r"s3.h5: no such file"):
        read_bag(tmp_path / "s3.h5")
    assert "s1" in folder and "s2" not in folder
    assert FeatureFolder(tmp_path).width(["s1"]) == 16
    write_trident_h5(tmp_path / "features_uni" / "s4.h5", np.ones((3, 12), np.float16))
    with pytest.raises(DataError, match="slide 's4' .*feature width 12, but slide 's1' has 16"):
        FeatureFolder(tmp_path).width(["s1", "s4"])
