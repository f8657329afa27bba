"""SparseMLP, sparsify and l1_loss without a GPU: structure, state_dict compatibility with Llama's MLP,
swapping the MLPs of a tiny transformers Llama (and of a plain PyTorch model), the L1 averaging,
and the errors. On host tensors SparseMLP computes with dense PyTorch ops, so whole models run here;
the CUDA path (twell's kernels) is tested in test_gpu_modules.py.
"""

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import twell  # noqa: E402
import twell.torch as tt  # noqa: E402

D, H = 16, 48


def _tiny_llama(act="relu", layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=H, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=2, hidden_act=act,
                                   max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class PlainMLP(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(D, H, bias=bias)
        self.up_proj = nn.Linear(D, H, bias=bias)
        self.down_proj = nn.Linear(H, D, bias=bias)
        self.act_fn = nn.ReLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = PlainMLP()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_sparse_mlp_has_a_llama_mlps_parameters():
    m = tt.SparseMLP(D, H, dtype=torch.float32)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "gate_proj.weight": (H, D), "up_proj.weight": (H, D), "down_proj.weight": (D, H)}
    assert all(p.requires_grad for p in m.parameters())
    ng = tt.SparseMLP(D, H, gated=False, dtype=torch.float32)
    assert set(ng.state_dict()) == {"up_proj.weight", "down_proj.weight"}
    assert tt.SparseMLP(D, H).plan_key != tt.SparseMLP(D, H).plan_key  # each layer its own AUTO history


def test_state_dict_round_trip_with_llamas_mlp_and_the_same_function():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=H, hidden_act="relu", num_attention_heads=2,
                                   num_key_value_heads=2)
    torch.manual_seed(1)
    ref = LlamaMLP(cfg)
    m = tt.SparseMLP(D, H, dtype=torch.float32)
    m.load_state_dict(ref.state_dict())
    back = LlamaMLP(cfg)
    back.load_state_dict(m.state_dict())
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x)) and torch.equal(back(x), ref(x))


def test_sparsify_a_tiny_llama_shares_parameters_and_keeps_outputs():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    tt.sparsify(model)
    mlps = tt.sparse_mlps(model)
    assert len(mlps) == 2 and all(isinstance(layer.mlp, tt.SparseMLP) for layer in model.model.layers)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # same keys, same storage
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_sparsify_refuses_other_activations_unless_asked():
    model = _tiny_llama(act="silu")
    match = r"model\.layers\.0\.mlp \(LlamaMLP\) uses SiLU.*replace_activation"
    with pytest.raises(twell.UnsupportedError, match=match):
        tt.sparsify(model)
    assert not tt.sparse_mlps(model)  # nothing swapped on refusal
    tt.sparsify(model, replace_activation=True)
    assert len(tt.sparse_mlps(model)) == 2 and model.config.hidden_act == "relu"


def test_sparsify_a_plain_pytorch_model_and_its_errors():
    model = nn.Sequential(PlainBlock(), PlainBlock())
    x = torch.randn(4, D)
    with torch.no_grad():
        before = model(x)
    tt.sparsify(model, path="sparse")
    assert [type(b.mlp) for b in model] == [tt.SparseMLP, tt.SparseMLP] and model[0].mlp.path == "sparse"
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with pytest.raises(twell.UnsupportedError, match=r"gate_proj has a bias"):
        tt.sparsify(nn.Sequential(PlainMLP(bias=True)))
    with pytest.raises(twell.InvalidArgumentError, match=r"has no MLP with gate_proj"):
        tt.sparsify(nn.Linear(D, D))
    with pytest.raises(twell.InvalidArgumentError, match=r"model must be an nn.Module"):
        tt.sparsify("model")
    with pytest.raises(twell.InvalidArgumentError, match=r"intermediate_size must be a positive int"):
        tt.SparseMLP(D, 0)


def test_l1_loss_averages_layers_and_tokens_and_reaches_the_weights():
    model = nn.Sequential(PlainBlock(), PlainBlock())
    tt.sparsify(model)
    assert tt.l1_loss(model, 0.1) == 0.0  # no training forward yet
    x = torch.randn(3, 5, D)
    y = model(x)
    per_layer = []
    h_in = x
    for block in model:  # the recipe by hand: mean over tokens of sum over neurons of |h|
        z = block.norm(h_in)
        h = torch.relu(block.mlp.gate_proj(z)) * block.mlp.up_proj(z)
        per_layer.append(h.abs().sum() / 15)
        h_in = h_in + block.mlp.down_proj(h)
    want = 0.1 * torch.stack(per_layer).mean()
    got = tt.l1_loss(model, 0.1)
    torch.testing.assert_close(got, want)
    (y.sum() + got).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        model(x)
    assert all(m.l1 is None for m in tt.sparse_mlps(model))  # inference records no L1 term


def test_stats_before_the_first_call_are_zeros():
    m = tt.SparseMLP(D, H, dtype=torch.float32)
    assert set(m.last_stats().values()) == {0} and "active" in m.last_stats()
    assert int(m.stats_tensor().abs().sum()) == 0
