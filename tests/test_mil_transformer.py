"""Transformer MIL: what is particular to MIL-Lab's layer (the per-bag
computation against a plain implementation is in tests/test_mil_part2.py)."""
import torch
import torch.nn as nn

from mammoth_fast.mil import TransformerMIL, create_model


def test_transformer_layers_are_millab_s():
    net = create_model("transformer.base.uni", 2, embed_dim=32, num_heads=4, num_fc_layers=2)
    assert [type(m) for m in net.patch_embed] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    blk = net.blocks[0]
    assert blk.attention.num_heads == 4 and blk.attention.dropout == 0.25
    assert [type(m) for m in blk.mlp] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    assert blk.mlp[0].out_features == 2048 and blk.mlp[2].p == 0.25  # the authors' config's encoder_mlp_dim
    assert len(net.blocks) == 2


def test_transformer_attention_does_not_change_the_logits():
    """MIL-Lab's TransLayer, asked for weights, adds the cls token's attention
    output to every token (out[0] of the output instead of of the tuple), which
    changes their logits under return_attention; ours does not."""
    torch.manual_seed(0)
    net = TransformerMIL(in_dim=8, num_classes=3, embed_dim=16, num_heads=4, encoder_mlp_dim=32).double().eval()
    h = torch.randn(2, 9, 8, dtype=torch.float64)
    with_att = net(h, return_attention=True)
    torch.testing.assert_close(with_att["logits"], net(h)["logits"], rtol=1e-12, atol=1e-12)
    assert with_att["attention"].shape == (2, 9)
