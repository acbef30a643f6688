"""`mammoth-fast heatmap` (mammoth_fast.heatmap): expert scores computed in chunks
equal the ones from the model's whole dispatch weights; per-patch attention per
model; coords and patch sizes from TRIDENT and CLAM h5 files; pictures, scores.csv
and top patches on a synthetic tiled TIFF read through openslide; clear errors
for bad input; the command end to end."""
import csv
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LargestTensor, run_cli
from mammoth_fast import Mammoth
from mammoth_fast.cli import main
from mammoth_fast.data import DataError, read_bag
from mammoth_fast.data.synthetic import write_trident_h5
from mammoth_fast.heatmap import (HeatmapOptions, load_model, patch_layout, routing_scores, score_slide,
                                  scores_from_weights, write_heatmaps)
from mammoth_fast.heatmap import render
from mammoth_fast.heatmap.run import prediction
from mammoth_fast.heatmap.scores import SlideScores, _attention_source
from mammoth_fast.heatmap.synthetic import make_synthetic_slide, write_tiled_tiff
from mammoth_fast.mil import create_model
from mammoth_fast.train import CHECKPOINT_FORMAT, TrainError, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 8
MOE = {"num_experts": 3, "num_slots": 2, "num_heads": 2, "slot_dim": 8, "auto_rank": False, "lora_rank": 2,
       "dropout": 0.0}
TINY = {"embed_dim": 8, "attn_dim": 4, "dropout": 0.0}
CLASSES = ["benign", "tumor"]
SMALL = dict(size=256, grid_size=64, topk=2)


def tiny(name, seed=0, **extra):
    torch.manual_seed(seed)
    overrides = {**TINY, **({"moe_args": MOE} if "mammoth" in name else {}), **extra, "in_dim": DIM}
    return create_model(name, len(CLASSES), **overrides).eval(), overrides


def write_checkpoint(path, name, seed=0):
    net, overrides = tiny(name, seed)
    save_checkpoint(path, net, {"format": CHECKPOINT_FORMAT, "model_name": name, "num_classes": len(CLASSES),
                                "classes": CLASSES, "overrides": overrides, "in_dim": DIM, "fold": 0, "columns": {}})
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 1024 x 768 synthetic slide (TIFF) with TRIDENT and CLAM h5 files, and checkpoints."""
    root = tmp_path_factory.mktemp("heatmap")
    trident = make_synthetic_slide(root, "slide_a", width=1024, height=768, patch=128, dim=DIM)
    clam = make_synthetic_slide(root, "slide_a", width=1024, height=768, patch=128, dim=DIM, layout="clam",
                                write_slide=False)
    return {"root": root, "trident": trident, "clam": clam,
            "moe": write_checkpoint(root / "moe.pt", "abmil.base_mammoth"),
            "plain": write_checkpoint(root / "plain.pt", "abmil.base")}


# ------------------------------------------------------------------ scores
@pytest.mark.parametrize("keep_slots", [True, False])
def test_chunked_scores_equal_the_dispatch_weights(keep_slots):
    net, _ = tiny("abmil.base_mammoth", moe_args={**MOE, "keep_slots": keep_slots})
    net = net.double()
    with torch.no_grad():
        net.patch_embed.norm.gamma.uniform_(1.0, 3.0)  # peaked routing
    h = torch.randn(37, DIM, dtype=torch.float64)
    with torch.no_grad():
        out = net(h, return_attention=True, return_moe_weights=True)
    expected = scores_from_weights(out["moe_weights"])  # (N, E) from (1, N, E, H, S)
    slot_attention = out["attention"][0] if keep_slots else None  # (E*S,)
    for chunk in (1, 5, 37, 100):
        scores, attention = routing_scores(net.patch_embed, h, slot_attention, chunk=chunk)
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(scores.sum(1), torch.ones(37, dtype=torch.float64), rtol=0, atol=1e-12)
        if keep_slots:
            w = out["moe_weights"][0]  # (N, E, H, S)
            mapped = torch.einsum("nehs,es->n", w, slot_attention.view(3, 2)) / 2
            torch.testing.assert_close(attention, mapped, rtol=0, atol=1e-12)
            assert abs(float(attention.sum()) - 1) < 1e-12


def test_scores_stay_finite_where_a_patch_weights_underflow():
    torch.manual_seed(0)
    layer = Mammoth(DIM, 8, num_experts=3, num_slots=2, num_heads=2, slot_dim=8, use_layernorm=False,
                    auto_rank=False, lora_rank=2).eval()
    with torch.no_grad():
        layer.norm.gamma.fill_(40.0)  # logits in the thousands: exp(L - lse) underflows in float32
    scores, _ = routing_scores(layer, torch.randn(50, DIM), chunk=7)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(50))


def test_chunked_scores_of_200k_patches_hold_chunks_only():
    torch.manual_seed(0)
    layer = Mammoth(4, 4, num_experts=4, num_slots=8, num_heads=2, slot_dim=4, auto_rank=False,
                    lora_rank=1).eval()  # H * P = 64 per patch
    n, chunk = 200_000, 2048
    feats = torch.randn(n, 4)
    with LargestTensor() as mode:
        scores, _ = routing_scores(layer, feats, chunk=chunk)
    assert scores.shape == (n, 4) and torch.isfinite(scores).all()
    assert mode.largest <= max(n * 4, chunk * 64 * 2)  # (N, E) out, chunk-sized logits; never N x H x P (12.8M)


def test_attention_per_model():
    n = 20
    h = torch.randn(n, DIM)
    for name in ("abmil.base", "dsmil.base", "abmil.base_mammoth"):
        net, _ = tiny(name)
        with torch.no_grad():
            out = net(h, return_attention=True, return_moe_weights=True)
        result = score_slide(net, h)
        assert result.predicted == int(out["logits"][0].argmax())
        np.testing.assert_allclose(result.probs, out["logits"][0].softmax(-1).numpy(), rtol=1e-6)
        if name == "dsmil.base":  # per class: the predicted class's row
            np.testing.assert_allclose(result.attention, out["attention"][0, result.predicted].numpy(), rtol=1e-6)
        elif name == "abmil.base":
            np.testing.assert_allclose(result.attention, out["attention"][0].numpy(), rtol=1e-6)
            assert result.experts is None
        else:  # attention over the slots, brought to the patches
            np.testing.assert_allclose(result.experts, scores_from_weights(out["moe_weights"]).numpy(), atol=1e-6)
            assert abs(result.attention.sum() - 1) < 1e-5 and "slot tokens" in result.attention_note
    layer = tiny("abmil.base_mammoth")[0].patch_embed
    attention, slots, note = _attention_source(net, torch.rand(1, 4 * 6), 0, n, layer)  # e.g. DTFD's pseudo-bag slots
    assert attention is None and slots is None and "no per-patch attention" in note


def test_prediction_of_classification_and_survival_checkpoints():
    z = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    scores = SlideScores(z, torch.from_numpy(z).softmax(-1).numpy(), 2, None, None, "")
    assert prediction(scores, {"classes": ["a", "b", "c"]})["predicted_class"] == "c"
    assert prediction(scores, None)["probabilities"].keys() == {"0", "1", "2"}
    survival = prediction(scores, {"task": "survival", "loss": "nll"})
    curve = np.cumprod(1 - 1 / (1 + np.exp(-z)))  # survival through each bin
    np.testing.assert_allclose(survival["survival"], curve, rtol=1e-6)
    assert survival["risk"] == pytest.approx(-curve.sum(), rel=1e-6) and "predicted_class" not in survival
    assert prediction(scores, {"task": "survival", "loss": "cox"})["risk"] == pytest.approx(0.5)


# ------------------------------------------------------------------ coords
def test_patch_sizes_from_trident_and_clam_attributes(site, tmp_path):
    import openslide

    wsi = openslide.OpenSlide(str(site["trident"].slide))
    trident = patch_layout(read_bag(site["trident"].features), "t", wsi)
    clam = patch_layout(read_bag(site["clam"].features), "c")
    assert (trident.patch_size, trident.width, trident.height) == (128, 1024, 768)
    assert clam.patch_size == 128 and clam.source == "patch_size x downsample attributes"
    np.testing.assert_array_equal(clam.coords, site["clam"].coords)
    bag = read_bag(site["clam"].features)
    del bag.attrs["downsample"]  # CLAM's patch_level with the slide's own downsample (4 at level 1)
    assert patch_layout(bag, "c", wsi).patch_size == 128
    bag.attrs = {}
    with pytest.raises(DataError, match=r"c: the coords carry no level-0 patch size .*--patch-size"):
        patch_layout(bag, "c")
    assert patch_layout(bag, "c", patch_size=100).patch_size == 100


def test_raster_averages_overlapping_patches_and_ranks_ties():
    coords = np.array([[0, 0], [50, 0]])
    raster = render.Raster(coords, 100, (200, 100), (20, 10))  # 10 level-0 px per pixel
    painted = raster.paint(np.array([1.0, 3.0]))
    np.testing.assert_allclose(painted[0, [0, 4, 5, 9, 10, 14]], [1, 1, 2, 2, 3, 3])
    assert np.isnan(painted[0, 15:]).all() and raster.owner is None
    np.testing.assert_allclose(render.percentile_ranks(np.array([5.0, 1.0, 5.0, 3.0])), [5 / 6, 0, 5 / 6, 1 / 3])


# ------------------------------------------------------------------ outputs
def read_scores(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.asarray(rows[1:], dtype=np.float64)


def test_outputs_over_the_slide(site, tmp_path):
    slide = site["trident"]
    net, meta = load_model(site["moe"], in_dim=DIM)
    summary = write_heatmaps(net, [slide.features], tmp_path, slides={"slide_a": slide.slide}, meta=meta,
                             options=HeatmapOptions(experts=[0, 2], **SMALL), progress=False)
    out = tmp_path / "slide_a"
    header, table = read_scores(out / "scores.csv")
    assert header == ["x", "y", "attention", "expert_0", "expert_1", "expert_2"]
    np.testing.assert_array_equal(table[:, :2], slide.coords)
    expected = score_slide(net, read_bag(slide.features).features)
    np.testing.assert_allclose(table[:, 3:], expected.experts, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(table[:, 2], expected.attention, rtol=1e-6, atol=1e-9)
    prediction = json.loads((out / "prediction.json").read_text())
    assert prediction == summary["slides"][0] and prediction["predicted_class"] in CLASSES
    assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-6

    import openslide

    thumb = openslide.OpenSlide(str(slide.slide)).get_thumbnail((256, 256)).size  # (256, 192)
    bar = render.colorbar(thumb[1], render.lookup_table("turbo"), ("0%", "100%")).width
    for name in ("expert_0.png", "expert_2.png", "attention.png"):
        assert Image.open(out / name).size == (thumb[0] + bar, thumb[1])
    assert not (out / "expert_1.png").exists()
    assert Image.open(out / "argmax_expert.png").height == thumb[1]
    assert Image.open(out / "experts_grid.png").height > 64
    for e in (0, 2):
        files = prediction["top_patches"][str(e)]
        best = np.argsort(-expected.experts[:, e], kind="stable")[:2]
        for rank, (name, i) in enumerate(zip(files, best)):
            x, y = slide.coords[i]
            assert name == f"top_patches/expert_{e}/rank{rank:02d}_x{x}_y{y}.png"
            np.testing.assert_array_equal(np.asarray(Image.open(out / name)), slide.image[y:y + 128, x:x + 128])
        assert (out / "top_patches" / f"expert_{e}.png").is_file()
    # a second run with other experts into the same folder leaves no map of the first run's
    write_heatmaps(net, [slide.features], tmp_path, meta=meta, options=HeatmapOptions(experts=[1], **SMALL),
                   progress=False)
    assert sorted(p.name for p in out.glob("expert_*.png")) == ["expert_1.png"]


def test_clam_features_on_a_blank_canvas_without_mammoth(site, tmp_path):
    net, meta = load_model(site["plain"], in_dim=DIM)
    write_heatmaps(net, [site["clam"].features], tmp_path, meta=meta, options=HeatmapOptions(**SMALL),
                   progress=False)
    out = tmp_path / "slide_a"
    header, _ = read_scores(out / "scores.csv")
    assert header == ["x", "y", "attention"]
    assert sorted(p.name for p in out.iterdir()) == ["attention.png", "prediction.json", "scores.csv"]
    assert Image.open(out / "attention.png").height == 192  # the extent 1024 x 768 scaled to 256 x 192


# ------------------------------------------------------------------ bad input
def test_bad_features_and_slides(site, tmp_path):
    net, _ = load_model(site["moe"], in_dim=DIM)
    go = lambda h5, slide=None, **kw: write_heatmaps(  # noqa: E731
        net, [h5], tmp_path / "out", slides=None if slide is None else {h5.stem: slide},
        options=HeatmapOptions(**{**SMALL, **kw}), progress=False)
    feats = np.random.default_rng(0).standard_normal((4, DIM)).astype(np.float32)
    far = write_trident_h5(tmp_path / "far.h5", feats, np.array([[0, 0], [128, 0], [9000, 0], [0, 128]]))
    with h5py.File(far, "a") as f:
        f["coords"].attrs.update({"level0_width": 1024, "level0_height": 768})
    with pytest.raises(DataError, match=r"slide 'far' .*far.h5\): 1 of 4 patches lie outside the slide's level-0 "
                                        r"extent 1024 x 768 \(the slide's\), e.g. \(x, y\) = \(9000, 0\)"):
        go(far, site["trident"].slide)
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f["features"], f["coords"] = feats, np.zeros((3, 2), dtype=np.int64)
    with pytest.raises(DataError, match=r"short.h5\): coords have shape \(3, 2\), expected \(4, 2\)"):
        go(tmp_path / "short.h5")
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f["features"] = feats
    with pytest.raises(DataError, match=r"bare.h5\): no coords"):
        go(tmp_path / "bare.h5")
    wide = write_trident_h5(tmp_path / "wide.h5", np.zeros((4, DIM + 1), np.float32))
    with pytest.raises(DataError, match=r"wide.h5\): features are 9 wide but the model takes 8"):
        go(wide)
    (tmp_path / "fake.tiff").write_text("not a slide")
    with pytest.raises(DataError, match=r"openslide cannot open slide .*fake.tiff"):
        go(site["trident"].features, tmp_path / "fake.tiff")
    other = write_tiled_tiff(tmp_path / "other.tiff", np.zeros((512, 512, 3), np.uint8), levels=1)
    with pytest.raises(DataError, match=r"come from a slide of 1024 x 768 .* the slide given is 512 x 512"):
        go(site["trident"].features, other)
    with pytest.raises(TrainError, match=r"--experts: expert 3 is out of range: the model has 3 experts \(0..2\)"):
        go(site["trident"].features, experts=[0, 3])
    with pytest.raises(TrainError, match=r"heatmap option normalize='rank' cannot work"):
        go(site["trident"].features, normalize="rank")
    plain, _ = load_model(site["plain"], in_dim=DIM)
    with pytest.raises(TrainError, match="--experts: ABMIL has no Mammoth layer"):
        write_heatmaps(plain, [site["trident"].features], tmp_path, options=HeatmapOptions(experts=[0]))
    summary = write_heatmaps(net, [tmp_path / "bare.h5", site["trident"].features], tmp_path / "skip",
                             options=HeatmapOptions(**SMALL), progress=False, skip_errors=True)
    assert [s["slide_id"] for s in summary["slides"]] == ["slide_a"]
    assert summary["errors"][0]["slide_id"] == "bare" and "no coords" in summary["errors"][0]["error"]


def test_checkpoints(site, tmp_path):
    with pytest.raises(TrainError, match=r"moe.pt was trained as model 'abmil.base_mammoth' .*, not 'clam.base'"):
        load_model(site["moe"], "clam.base", DIM)
    with pytest.raises(TrainError, match=r"not 'abmil.base_mammoth.uni'"):  # the encoder's width is not the features'
        load_model(site["moe"], "abmil.base_mammoth.uni", DIM)
    with pytest.raises(DataError, match=r"the features are 16 wide but checkpoint .*moe.pt takes 8"):
        load_model(site["moe"], None, 16)
    torch.manual_seed(3)
    net = create_model("abmil.base", 3, in_dim=DIM).eval()  # the config's own sizes, as MIL-Lab's checkpoints have
    torch.save({f"model.{k}": v for k, v in net.state_dict().items()}, tmp_path / "millab.pt")  # MIL-Lab's keys
    with pytest.raises(TrainError, match=r"millab.pt: not a checkpoint written by mammoth-fast train; .* \(--model\)"):
        load_model(tmp_path / "millab.pt", None, DIM)
    with pytest.raises(TrainError, match=r"cannot build model 'clam.base'.*does not match"):
        load_model(tmp_path / "millab.pt", "clam.base", DIM)
    loaded, meta = load_model(tmp_path / "millab.pt", "abmil.base", DIM)
    assert meta["num_classes"] == 3 and meta["classes"] == ["0", "1", "2"]  # read from the classifier's weight
    h = torch.randn(9, DIM)
    torch.testing.assert_close(loaded(h)["logits"], net(h)["logits"])


# ------------------------------------------------------------------ the command
def test_command_end_to_end(site, tmp_path, capsys):
    slide = site["trident"]
    b = make_synthetic_slide(tmp_path, "slide_b", width=512, height=512, patch=128, dim=DIM, seed=1)
    listing = tmp_path / "slides.txt"
    listing.write_text(f"# features, slide\n{slide.features},{slide.slide}\n{b.features}\n")
    args = ["heatmap", "--checkpoint", str(site["moe"]), "--features", str(listing), "--out", str(tmp_path / "out"),
            "--size", "128", "--topk", "1", "--experts", "1", "--slides", str(b.slide.parent), "--model",
            "abmil.base_mammoth", "--alpha", "0.5", "--normalize", "minmax", "--chunk", "5", "--cmap", "viridis"]
    rc, lines = run_cli(args, capsys)
    assert rc == 0, lines
    summary = json.loads((tmp_path / "out" / "heatmaps.json").read_text())
    assert [s["slide_id"] for s in summary["slides"]] == ["slide_a", "slide_b"]
    assert [s["slide"] for s in summary["slides"]] == [str(slide.slide), str(b.slide)]
    assert (tmp_path / "out" / "slide_b" / "top_patches" / "expert_1.png").is_file()
    rc, lines = run_cli([*args, "--model", "clam.base"], capsys)
    assert rc == 1 and lines == [f"mammoth-fast heatmap: error: checkpoint {site['moe']} was trained as model "
                                 "'abmil.base_mammoth' (features 8 wide), not 'clam.base'"]
    for flag, value, needle in (("--alpha", "0", "must be > 0 and <= 1"), ("--cmap", "nope", "unknown colormap"),
                                ("--experts", "1,x", "expected 'all' or expert indices")):
        rc, lines = run_cli([*args, flag, value], capsys)
        assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    rc, lines = run_cli(["heatmap", "--checkpoint", str(site["moe"]), "--features", str(slide.features.parent),
                         "--out", str(tmp_path / "o2"), "--slide", str(slide.slide)], capsys)
    assert rc == 1 and "--slide names one slide but" in lines[0]


def test_help_explains_every_flag(capsys):
    import argparse

    from mammoth_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["heatmap"]
    flags = {a.option_strings[-1]: a.help for a in sub._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {"--checkpoint", "--features", "--out", "--model", "--num-classes", "--slide", "--slides",
                          "--experts", "--topk", "--size", "--cmap", "--attention-cmap", "--alpha", "--normalize",
                          "--patch-size", "--chunk", "--encoder", "--device", "--backend"}
    assert all(len(text) > 20 for text in flags.values()), flags
    with pytest.raises(SystemExit) as exit_:
        main(["heatmap", "--help"])
    assert exit_.value.code == 0 and "--attention-cmap" in capsys.readouterr().out
