"""Launch helpers (kernels/_launch.py): TF32 through torch's new and legacy APIs,
the device guard, grids in whole waves from the compiled kernel's occupancy,
device-independent chunking, and the eager path that skips the operator
dispatch. All without a GPU; gpu_check's multi_gpu section runs the guard on
real devices."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import DEVICE, SIZES, make_layer
from mammoth_fast import reference
from mammoth_fast.kernels import _launch, _ops, combine, dispatch, experts, query
from mammoth_fast.kernels._slot_dropout import slot_keep_mask

NEW_API = hasattr(torch.backends, "fp32_precision")


# ------------------------------------------------------------------ TF32
@pytest.fixture
def fp32_precision():
    """Leaves torch's fp32 precision settings as it found them (nothing set)."""
    yield
    if NEW_API:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"


@pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has no fp32_precision API")
def test_tf32_setting_read_through_the_new_api(monkeypatch, fp32_precision):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)  # as on a GPU
    assert _launch.input_precision() == "ieee"
    torch.backends.fp32_precision = "tf32"  # what a trainer's tf32 switch does
    with pytest.raises(RuntimeError, match="legacy and new APIs"):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 - the read that used to fail every launch
    assert _launch.input_precision() == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert _launch.input_precision() == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert _launch.input_precision() == "tf32"


@pytest.mark.parametrize("allowed", [True, False])
def test_tf32_setting_read_from_the_legacy_flag_where_the_new_api_is_missing(monkeypatch, allowed):
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=allowed))  # torch < 2.9
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    assert _launch.input_precision() == ("tf32" if allowed else "ieee")


def test_interpreter_dots_are_ieee(fp32_precision):
    if NEW_API:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert _launch.interpreting() == (DEVICE.type == "cpu")
    if DEVICE.type == "cpu":
        assert _launch.input_precision() == "ieee"


# ------------------------------------------------------------------ device guard
LAUNCHERS = (query.query_forward, query.query_norm_backward, dispatch.dispatch_forward, dispatch.dispatch_backward,
             experts.experts_forward, experts.experts_backward, combine.combine_forward, combine.combine_backward,
             slot_keep_mask)


def test_every_launcher_is_guarded():
    guarded = _launch.on_device(print).__code__  # the guard's wrapper, one code object for all
    for launcher in LAUNCHERS:
        assert launcher.__code__ is guarded and callable(launcher.__wrapped__), launcher.__name__


FAKE_SECOND_GPU = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                     reason="fake cuda:1 tensors need no GPU at all, or two")


@FAKE_SECOND_GPU
def test_guard_makes_the_inputs_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launcher = _launch.on_device(lambda x, flag: seen.append((entered[-1], x.device)) or flag)
    with FakeTensorMode():
        x = torch.empty(3, device="cuda:1")
        assert launcher(x, True) is True
    assert seen == [(torch.device("cuda:1"), torch.device("cuda:1"))]
    assert _launch.on_device(lambda x: x)(torch.ones(2)).sum() == 2  # CPU tensors: no guard


@FAKE_SECOND_GPU
def test_tensors_on_two_devices_are_refused():
    with FakeTensorMode():
        a, b = torch.empty(2, device="cuda:0"), torch.empty(2, device="cuda:1")
        with pytest.raises(RuntimeError, match="several devices.*cuda:0, cuda:1"):
            _launch.check_device(a, b)


# ------------------------------------------------------------------ waves
def test_occupancy_follows_registers_warps_and_shared_memory():
    h100 = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                           shared_memory_per_multiprocessor=233472)
    assert _launch._occupancy(128, 16384, 4, h100) == 4  # registers: 65536 / (128 * 128)
    assert _launch._occupancy(64, 0, 4, h100) == 8  # registers again (no shared memory)
    assert _launch._occupancy(32, 0, 4, h100) == 16  # threads: 2048 / 128
    assert _launch._occupancy(40, 100_000, 4, h100) == 2  # shared memory, 1 KiB reserved per block
    assert _launch._occupancy(255, 0, 8, h100) == 1


def waves_efficiency(programs: int, splits: int, resident: int) -> float:
    return programs * splits / (resident * math.ceil(programs * splits / resident))


@pytest.mark.parametrize("n, block_n, programs, resident", [
    (100_000, 64, 48, 396),  # bf16 dispatch, one bag (3 slot tiles x 16 heads), 3 per SM
    (100_000, 64, 96, 396),  # two bags
    (100_000, 64, 176, 396),  # the 528-program case: a third wave a third full, before
    (16_000, 32, 80, 264), (200_000, 64, 64, 528), (3_000, 64, 48, 132),
])
def test_split_fills_whole_waves(n, block_n, programs, resident):
    splits, per = _launch.split_n(n, block_n, programs, resident)
    tiles = math.ceil(n / block_n)
    assert per % block_n == 0 and splits == math.ceil(n / per)
    assert per // block_n >= min(4, tiles)  # chunks of at least 4 tiles
    # either (nearly) whole waves, or too few tiles to fill them
    assert waves_efficiency(programs, splits, resident) >= 0.9 or splits == max(1, tiles // 4)


def test_fixed_chunking_does_not_depend_on_the_gpu():
    with _launch.fixed_chunks():
        assert _launch.split_n(100_000, 64, 48, 132) == _launch.split_n(100_000, 64, 48, 528)
        assert _launch.split_n(100_000, 64, 48, 132)[1] == 64 * _launch.FIXED_CHUNK_TILES
    assert not _launch.chunking_is_fixed()
    assert _launch.split_n(100_000, 64, 48, 4) != _launch.split_n(100_000, 64, 48, 528)


def test_split_of_a_symbolic_bag_size_keeps_the_grid_or_the_chunks_fixed():
    """Under dynamic-shape tracing n is symbolic: the chunk count is taken from
    its hint and the chunk length stays symbolic (buffers and grid do not grow
    with later, larger bags); in the fixed mode the chunks stay 32 tiles."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(100_000, source=ConstantSource("n")), hint=100_000)
    splits, per = _launch.split_n(n, 64, 48, 396)
    assert (splits, _launch._hinted(per)) == _launch.split_n(100_000, 64, 48, 396)
    assert isinstance(splits, int) and isinstance(per, torch.SymInt)
    with _launch.fixed_chunks():
        splits, per = _launch.split_n(n, 64, 48, 396)
        assert per == 64 * _launch.FIXED_CHUNK_TILES and _launch._hinted(splits) == math.ceil(100_000 / per)


def test_the_pick_is_cached_per_kernel_variant(monkeypatch):
    """Variants that differ in an int constexpr (dh 20 and 32 share a tile
    ladder) get their own pick: the key holds every constexpr, not the runtime ints."""
    picks = []

    class Compiled:
        n_regs, n_spills, metadata = 64, 0, SimpleNamespace(shared=0, num_warps=4)

        def _init_handles(self):
            pass

    class Kernel:
        params = [SimpleNamespace(name=n, is_constexpr=c) for n, c in (("X", False), ("N", False), ("DH", True))]

        def warmup(self, grid, **args):
            picks.append(args["DH"])
            return Compiled()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(_launch, "_device_props", lambda dev: SimpleNamespace(multi_processor_count=132))
    kernel, dev, x = Kernel(), torch.device("cuda", 0), torch.empty(1)
    metas = dispatch.dispatch_metas(300, 20, torch.float32)
    assert metas == dispatch.dispatch_metas(300, 32, torch.float32)
    for n, dh in ((1000, 20), (5000, 20), (1000, 32)):
        assert _launch.choose(kernel, dev, dict(X=x, N=n, DH=dh), metas) == (metas[0], 8 * 132)  # 64 registers: 8 a SM
    assert picks == [20, 32]  # one compile per variant; another N reuses the pick


def test_without_a_real_gpu_the_first_candidate_runs_one_program_per_sm():
    metas = dispatch.dispatch_metas(300, 16, torch.float32)
    assert len(metas) > 2 and metas[0] == dispatch.dispatch_meta(300, 16, torch.float32)
    if DEVICE.type == "cpu":
        assert _launch.choose(dispatch._dispatch_partial_kernel, DEVICE, {}, metas) == (metas[0], 4)


def test_candidates_shrink_tiles_and_toggle_warps():
    meta = dict(BLOCK_N=64, BLOCK_P=32, num_warps=4, num_stages=2)
    got = _launch.candidates(meta, ("BLOCK_N", "BLOCK_P"))
    assert got[0] == meta and got[1] == {**meta, "num_warps": 8}
    assert dict(BLOCK_N=16, BLOCK_P=16, num_warps=4, num_stages=2) in got
    assert all(m["BLOCK_N"] >= 16 and m["BLOCK_P"] >= 16 for m in got)
    assert len(got) == len({tuple(sorted(m.items())) for m in got})  # no repeats


def test_fixed_chunking_gives_the_same_bits_whatever_the_sm_count(monkeypatch):
    """A bag split in chunks by the SM count (4 or 132) gives other bits in its
    fp32 sums; with fixed chunks, the same, forward and backward. The fixed
    chunks are 4 tiles here, not FIXED_CHUNK_TILES (32), so that a 300-patch bag
    (10 tiles of 32 in each split kernel) spans 3 of them under the interpreter."""
    keep_slots = False  # dispatch and combine: both split kernels
    ref = make_layer("small", seed=5, keep_slots=keep_slots)
    layer = type(ref)(**SIZES["small"], keep_slots=keep_slots, backend="triton").to(DEVICE).eval()
    layer.load_state_dict(ref.state_dict())
    n = 300
    x = torch.randn(1, n, SIZES["small"]["input_dim"], device=DEVICE)

    def run(sms):
        monkeypatch.setattr(_launch, "sm_count", lambda device: sms)
        out = layer(x)
        return [out, *torch.autograd.grad(out.square().sum(), list(layer.parameters()))]

    if DEVICE.type == "cuda":
        pytest.skip("the SM count of a real GPU is read from the compiled kernel's occupancy")
    # by the SM count the split kernels (4 programs a chunk, 32-patch tiles) cut the bag otherwise
    assert _launch.split_n(n, 32, 4, 4)[0] != _launch.split_n(n, 32, 4, 132)[0]
    monkeypatch.setattr(_launch, "FIXED_CHUNK_TILES", 4)
    _launch._split_n.cache_clear()  # its cache key does not hold the constant
    try:
        with _launch.fixed_chunks():
            assert _launch.split_n(n, 32, 4, 4) == _launch.split_n(n, 32, 4, 132) == (3, 128)
            a, b = run(4), run(132)
    finally:
        _launch._split_n.cache_clear()
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    want = reference.forward(x.double().cpu(), ref.params(), keep_slots=keep_slots)
    assert ((a[0].double().cpu() - want).norm() / want.norm()) < 1e-5


# ------------------------------------------------------------------ eager path
def test_wrappers_call_the_launcher_in_eager_mode_and_the_operator_while_tracing():
    calls = []
    op = lambda *a: calls.append("op") or a  # noqa: E731
    fn = lambda *a: calls.append("fn") or a  # noqa: E731
    _ops._call(op, fn, 1)
    with FakeTensorMode():
        _ops._call(op, fn, 1)
    assert calls == ["fn", "op"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("keep_slots", [True, False])
def test_layer_on_the_second_gpu_while_the_first_is_current(keep_slots):
    ref = make_layer("small", seed=6, keep_slots=keep_slots)
    x = torch.randn(2, 300, SIZES["small"]["input_dim"], dtype=torch.float64)
    want = reference.forward(x, ref.params(), keep_slots=keep_slots)
    layer = type(ref)(**SIZES["small"], keep_slots=keep_slots, backend="triton").eval()
    layer.load_state_dict(ref.state_dict())
    layer.to("cuda:1")
    with torch.cuda.device(0):
        out = layer(x.float().to("cuda:1"))
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    assert out.device == torch.device("cuda:1") and all(g.device == out.device for g in grads)
    assert ((out.double().cpu() - want).norm() / want.norm()) < 1e-5
