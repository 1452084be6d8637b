"""memops.nn.RetentionGate: TRIM-KV's retention gate, against its formula and a transcription of the official
gate (init, activation, and the official checkpoint's names)."""

import pytest
import torch
import torch.nn.functional as F

import memops


def test_retention_gate():
    gate = memops.nn.RetentionGate(16, 3, hidden=8, bias_init=8.0)
    x = torch.randn(2, 5, 16)
    log_beta = gate(x)
    assert log_beta.shape == (2, 3, 5) and (log_beta <= 0).all()
    expected = F.logsigmoid(gate.down(F.silu(gate.up(x)))).transpose(1, 2)
    torch.testing.assert_close(log_beta, expected)
    assert set(gate.state_dict()) == {"up.weight", "up.bias", "down.weight", "down.bias"}
    assert torch.equal(gate.down.bias, torch.full((3,), 8.0))


class OfficialRetentionGate(torch.nn.Module):
    """Transcribed from ngocbh/trimkv's TrimKV Llava modeling file (class RetentionGate, retention_gate='rg'):
    linear1 (d -> inter, bias), act, linear2 (inter -> Hkv, no bias), + bias (Hkv) filled with
    retention_gate_bias_init, logsigmoid; reset_parameters: weights N(0, initializer_range = 0.02), linear1.bias 0."""

    def __init__(self, d, inter, heads, bias_init, act):
        super().__init__()
        self.linear1 = torch.nn.Linear(d, inter, bias=True)
        self.linear2 = torch.nn.Linear(inter, heads, bias=False)
        self.bias = torch.nn.Parameter(torch.zeros(heads))
        self.act = act
        self.linear1.weight.data.normal_(mean=0.0, std=0.02)
        self.linear1.bias.data.zero_()
        self.linear2.weight.data.normal_(mean=0.0, std=0.02)
        self.bias.data.fill_(bias_init)

    def forward(self, x):
        return F.logsigmoid(self.linear2(self.act(self.linear1(x))) + self.bias)  # (B, S, H)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_retention_gate_matches_the_official_gate(activation):
    torch.manual_seed(0)
    official = OfficialRetentionGate(64, 512, 4, 10.0, {"silu": F.silu, "gelu": F.gelu}[activation])
    gate = memops.nn.RetentionGate(64, 4, hidden=512, bias_init=10.0, activation=activation)
    # the official init: N(0, 0.02) weights, zero first bias, the final bias at bias_init
    assert abs(gate.up.weight.std().item() - 0.02) < 1e-3 and abs(gate.down.weight.std().item() - 0.02) < 3e-3
    assert torch.equal(gate.up.bias, torch.zeros(512)) and torch.equal(gate.down.bias, torch.full((4,), 10.0))
    prefix = "model.layers.0.self_attn.retention_gate."
    gate.load_official_state_dict({prefix + k: v for k, v in official.state_dict().items()})
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(gate(x), official(x).transpose(1, 2), rtol=0, atol=1e-6)
    torch_init = memops.nn.RetentionGate(64, 4, hidden=512, init="torch")
    assert torch_init.up.weight.abs().max() > 0.05  # nn.Linear's U(±1/sqrt(64)), not N(0, 0.02)
    with pytest.raises(ValueError, match="init must be"):
        memops.nn.RetentionGate(64, 4, init="xavier")
    with pytest.raises(ValueError, match="activation must be one of"):
        memops.nn.RetentionGate(64, 4, activation="swish2")
