"""torch.compile: the Triton launchers are operators (mammoth_fast::*) with fake
implementations, so the triton backend compiles without graph breaks; opcheck
for every op. Without CUDA the kernels run under the Triton interpreter on CPU
tensors, where the launchers are custom ops; with compiled kernels they are
triton_ops, whose tracing is checked on fake CUDA tensors (last test)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, make_layer
from mammoth_fast.kernels import _ops
from mammoth_fast.mil import create_model


# What is traced and compiled does not depend on the sizes: a layer smaller than conftest's
# "small" (half its kernel programs, which the interpreter runs one by one), none of E, S,
# H, B equal to 1.
COMPILE_SIZES = dict(input_dim=24, dim=20, num_experts=3, num_slots=2, num_heads=2, slot_dim=12)


def small_inputs(dtype=torch.float32, mask=False):
    layer = make_layer(COMPILE_SIZES, seed=3, keep_slots=False, backend="triton").to(DEVICE, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, layer.input_dim, generator=g, dtype=dtype).to(DEVICE)
    m = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    m[1, 5:] = False
    return layer, x, (m if mask else None)


@pytest.mark.parametrize("keep_slots", [True, False], ids=["slots", "tokens"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_layer_has_no_graph_breaks(keep_slots, mask):
    layer, x, m = small_inputs(mask=mask)
    layer.keep_slots = keep_slots
    x.requires_grad_()
    torch._dynamo.reset()
    explain = torch._dynamo.explain(layer)(x, mask=m)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_inference_path_has_no_graph_breaks():
    layer, x, m = small_inputs(mask=True)  # no_grad: the bare forward launchers, as ops
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(layer)(x, mask=m)
        assert explain.graph_break_count == 0, explain.break_reasons
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, mask=m), layer(x, mask=m))


@pytest.mark.parametrize("keep_slots, dtype", [(True, torch.float32), (False, torch.float32), (False, torch.float64)],
                         ids=["slots", "tokens", "tokens-fused-routing"])
def test_compiled_layer_matches_eager_forward_and_backward(keep_slots, dtype):
    # fp64 with keep_slots=False: the fused routing backward's Function (as bf16 on a GPU)
    layer, x, m = small_inputs(dtype, mask=True)
    layer.keep_slots = keep_slots
    prms = [x.requires_grad_(), layer.wq.weight, layer.slot_embeds, layer.expert_heads.lora_layers.expert_weights]
    ref = layer(x, mask=m)
    dout = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, prms, dout)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # traces forward and backward
    out = compiled(x, mask=m)
    g = torch.autograd.grad(out, prms, dout)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_inductor_training_step_matches_eager():
    layer, x, m = small_inputs(mask=True)
    prms = [x.requires_grad_(), layer.wq.weight, layer.slot_embeds, layer.expert_heads.norm.gamma]
    ref = layer(x, mask=m)
    g_ref = torch.autograd.grad(ref.square().sum(), prms)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # the default backend, inductor
    out = compiled(x, mask=m)
    g = torch.autograd.grad(out.square().sum(), prms)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep_slots", [True, False], ids=["slots", "tokens"])
def test_training_with_slot_dropout_compiles_without_graph_breaks(keep_slots):
    """The slot-dropout seed is drawn on the device as a tensor (no .item()):
    a training step is one graph, and draws the same masks as eager from the
    same torch.manual_seed (aot_eager keeps eager's RNG)."""
    layer, x, m = small_inputs(mask=True)
    layer.keep_slots = keep_slots
    layer.slot_dropout = 0.3
    layer.expert_heads.dropout.p = 0.2
    layer.train()
    prms = [x.requires_grad_(), layer.wq.weight, layer.slot_embeds, layer.expert_heads.lora_layers.expert_weights]
    torch._dynamo.reset()
    explain = torch._dynamo.explain(layer)(x, mask=m)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch.manual_seed(5)
    ref = layer(x, mask=m)
    g_ref = torch.autograd.grad(ref.square().sum(), prms)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(5)
    out = compiled(x, mask=m)
    g = torch.autograd.grad(out.square().sum(), prms)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    # a fresh slot seed per step, not one baked into the graph: slot dropout alone now
    layer.expert_heads.dropout.p = 0.0
    with torch.no_grad():
        torch.manual_seed(6)
        a = compiled(x, mask=m)
        b = compiled(x, mask=m)
        torch.manual_seed(6)
        want = layer(x, mask=m)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_replays_draw_fresh_slot_masks():
    """The seed is read by the kernels from a device tensor that the captured
    graph redraws: each replay routes with a new slot-dropout mask."""
    layer = make_layer("small", seed=3, keep_slots=False, backend="triton", slot_dropout=0.3,
                       dropout=0.0).to("cuda", torch.float32).train()
    x = torch.randn(2, 50, layer.input_dim, device="cuda")
    m = torch.ones(2, 50, dtype=torch.bool, device="cuda")
    m[1, 30:] = False  # the empty-bag check on the mask reads no value during capture
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile the kernels before capture
                layer(x, mask=m)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, mask=m)
        outs = []
        for _ in range(3):
            graph.replay()
            outs.append(out.clone())
        layer.eval()
        clean = layer(x, mask=m)
    assert all((o[1, 30:] == 0).all() for o in outs)  # padding: zero output
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert all(not torch.equal(o, clean) for o in outs)


@pytest.mark.parametrize("keep_slots", [True, False], ids=["slots", "tokens"])
def test_compiled_mil_model_with_mask_without_graph_breaks(keep_slots):
    torch.manual_seed(0)
    moe_args = dict(num_experts=2, num_slots=3, num_heads=2, slot_dim=8, keep_slots=keep_slots, backend="triton")
    net = create_model("abmil.base_mammoth", 2, in_dim=16, embed_dim=16, attn_dim=8, moe_args=moe_args).to(DEVICE)
    net.eval()
    h = torch.randn(2, 7, 16, device=DEVICE)
    m = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    m[0, 4:] = False
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda t, mask: net(t, mask=mask)["logits"])(h, m)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, mask=m)["logits"], net(h, mask=m)["logits"])
    torch.testing.assert_close(compiled(h)["logits"], net(h)["logits"])


def op_samples():
    """Arguments for each op at the small sizes, float32, with and without mask / slot dropout."""
    layer, x, m = small_inputs(mask=True)
    p = layer.params()
    from mammoth_fast import reference

    q, _, _, y_pre = _ops.query_forward(x.reshape(18, -1), p.wq_weight, p.wq_bias, p.norm_gamma, p.norm_beta,
                                        True, store_y=True)
    _, mean, rstd, _ = _ops.query_forward(x.reshape(18, -1), p.wq_weight, p.wq_bias, p.norm_gamma, p.norm_beta, True)
    q = q.view(2, 9, -1)
    k = reference.slot_keys(p, torch.float32).contiguous().detach()
    lora = [t.detach() for t in (p.shared_weight, p.shared_bias, p.expert_weights, p.expert_bias, p.expert_gamma)]
    det = lambda *ts: [t.detach() for t in ts]  # noqa: E731
    xs = det(x.reshape(18, -1), p.wq_weight, p.wq_bias, p.norm_gamma, p.norm_beta)
    yield "query_fwd", (*xs, True, True)
    yield "query_fwd", (*xs[:4], None, False, False)
    yield "query_norm_bwd", (torch.randn_like(q.view(18, -1)), y_pre, mean, rstd, xs[3], True, True, True, True)
    q = q.detach()
    y = None
    # the default kernel plan, then the legacy one with the mask and slot dropout
    for mask, drop, legacy in ((None, (None, 0.0), False), (m, (torch.tensor([1234], device=DEVICE), 0.3), True)):
        z, lse = _ops.dispatch_fwd(q, k, mask, *drop, legacy)
        yield "dispatch_fwd", (q, k, mask, *drop, legacy)
        yield "dispatch_bwd", (torch.randn_like(z), q, k, z, lse, mask, *drop, True, True, legacy, *(None,) * 4)
        if y is None:  # the experts ops take no mask nor slot dropout: one sample each
            y, inv, v = _ops.experts_fwd(z, *lora)
            yield "experts_fwd", (z, *lora)
            yield "experts_bwd", (torch.randn_like(y), z, *lora, v, inv, True, True)
        out, lse_c = _ops.combine_fwd(q, k, y, mask, torch.float32, *drop, legacy)
        yield "combine_fwd", (q, k, y, mask, torch.float32, *drop, legacy)
        yield "combine_bwd", (torch.randn_like(out), q, k, y, out, lse_c, mask, *drop, True, True, False, legacy)
    # keep_slots=False in the default plan: the fused routing backward (fp64 here, bf16 on a GPU;
    # routing_bwd_fused_ok), which also runs combine's kernels for the far patches
    q64, k64, lora64 = q.double(), k.double(), [t.double() for t in lora]
    z64, lse64 = _ops.dispatch_fwd(q64, k64, m, None, 0.0, False)
    y64 = _ops.experts_fwd(z64, *lora64)[0]
    out64, lse_c64 = _ops.combine_fwd(q64, k64, y64, m, torch.float64, None, 0.0, False)
    yield "dispatch_bwd", (torch.randn_like(z64), q64, k64, z64, lse64, m, None, 0.0, True, True, False,
                           torch.randn_like(out64), out64, y64, lse_c64)


def test_opcheck_every_op():
    seen = set()
    for name, args in op_samples():
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # autograd is in the Functions
        torch.library.opcheck(_ops.OPS[name], args)  # schema, fake tensor, autograd registration, aot dispatch
        seen.add(name)
    assert seen == set(_ops.OPS)


KERNELS = {"_query_fwd_kernel", "_query_norm_bwd_kernel", "_dispatch_partial_kernel", "_dispatch_merge_kernel",
           "_dispatch_bwd_kernel", "_experts_proj_kernel", "_experts_norm_kernel",
           "_experts_norm_bwd_kernel", "_experts_proj_bwd_kernel", "_combine_fwd_kernel", "_combine_bwd_dq_kernel",
           "_combine_bwd_dkdy_kernel"}
"""The kernels of a training step at the traced sizes (C = 8: the fused query kernel; the default kernel
plan: the fused dispatch backward)."""


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="torch.library.triton_op needs torch >= 2.6")
def test_triton_ops_trace_into_kernel_launches():
    """With compiled kernels (no interpreter) the launchers are triton_ops: the
    graph AOTAutograd hands to Inductor launches every kernel itself, with no
    opaque mammoth_fast op left, and each kernel writes only buffers its
    launcher allocated (torch's TTIR analysis: no input is mutated, nothing must
    be cloned). Traced on fake CUDA tensors, so it runs without a GPU
    (tests/trace_triton_ops.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "trace_triton_ops.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["triton_op"]
    assert report["opaque"] == []
    assert set(report["kernels"]) == KERNELS
    assert report["kernels"].count("_combine_fwd_kernel") == 2  # the layer's forward, then the chain's
    assert all("empty" in made_by for _, _, made_by in report["written"]), report["written"]
    # each kernel writes its outputs and nothing else (two launches of the forward kernels: the layer's, the chain's)
    written = {}
    for kernel, arg, _ in report["written"]:
        written.setdefault(kernel, []).append(arg)
    assert {k: sorted(v) for k, v in written.items()} == {
        "_query_fwd_kernel": sorted(["Q", "MEAN", "RSTD"] * 2 + ["Y"]),
        "_query_norm_bwd_kernel": ["DB_PART", "DGAMMA_PART", "DY"],
        "_dispatch_partial_kernel": sorted(["M_PART", "L_PART", "ACC_PART"] * 2),
        "_dispatch_merge_kernel": ["LSE", "LSE", "Z", "Z"], "_dispatch_bwd_kernel": ["DK_PART", "DQ"],
        "_experts_proj_kernel": ["V", "V"],
        "_experts_norm_kernel": ["INV_NORM", "INV_NORM", "Y", "Y"], "_experts_norm_bwd_kernel": ["DC_PART", "DG_PART", "DV"],
        "_experts_proj_bwd_kernel": ["DABIAS_PART", "DA_PART", "DBW_PART", "DZ_PART"],
        "_combine_fwd_kernel": ["LSE", "LSE", "OUT", "OUT"], "_combine_bwd_dq_kernel": ["DELTA", "DQ"],
        "_combine_bwd_dkdy_kernel": ["DK_PART", "DY_PART"]}
    # out (B, N, D); dK (H, P, dh); d(pre-norm rows) (B*N, C); dgamma (C,); the LoRA grads
    assert report["shapes"][:4] == [[2, 40, 16], [2, 6, 4], [80, 8], [8]]
    assert report["devices"] == ["cuda:0"]
    # each op declares the kernels it launches (they key the AOTAutograd cache): all of them, each once per op,
    # the query's norm-after-GEMM kernel, launched for C > 512, and the dispatch backward's two kernels of
    # the legacy plan (and of the sizes the fused kernel does not take); the dispatch backward also launches
    # combine's dq and dK kernels (the far patches of keep_slots=False's fused routing backward)
    declared = [k for kernels in report["declared"].values() for k in kernels]
    assert sorted(declared) == sorted([*set(report["kernels"]) | {"_query_norm_fwd_kernel", "_dispatch_bwd_dk_kernel",
                                                                   "_dispatch_bwd_dq_kernel"},
                                       "_combine_bwd_dq_kernel", "_combine_bwd_dkdy_kernel"])
    assert report["declared"]["dispatch_bwd"] == ["_combine_bwd_dkdy_kernel", "_combine_bwd_dq_kernel",
                                                  "_dispatch_bwd_dk_kernel", "_dispatch_bwd_dq_kernel",
                                                  "_dispatch_bwd_kernel"]


LEVELS = {"autograd": 0, "_ops": 1, "query": 2, "dispatch": 2, "experts": 2, "combine": 2.5, "_slot_dropout": 3,
          "_tiles": 3, "_launch": 4}
"""kernels/: the autograd Functions call the ops, the ops call the launchers (one
module per stage; dispatch's backward with combine's part also runs combine's
kernels for the far patches), the launchers use the shared helpers."""


def test_kernel_imports_form_a_line():
    """Each kernels/ module imports only modules below it in LEVELS (no cycle, no
    import at a module's end), and nothing in kernels/ imports the backend."""
    root = Path(__file__).resolve().parents[1] / "kernels"
    assert {p.stem for p in root.glob("*.py")} - {"__init__"} == set(LEVELS)
    for name, level in LEVELS.items():
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    assert LEVELS[target] > level, f"kernels/{name}.py imports {target}, which is not below it"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("mammoth_fast") for n in names), (name, names)
