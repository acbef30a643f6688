"""An independent, loop-based computation of the layer from its state_dict.

Written from SPEC.md section 2 without using mammoth_fast.reference, so that
behaviour upstream cannot check (share_lora_weights=False, mask) is checked
against a second implementation.
"""
import math

import torch


def _norm(x, gamma, use_layernorm):
    if use_layernorm:
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * gamma
    return x / torch.clamp(torch.sqrt((x * x).sum(-1, keepdim=True)), min=1e-8) * math.sqrt(x.shape[-1]) * gamma


def independent_forward(layer, x, mask=None):
    """x (B, N, Din) float64; mask (B, N) bool or None. Returns (out, dispatch (B, N, E, H, S))."""
    sd = {k: v.double() for k, v in layer.state_dict().items()}
    e_, h_, s_ = layer.num_experts, layer.num_heads, layer.num_slots
    ln = layer.use_layernorm
    lora = "expert_heads.lora_layers."
    a_w, a_b = sd[lora + "shared_weight"], sd[lora + "shared_bias"]
    if a_w.dim() == 3:  # shared: the same A and a for every expert
        a_w, a_b = a_w.expand(e_, *a_w.shape), a_b.expand(e_, *a_b.shape)
    b_w, b_b = sd[lora + "expert_weights"], sd[lora + "bias"]
    g = sd["expert_heads.norm.gamma"]
    d_out = g.shape[1]
    do = d_out // h_
    keys = _norm(sd["slot_embeds"], sd["slot_norm.gamma"], ln)  # (E, H, S, dh)
    q_all = _norm(x @ sd["wq.weight"].T + sd["wq.bias"], sd["norm.gamma"], ln)
    outs, weights = [], []
    for b in range(x.shape[0]):
        valid = torch.arange(x.shape[1]) if mask is None else mask[b].nonzero().flatten()
        q = q_all[b].reshape(x.shape[1], h_, -1)  # (N, H, dh)
        logits = torch.einsum("nhd,ehsd->nehs", q[valid], keys)
        dw = torch.softmax(logits, dim=0)
        z = torch.einsum("nehs,nhd->ehsd", dw, q[valid])
        y = torch.zeros(e_, s_, d_out, dtype=x.dtype)
        for e in range(e_):
            for s in range(s_):
                v = torch.cat([(z[e, h, s] @ a_w[e, h] + a_b[e, h]) @ b_w[e, h] + b_b[e, h] for h in range(h_)])
                w = v / torch.clamp(v.norm(), min=1e-8) * math.sqrt(d_out) * g[e]
                y[e, s] = torch.relu(w)
        full_dw = torch.zeros(x.shape[1], e_, h_, s_, dtype=x.dtype)
        full_dw[valid] = dw
        weights.append(full_dw)
        if layer.keep_slots:
            outs.append(y.reshape(e_ * s_, d_out))
            continue
        out = torch.zeros(x.shape[1], d_out, dtype=x.dtype)
        cw = torch.softmax(logits.permute(0, 2, 1, 3).reshape(len(valid), h_, e_ * s_), dim=-1)  # (n, H, P)
        y_heads = y.reshape(e_ * s_, h_, do)
        for h in range(h_):
            out[valid, h * do:(h + 1) * do] = cw[:, h] @ y_heads[:, h]
        outs.append(out)
    return torch.stack(outs), torch.stack(weights)
