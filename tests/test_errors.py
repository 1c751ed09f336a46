"""Bad input: a clear error naming the bad value, and nothing changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from htmuon import HTMuon, NonFiniteGradientError, param_groups


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, r"Invalid lr: -0\.1 \(learning rate must be >= 0 and finite\)"),
        ({"p": 1.2}, r"Invalid p: 1\.2 \(must be in \[0, 1\]"),
        ({"p": -0.5}, r"Invalid p: -0\.5"),
        ({"momentum": 1.0}, r"Invalid momentum: 1\.0 \(must be in \[0, 1\)\)"),
        ({"weight_decay": -1}, r"Invalid weight_decay: -1"),
        ({"method": "qr"}, r"Invalid method: 'qr' \(valid methods: \["),
        ({"spectrum": "flat"}, r"Invalid spectrum: 'flat'"),
        ({"method": "ns", "spectrum": "rank"}, r"method 'ns' does not support spectrum='rank'"),
        ({"scale": "unit"}, r"Invalid scale: 'unit'"),
        ({"lr_adjust": "moonshot"}, r"Invalid lr_adjust: 'moonshot'"),
        ({"interval": 0}, r"Invalid interval: 0 \(must be an integer >= 1\)"),
        ({"interval": 2.5}, r"Invalid interval: 2\.5"),
        ({"plugin": "adam"}, r"Invalid plugin: 'adam'"),
        ({"algorithm": "sgd"}, r"Invalid algorithm: 'sgd'"),
        ({"beta2": 1.0}, r"Invalid beta2: 1\.0"),
        ({"adamw_betas": (0.9, 1.5)}, r"Invalid adamw_betas: \(0\.9, 1\.5\)"),
        ({"ns_dtype": torch.int32}, r"Invalid ns_dtype: torch\.int32"),
        ({"compute_dtype": torch.float16}, r"Invalid compute_dtype: torch\.float16"),
        ({"lr": "fast"}, r"Invalid lr: 'fast' \(must be a real number\)"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HTMuon([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_invalid_group_value_names_the_group_and_is_not_added():
    opt = HTMuon([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match=r"Invalid p in param group 1: 3"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "p": 3})
    assert len(opt.param_groups) == 1


def test_vector_in_matrix_group():
    with pytest.raises(ValueError, match=r"algorithm='htmuon' but parameter 1 has shape \(7,\)"):
        HTMuon(
            [
                {
                    "params": [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(7))],
                    "algorithm": "htmuon",
                }
            ]
        )


def test_sparse_and_complex_gradients():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = HTMuon(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter .*shape \(10, 4\)\)"):
        opt.step()
    w = nn.Parameter(torch.randn(3, 5, dtype=torch.complex64))
    w.grad = torch.randn(3, 5, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match=r"complex .*shape \(3, 5\)"):
        HTMuon([w]).step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_nothing(bad):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = HTMuon(param_groups(model), lr=0.05, plugin="normuon")
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 6)).square().sum().backward()
        opt.step()
    opt.zero_grad()
    model(torch.randn(5, 6)).square().sum().backward()
    model[2].weight.grad[0, 1] = bad
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(NonFiniteGradientError, match=r"parameter '2\.weight' of shape \(2, 8\)"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()
    for pid, s in state["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][pid][key])), key
    # the documented switch turns the check off: NaN flows on (ns), or the SVD refuses (nothing changed)
    with pytest.raises(NonFiniteGradientError, match="non-finite momentum direction"):
        HTMuon(param_groups(model), check_finite=False).step()
    HTMuon(param_groups(model), check_finite=False, method="ns").step()
    assert not torch.isfinite(model[2].weight).all()


def test_zero_gradient_gives_zero_update():
    for method in ("svd", "eigh", "ns"):
        W = nn.Parameter(torch.randn(5, 9))
        W0 = W.detach().clone()
        W.grad = torch.zeros(5, 9)
        HTMuon([W], method=method).step()
        assert torch.equal(W, W0), method


def test_rank_deficient_gradient():
    W = nn.Parameter(torch.zeros(6, 10))
    W.grad = torch.outer(torch.arange(6.0), torch.ones(10))  # rank 1
    HTMuon([W], lr=1.0, momentum=0.0).step()
    assert torch.isfinite(W).all()
    assert torch.linalg.matrix_rank(W.detach()) == 1
