"""The torchtitan adapter (skipped where torchtitan is not installed; see docs/distributed.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import htmuon

pytest.importorskip("torchtitan.components.optimizer", reason="torchtitan is not installed")

from htmuon.integrations.torchtitan import (  # noqa: E402
    HTMuonOptimizersContainer,
    build_htmuon,
    htmuon_optimizer_config,
)


class Attention(nn.Module):
    def __init__(self, d: int, bias: bool = False) -> None:
        super().__init__()
        self.wq = nn.Linear(d, d, bias=bias)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(torch.tanh(self.wq(x)))


class Block(nn.Module):
    def __init__(self, d: int, bias: bool = False) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d)
        self.attention = Attention(d, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.attention_norm(x))


class TinyLlama(nn.Module):
    """torchtitan's LLaMA parameter names: tok_embeddings, layers.N.*, norm, output."""

    def __init__(self, vocab: int = 13, d: int = 8, bias: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.ModuleDict({"0": Block(d, bias), "1": Block(d, bias)})
        self.norm = nn.LayerNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


def train(model: nn.Module, opt, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 13, (4, 6), generator=g)
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()


def test_config_builds_one_htmuon_with_standard_routing():
    torch.manual_seed(0)
    model = TinyLlama()
    config = htmuon_optimizer_config(lr=0.02, adamw_lr=1e-3, p=0.25, method="eigh", plugin="normuon")
    container = config.build(model_parts=[model])
    assert isinstance(container, HTMuonOptimizersContainer)
    (opt,) = container.optimizers
    assert isinstance(opt, htmuon.HTMuon)
    adamw, matrices = opt.param_groups
    assert adamw["algorithm"] == "adamw" and adamw["lr"] == 1e-3
    assert set(adamw["param_names"]) == {
        "tok_embeddings.weight",
        "layers.0.attention_norm.weight",
        "layers.0.attention_norm.bias",
        "layers.1.attention_norm.weight",
        "layers.1.attention_norm.bias",
        "norm.weight",
        "norm.bias",
        "output.weight",
    }
    assert matrices["algorithm"] == "htmuon" and matrices["p"] == 0.25 and matrices["plugin"] == "normuon"
    assert len(matrices["params"]) == 4 and "fused" not in matrices
    before = model.layers["0"].attention.wq.weight.detach().clone()
    train(model, container, range(2))
    assert not torch.equal(before, model.layers["0"].attention.wq.weight)


def test_flat_checkpoint_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = TinyLlama()
    config = htmuon_optimizer_config(interval=2, plugin="normuon")
    container = config.build(model_parts=[model])
    train(model, container, range(3))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optim = {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in container.state_dict().items()
    }
    assert any(k.endswith("second_moment") for k in saved_optim)
    train(model, container, range(3, 5))

    torch.manual_seed(1)
    fresh = TinyLlama()
    fresh.load_state_dict(saved_model)
    fresh_container = config.build(model_parts=[fresh])
    fresh_container.load_state_dict(saved_optim)
    train(fresh, fresh_container, range(3, 5))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_config_gives_each_part_its_settings():
    """lr / weight_decay to the matrices, adamw_lr / adamw_weight_decay to the AdamW part, and the
    options to both, as HTMuon(**options) does (before, adamw_betas, adamw_eps and check_finite reached
    only the matrix group, which does not read them, and the AdamW part ran HTMuon's defaults)."""
    model = TinyLlama()
    config = htmuon_optimizer_config(
        lr=0.03, adamw_lr=2e-3, weight_decay=0.2, adamw_weight_decay=0.01,
        adamw_betas=(0.8, 0.9), adamw_eps=1e-6, check_finite=False, method="eigh",
    )  # fmt: skip
    (opt,) = config.build(model_parts=[model]).optimizers
    adamw, matrices = opt.param_groups
    assert (adamw["algorithm"], adamw["lr"], adamw["weight_decay"]) == ("adamw", 2e-3, 0.01)
    assert (matrices["algorithm"], matrices["lr"], matrices["weight_decay"]) == ("htmuon", 0.03, 0.2)
    for group in (adamw, matrices):
        assert group["adamw_betas"] == (0.8, 0.9) and group["adamw_eps"] == 1e-6, group["algorithm"]
        assert group["check_finite"] is False and group["method"] == "eigh", group["algorithm"]
    # adamw_weight_decay defaults to weight_decay
    (opt,) = htmuon_optimizer_config(weight_decay=0.3).build(model_parts=[TinyLlama()]).optimizers
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.3]


def test_config_routes_biases_to_the_adamw_part():
    """A linear layer's bias (not under a norm's name) goes to AdamW, where HTMuon would refuse it."""
    model = TinyLlama(bias=True)
    container = htmuon_optimizer_config().build(model_parts=[model])
    adamw, matrices = container.optimizers[0].param_groups
    assert {"layers.0.attention.wq.bias", "layers.1.attention.wq.bias"} <= set(adamw["param_names"])
    assert not any(n.endswith("bias") for n in matrices["param_names"])
    train(model, container, range(1))


def test_process_group_reaches_htmuon(tmp_path):
    """``process_group=`` divides the matrices' spectral work (DDP-style): the optimizer is built with it
    (a one-process gloo group here)."""
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        pg = dist.group.WORLD
        config = htmuon_optimizer_config(process_group=pg)
        (opt,) = config.build(model_parts=[TinyLlama()]).optimizers
        assert opt._dist is not None and opt._dist.replicated_group is pg
        assert build_htmuon([{"params": [nn.Parameter(torch.zeros(3, 3))], "fused": False}])._dist is None
    finally:
        dist.destroy_process_group()


class TitanNames(nn.Module):
    """torchtitan 0.3.0's own names: the head is ``lm_head`` (LLaMA 3, DeepSeek V3, gpt-oss, ...),
    gpt-oss's attention ``sinks`` (one per head) and its experts' stacked ``mlp1_bias_EG``, and a
    depthwise conv kernel ``(channels, 1, k)`` as Qwen3.5's linear attention has."""

    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.wq = nn.Linear(d, d, bias=False)
        self.sinks = nn.Parameter(torch.zeros(4))
        self.mlp1_bias_EG = nn.Parameter(torch.zeros(3, 2 * d))
        self.conv_q = nn.Conv1d(d, d, 4, groups=d, bias=False, padding=3)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.wq(self.tok_embeddings(tokens)) + self.sinks.sum() + self.mlp1_bias_EG.sum()
        h = h + self.conv_q(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)
        return self.lm_head(self.norm(h))


def test_torchtitan_030_names_route_like_htmuons_own_rule():
    """The head of torchtitan 0.3.0's models is ``lm_head``: it went to HTMuon (the patterns named only
    ``output.``); gpt-oss's ``sinks`` stopped the build (a vector in an algorithm='htmuon' group), and
    its experts' biases and a depthwise kernel were orthogonalized as matrices. Now the head and the
    biases are the AdamW pattern group's; the vectors and side-1 matrices no pattern names go to a
    third, AdamW group with adamw_lr / adamw_weight_decay; only the hidden matrix is HTMuon's."""
    model = TitanNames()
    container = htmuon_optimizer_config(
        lr=0.02, adamw_lr=1e-3, weight_decay=0.1, adamw_weight_decay=0.01
    ).build(model_parts=[model])
    (opt,) = container.optimizers
    by_algorithm: dict[str, set[str]] = {}
    for g in opt.param_groups:
        by_algorithm.setdefault(g["algorithm"], set()).update(g["param_names"])
        expected = (1e-3, 0.01) if g["algorithm"] == "adamw" else (0.02, 0.1)
        assert (g["lr"], g["weight_decay"]) == expected, g["param_names"]
    assert by_algorithm["htmuon"] == {"wq.weight"}
    assert by_algorithm["adamw"] == {
        "tok_embeddings.weight",
        "lm_head.weight",
        "mlp1_bias_EG",
        "norm.weight",
        "norm.bias",
        "sinks",
        "conv_q.weight",
    }
    train(model, container, range(2))
    # a flat checkpoint of the three groups resumes into a fresh container
    saved = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in container.state_dict().items()}
    fresh = TitanNames()
    fresh.load_state_dict(model.state_dict())
    fresh_container = htmuon_optimizer_config(
        lr=0.02, adamw_lr=1e-3, weight_decay=0.1, adamw_weight_decay=0.01
    ).build(model_parts=[fresh])
    fresh_container.load_state_dict(saved)
    train(model, container, range(2, 4))
    train(fresh, fresh_container, range(2, 4))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_config_patterns_and_options_are_checked_when_the_config_is_made():
    """A single string is one pattern (it was joined character by character: every name matched one
    letter, all went to AdamW and torchtitan stopped with "pattern '.*' matched no parameters");
    ``()`` leaves routing to HTMuon (an empty pattern matched every name); a bad regex and
    ``algorithm`` (which turned the matrices into AdamW ones, silently) are refused by the config
    itself, not after torchtitan built the model."""
    (opt,) = (
        htmuon_optimizer_config(adamw_patterns=r"embed|norm|output\.")
        .build(model_parts=[TinyLlama()])
        .optimizers
    )
    adamw, matrices = opt.param_groups
    assert adamw["algorithm"] == "adamw" and "output.weight" in adamw["param_names"]
    assert matrices["algorithm"] == "htmuon" and len(matrices["params"]) == 4

    (opt,) = htmuon_optimizer_config(adamw_patterns=()).build(model_parts=[TinyLlama()]).optimizers
    routed = {g["algorithm"]: set(g["param_names"]) for g in opt.param_groups}
    assert {"tok_embeddings.weight", "output.weight", "norm.weight"} <= routed["adamw"]
    assert len(routed["htmuon"]) == 4

    with pytest.raises(ValueError, match=r"adamw_patterns: 'embed\(' is not a regex"):
        htmuon_optimizer_config(adamw_patterns=("embed(",))
    with pytest.raises(ValueError, match="algorithm is not an option"):
        htmuon_optimizer_config(algorithm="adamw")
