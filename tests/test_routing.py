"""Routing: HTMuon(model.named_parameters()) routes as htmuon.param_groups(model); the conventions of
other Muon libraries (use_muon, betas/eps, adamw_lr) are honoured; misspelt group keys are errors."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from helpers import tiny_llama
from htmuon import HTMuon, param_groups
from htmuon.routing import kind_from_name
from htmuon.train.models import ResNet


def by_algorithm(groups) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for g in groups:
        out.setdefault(g["algorithm"], set()).update(id(p) for p in g["params"])
    return out


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {
    "llama": lambda: tiny_llama(tied=False),
    "llama-tied": lambda: tiny_llama(tied=True),
    "gpt2": tiny_gpt2,
    "resnet": lambda: ResNet((8, 16), (1, 1), in_channels=3, num_classes=10),
    "sequential": lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LayerNorm(16)),
}


@pytest.mark.parametrize("routing", ["standard", "paper"])
@pytest.mark.parametrize("name", list(MODELS))
def test_named_parameters_route_like_param_groups(name, routing):
    model = MODELS[name]()
    by_names = by_algorithm(HTMuon(model.named_parameters(), routing=routing).param_groups)
    by_module = by_algorithm(param_groups(model, routing=routing))
    assert by_names == by_module


def test_named_routing_of_a_llama():
    model = tiny_llama(tied=False)
    opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=3e-3, weight_decay=0.1, adamw_weight_decay=0.0)
    hgroup, agroup = opt.param_groups
    assert (hgroup["algorithm"], hgroup["lr"], hgroup["weight_decay"]) == ("htmuon", 0.02, 0.1)
    assert (agroup["algorithm"], agroup["lr"], agroup["weight_decay"]) == ("adamw", 3e-3, 0.0)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(agroup["param_names"])
    assert all(p.ndim == 2 for p in hgroup["params"]) and len(hgroup["params"]) == 2 * 7
    assert "model.layers.0.self_attn.q_proj.weight" in hgroup["param_names"]
    paper = HTMuon(model.named_parameters(), routing="paper").param_groups
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(paper[0]["param_names"])


def test_bare_tensors_route_by_ndim():
    model = tiny_llama(tied=False)
    hgroup, agroup = HTMuon(model.parameters()).param_groups
    assert hgroup["algorithm"] == "htmuon" and "param_names" not in hgroup
    assert any(p is model.model.embed_tokens.weight for p in hgroup["params"])  # documented: by ndim
    assert any(p is model.lm_head.weight for p in hgroup["params"])
    assert all(p.ndim < 2 for p in agroup["params"])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.embed_tokens.weight", "embedding"),
        ("transformer.wte.weight", "embedding"),
        ("transformer.wpe.weight", "embedding"),
        ("shared.weight", "embedding"),
        ("pos_embed", "embedding"),
        ("cls_token", "embedding"),  # timm ViT: a bare 1 x 1 x d parameter
        ("vit.embeddings.cls_token", "embedding"),
        ("register_tokens", "embedding"),
        ("model.clsToken", "embedding"),  # the token suffix in any case
        ("gpt_neox.embed_out.weight", "embedding"),  # GPT-NeoX's output head
        ("lm_head.weight", "head"),
        ("fc.weight", "head"),
        ("blocks.0.mlp.fc1.weight", "matrix"),
        ("patch_embed.proj.weight", "matrix"),  # a conv stem, not a table
        ("encoder.layer.0.output.dense.weight", "matrix"),
        ("0.weight", "matrix"),
    ],
)
def test_kind_from_name(name, kind):
    assert kind_from_name(name, 2) == kind
    assert kind_from_name(name.replace("weight", "bias"), 1) == "vector"


def test_use_muon_groups_as_in_muon_with_aux_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    hidden, head = model[0], model[1]
    opt = HTMuon(
        [
            {"params": [hidden.weight], "use_muon": True, "lr": 0.02, "weight_decay": 0.0},
            {"params": [hidden.bias, *head.parameters()], "use_muon": False, "lr": 3e-3, "betas": (0.8, 0.9),
             "eps": 1e-8, "weight_decay": 0.1},
        ]
    )  # fmt: skip
    assert [g["algorithm"] for g in opt.param_groups] == ["htmuon", "adamw"]
    assert opt.param_groups[1]["adamw_betas"] == (0.8, 0.9) and opt.param_groups[1]["adamw_eps"] == 1e-8
    assert "use_muon" not in opt.param_groups[0] and "betas" not in opt.param_groups[1]
    # the use_muon=False group is plain AdamW: equal to torch's with the same settings
    ref_params = [p.detach().clone().requires_grad_() for p in opt.param_groups[1]["params"]]
    ref = torch.optim.AdamW(ref_params, lr=3e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        model(torch.randn(5, 6)).square().mean().backward()
        for p, q in zip(opt.param_groups[1]["params"], ref_params):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        opt.zero_grad()
    for p, q in zip(opt.param_groups[1]["params"], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_use_muon_errors():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"use_muon=False contradicts algorithm='htmuon' in param group 0"):
        HTMuon([{"params": [w], "use_muon": False, "algorithm": "htmuon"}])
    with pytest.raises(ValueError, match=r"Invalid use_muon in param group 0: 'yes'"):
        HTMuon([{"params": [w], "use_muon": "yes"}])
    with pytest.raises(ValueError, match=r"algorithm='htmuon' but parameter 0 has shape \(4,\)"):
        HTMuon([{"params": [nn.Parameter(torch.randn(4))], "use_muon": True}])


def test_adamw_options_at_construction():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    # routed groups: adamw_lr / adamw_weight_decay beat the group's generic lr / weight_decay
    groups = HTMuon(
        [{"params": model.parameters(), "lr": 0.05}], adamw_lr=1e-3, adamw_weight_decay=0.0, weight_decay=0.1
    ).param_groups
    assert [(g["algorithm"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("htmuon", 0.05, 0.1),
        ("adamw", 1e-3, 0.0),
    ]
    # pytorch-optimizer's adamw_wd is adamw_weight_decay
    groups = HTMuon([{"params": model.parameters(), "adamw_wd": 0.05}], weight_decay=0.1).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.05]
    # a group's own adamw_lr beats the optimizer's
    groups = HTMuon([{"params": model.parameters(), "adamw_lr": 2e-3}], adamw_lr=1e-3).param_groups
    assert groups[1]["lr"] == 2e-3 and "adamw_lr" not in groups[1]
    # explicit AdamW groups keep their own lr; those without one get adamw_lr
    explicit = HTMuon(param_groups(model, adamw_lr=5e-4), adamw_lr=1e-3).param_groups
    assert explicit[1]["lr"] == 5e-4
    assert HTMuon(param_groups(model), adamw_lr=1e-3, lr=0.03).param_groups[1]["lr"] == 1e-3
    # no adamw_lr: the AdamW part shares lr (as before)
    assert [g["lr"] for g in HTMuon(model.parameters(), lr=0.03).param_groups] == [0.03, 0.03]
    with pytest.raises(ValueError, match=r"Invalid adamw_lr: -0\.1"):
        HTMuon(model.parameters(), adamw_lr=-0.1)
    with pytest.raises(ValueError, match=r"Invalid routing: 'llama'"):
        HTMuon(model.parameters(), routing="llama")
    with pytest.raises(ValueError, match=r"adamw_lr / adamw_weight_decay set nothing in param group 0"):
        HTMuon([{"params": [model[0].weight], "algorithm": "htmuon", "adamw_lr": 1e-3}])


def test_misspelt_group_keys_are_errors():
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(
        ValueError, match=r"Unknown option 'momentm' in param group 0: did you mean 'momentum'"
    ):
        HTMuon([{"params": [w], "momentm": 0.9}])
    with pytest.raises(ValueError, match=r"'weight_decy' in param group 1: did you mean 'weight_decay'"):
        HTMuon([{"params": [w]}, {"params": [nn.Parameter(torch.randn(3))], "weight_decy": 0.0}])
    with pytest.raises(ValueError, match=r"'adam_lr' in param group 0: did you mean 'adamw_lr'"):
        HTMuon([{"params": [w], "adam_lr": 1e-3}])
    # an optimizer-wide keyword in a group would be ignored there (README: the one not per group)
    with pytest.raises(ValueError, match=r"process_group in param group 0 is set for the whole optimizer"):
        HTMuon([{"params": [w], "process_group": "garbage"}])
    # a group without its tensors (torch itself says only "KeyError: 'params'"), also one added later
    with pytest.raises(ValueError, match=r"no 'params' in param group 1: .* got keys \['lr'\]"):
        HTMuon([{"params": [w]}, {"lr": 0.02}])
    with pytest.raises(ValueError, match=r"no 'params' in param group 1"):
        HTMuon([w]).add_param_group({"lr": 0.02})
    # labels and scheduler keys that are no typos pass
    opt = HTMuon([{"params": [w], "name": "hidden", "initial_lr": 0.02, "my_tag": 3}])
    assert opt.param_groups[0]["my_tag"] == 3


def test_named_groups_resume_exactly():
    torch.manual_seed(0)
    model = tiny_llama(tied=False)
    tokens = torch.randint(0, 64, (2, 9))

    def step(m, opt):
        opt.zero_grad()
        m(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()

    opt = HTMuon(model.named_parameters(), lr=0.02, adamw_lr=1e-3)
    step(model, opt)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["param_groups"][1]["param_names"][0] == "model.embed_tokens.weight"
    step(model, opt)
    resumed = tiny_llama(tied=False)
    resumed.load_state_dict(saved_model)
    opt2 = HTMuon(resumed.named_parameters(), lr=0.02, adamw_lr=1e-3)
    opt2.load_state_dict(saved_opt)
    step(resumed, opt2)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------ groups added later, sets, shared tensors


def test_add_param_group_routes_and_checks_as_the_constructor():
    """A group added after construction gets the constructor's handling: use_muon, betas/eps aliases,
    adamw_lr, misspelt keys, names (an embedding added by name goes to AdamW)."""
    W, V, b = (nn.Parameter(torch.randn(*s)) for s in ((4, 4), (4, 4), (4,)))
    emb, U = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(4, 4))
    opt = HTMuon([W], lr=0.02, adamw_lr=1e-3)
    opt.add_param_group({"params": [V], "use_muon": False})
    opt.add_param_group({"params": [b], "algorithm": "adamw", "betas": (0.5, 0.6)})
    g_v, g_b = opt.param_groups[1:]
    assert not opt._uses_htmuon(g_v, V) and g_v["lr"] == 1e-3
    assert g_b["adamw_betas"] == (0.5, 0.6) and g_b["lr"] == 1e-3 and "betas" not in g_b
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"weight_decy.*param group 3"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "weight_decy": 0.1})
    assert len(opt.param_groups) == n  # nothing added
    opt = HTMuon([("layers.0.attn.weight", W)], lr=0.02, adamw_lr=1e-3)  # torch: all groups named, or none
    n = len(opt.param_groups)
    opt.add_param_group({"params": [("model.embed_tokens.weight", emb), ("layers.0.mlp.weight", U)]})
    assert [(g["algorithm"], g["param_names"]) for g in opt.param_groups[n:]] == [
        ("htmuon", ["layers.0.mlp.weight"]),
        ("adamw", ["model.embed_tokens.weight"]),
    ]
    assert opt.param_groups[-1]["lr"] == 1e-3


def test_a_set_of_params_in_a_group_is_refused_as_torch_does():
    W, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    for groups in ([{"params": {W, b}}], [{"params": {W}, "algorithm": "htmuon"}]):
        with pytest.raises(TypeError, match="ordered collections"):
            HTMuon(groups)


def test_split_groups_do_not_share_a_tensor_lr():
    """A scheduler changes a tensor lr in place: the two halves of a split group need their own."""
    model = nn.Linear(4, 4)
    lr = torch.tensor(0.02)
    opt = HTMuon(model.parameters(), lr=lr)
    (g_w, g_b) = opt.param_groups
    assert g_w["lr"] is not g_b["lr"] and torch.equal(g_w["lr"], g_b["lr"])
    own = HTMuon([{"params": nn.Linear(4, 4).parameters(), "lr": torch.tensor(0.02)}])  # the group's own lr
    assert own.param_groups[0]["lr"] is not own.param_groups[1]["lr"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 0.002], total_steps=10)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    assert float(g_w["lr"]) > 5 * float(g_b["lr"])  # each half follows its own max_lr


def test_load_state_dict_and_step_refuse_a_vector_in_an_htmuon_group():
    W, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    X = HTMuon([{"params": [W], "algorithm": "htmuon"}, {"params": [b], "algorithm": "adamw"}])
    Y = HTMuon([{"params": [b], "algorithm": "adamw"}, {"params": [W], "algorithm": "htmuon"}])
    before = copy.deepcopy(Y.state_dict())
    # the groups' sizes match but their order does not: the error says so (it advised "put it in an
    # algorithm='adamw' group", how to build groups, which these already are)
    with pytest.raises(ValueError) as e:
        Y.load_state_dict(X.state_dict())
    assert str(e.value).startswith(
        "loaded param group 0 is an algorithm='htmuon' group, this optimizer's group 0 is "
        "algorithm='adamw' and holds a parameter of shape (4,) that HTMuon cannot update: were the "
        "groups saved in another order?"
    ) and "put it in" not in str(e.value)
    assert str(Y.state_dict()) == str(before)
    Y.param_groups[0]["algorithm"] = "htmuon"  # edited after construction: the step re-checks it
    W.grad, b.grad = torch.randn(4, 4), torch.randn(4)
    with pytest.raises(ValueError, match=r"param group 0 has algorithm='htmuon'"):
        Y.step()
    assert not Y.state


@pytest.mark.parametrize("flag", ["maximize", "differentiable", "amsgrad"])
def test_torch_flags_htmuon_would_ignore_are_refused_when_set(flag):
    W = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=rf"{flag}=True in param group 0: HTMuon does not support it"):
        HTMuon([{"params": [W], flag: True}])
    HTMuon([{"params": [W], flag: False}])  # a copied group with the flag off is fine
    opt = HTMuon([W])
    with pytest.raises(ValueError, match=rf"{flag}=True in param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], flag: True})
    assert len(opt.param_groups) == 1
    # set on a group after construction (torch.optim reads it at every step), or in a loaded group: the
    # step and load_state_dict refuse it too (both ignored it, the step minimizing where asked to maximize)
    W.grad = torch.randn(4, 4)
    opt.param_groups[0][flag] = True
    with pytest.raises(ValueError, match=rf"{flag}=True in param group 0: HTMuon does not support it"):
        opt.step()
    assert not opt.state
    saved = opt.state_dict()
    opt.param_groups[0][flag] = False
    with pytest.raises(ValueError, match=rf"{flag}=True in loaded param group 0"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0][flag] is False
    opt.step()
    opt.param_groups[0].update(decoupled_weight_decay=False, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"decoupled_weight_decay=False in param group 0 \(its htmuon"):
        opt.step()


# ------------------------------------------------------------------ parametrized weights (parametrize)


def test_parametrized_weights_route_as_their_module():
    """torch.nn.utils.parametrize stores ``A.T`` as ``A.parametrizations.T.original[N]`` in a
    ParametrizationList: routing reads the owner ``A`` and tensor ``T``, by name and by module type."""
    P = pytest.importorskip("torch.nn.utils.parametrizations")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 16)  # a telling name
            self.table = nn.Embedding(32, 16)  # only its type tells
            self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)
            self.lm_head = nn.Linear(16, 32, bias=False)

    model = Net()
    P.spectral_norm(model.embed)
    P.spectral_norm(model.table)
    P.weight_norm(model.fc1)
    P.orthogonal(model.fc2)
    P.weight_norm(model.lm_head)
    named = dict(model.named_parameters())
    emb, tab, head, fc1, fc2 = (  # weight_norm: original0 the magnitude, original1 the direction
        f"{m}.parametrizations.weight.{o}"
        for m, o in [("embed", "original"), ("table", "original"), ("lm_head", "original1"),
                     ("fc1", "original1"), ("fc2", "original")]
    )  # fmt: skip
    assert {emb, tab, head, fc1, fc2} <= set(named)
    standard = by_algorithm(HTMuon(model.named_parameters()).param_groups)
    assert {id(named[emb]), id(named[head])} <= standard["adamw"]
    assert {id(named[fc1]), id(named[fc2])} <= standard["htmuon"]
    paper = by_algorithm(HTMuon(model.named_parameters(), routing="paper").param_groups)
    assert {id(named[emb]), id(named[head])} <= paper["htmuon"]
    # by module type: the parametrized nn.Embedding called "table" is an embedding too
    names = {g["algorithm"]: g["names"] for g in param_groups(model)}
    assert {emb, tab, head} <= set(names["adamw"]) and {fc1, fc2} <= set(names["htmuon"])
    assert tab not in names["htmuon"]
    # the name rule alone
    for name, kind in [
        ("lm_head.parametrizations.weight.original1", "head"),
        ("model.embed_tokens.parametrizations.weight.original", "embedding"),
        ("vit.parametrizations.pos_embed.original", "embedding"),  # a parametrized bare parameter
        ("blocks.0.fc1.parametrizations.weight.original0", "matrix"),
        ("parametrizations.weight.original", "matrix"),  # a parametrized root module
        ("layers.parametrizations.proj.weight", "matrix"),  # a module that happens to be called so
    ]:
        assert kind_from_name(name, 2) == kind, name


# ------------------------------------------------------------------ vectors in disguise


def test_matrices_with_at_most_one_dimension_above_one_go_to_adamw():
    """weight_norm's magnitude (out, 1), a (1, d) weight: their spectral update would be the normalised
    gradient, a step of about lr whatever the gradient's size. Automatic routing sends them to AdamW,
    by name, by ndim (bare tensors) and in param_groups; explicit marks are honoured."""
    P = pytest.importorskip("torch.nn.utils.parametrizations")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc1 = nn.Linear(16, 24)
            self.score = nn.Linear(24, 1)  # weight (1, 24)
            self.legacy = nn.Linear(24, 16)

    model = Net()
    P.weight_norm(model.conv)  # magnitude (8, 1, 1, 1)
    P.weight_norm(model.fc1)  # magnitude (24, 1)
    with warnings.catch_warnings():  # deprecated for the parametrization (a FutureWarning)
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(model.legacy)  # weight_g (16, 1), weight_v (16, 24)
    named = dict(model.named_parameters())
    vectors = {
        "conv.parametrizations.weight.original0",
        "fc1.parametrizations.weight.original0",
        "score.weight",
        "legacy.weight_g",
    }
    matrices = {f"{m}.parametrizations.weight.original1" for m in ("conv", "fc1")} | {"legacy.weight_v"}
    assert {tuple(named[n].shape) for n in vectors} == {(8, 1, 1, 1), (24, 1), (1, 24), (16, 1)}
    for routing in ("standard", "paper"):
        for groups in (
            HTMuon(model.named_parameters(), routing=routing).param_groups,
            param_groups(model, routing=routing),
            HTMuon(list(model.parameters()), routing=routing).param_groups,  # bare: by shape
        ):
            ids = by_algorithm(groups)
            assert {id(named[n]) for n in vectors} <= ids["adamw"]
            assert {id(named[n]) for n in matrices} <= ids["htmuon"]
    for name, shape, kind in [
        ("fc1.parametrizations.weight.original0", (24, 1), "vector"),
        ("fc1.weight_g", (24, 1, 1), "vector"),
        ("cls_token", (1, 1, 16), "vector"),  # a ViT's class token: a vector either way
        ("lm_head.weight", (1, 16), "vector"),
        ("table", (1, 1), "vector"),
        ("fc1.weight", (24, 16), "matrix"),
        ("experts.w1", (4, 1, 16), "vector"),  # batch_3d: four 1 x 16 matrices, rank 1 each
        ("experts.w2", (4, 2, 16), "matrix"),
        ("conv.weight", (1, 64, 3, 3), "vector"),  # one output channel: a 1 x 576 matrix
        ("dwconv.weight", (64, 1, 3, 3), "matrix"),  # depthwise: 64 x 9
        ("blocks.0.mlp.weight", (4, 0), "matrix"),  # empty: no update at all, routed as before
        ("lm_head.weight", (32, 16), "head"),
    ]:
        assert kind_from_name(name, len(shape), shape=shape) == kind, (name, shape)
    assert kind_from_name("fc1.weight_g", 2) == "matrix"  # without a shape: by ndim, as before
    # as batch_3d=False views it, a 3-D tensor is one flattened matrix (a depthwise Conv1d kernel)
    assert kind_from_name("dw.weight", 3, shape=(8, 1, 5), batch_3d=False) == "matrix"
    assert kind_from_name("dw.weight", 3, shape=(8, 1, 5)) == "vector"
    dw = nn.Sequential(nn.Conv1d(8, 8, 5, groups=8))
    assert [g["algorithm"] for g in param_groups(dw)] == ["htmuon", "adamw"]  # flattened: 8 x 5
    assert [g["algorithm"] for g in HTMuon(dw.named_parameters()).param_groups] == ["adamw"]
    assert [g["algorithm"] for g in HTMuon(dw.named_parameters(), batch_3d=False).param_groups] == [
        "htmuon",
        "adamw",
    ]
    # explicit marks are honoured: the spectral update, as before
    g = named["fc1.parametrizations.weight.original0"]
    for group in ({"params": [g], "use_muon": True}, {"params": [g], "algorithm": "htmuon"}):
        assert [x["algorithm"] for x in HTMuon([group]).param_groups] == ["htmuon"]
    assert [x["algorithm"] for x in HTMuon([g], algorithm="htmuon").param_groups] == ["htmuon"]


# ------------------------------------------------------------------ embedding names


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("tok_emb.weight", "embedding"),  # minGPT, lucidrains
        ("transformer.pos_emb.weight", "embedding"),
        ("token_emb.weight", "embedding"),
        ("emb.weight", "embedding"),
        ("model.emb_tokens.weight", "embedding"),
        ("pos_emb", "embedding"),  # minGPT's bare nn.Parameter (1, block_size, d)
        ("blocks.0.member.weight", "matrix"),  # components, not substrings
        ("blocks.0.emblem.weight", "matrix"),
        ("blocks.0.attn.q_emb_proj2.weight", "matrix"),
    ],
)
def test_emb_names_are_embeddings(name, kind):
    assert kind_from_name(name, 2) == kind


def test_a_mingpt_routes_its_emb_tables_to_adamw():
    class MinGPT(nn.Module):
        def __init__(self, vocab=32, block=8, d=16):
            super().__init__()
            self.tok_emb = nn.Embedding(vocab, d)
            self.pos_emb = nn.Parameter(torch.zeros(1, block, d))
            self.blocks = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

    model = MinGPT()
    for routing in ("standard", "paper"):
        by_names = by_algorithm(HTMuon(model.named_parameters(), routing=routing).param_groups)
        assert by_names == by_algorithm(param_groups(model, routing=routing))
        tables = {id(model.tok_emb.weight), id(model.pos_emb)}
        assert tables <= by_names["adamw" if routing == "standard" else "htmuon"]


# ------------------------------------------------------------------ Conv1d kernels in param_groups


def test_param_groups_flatten_conv1d_kernels():
    """batch_3d=True (stacked experts (E, m, n)) would update an nn.Conv1d kernel (out, in, k) as
    ``out`` separate in x k matrices; param_groups knows the module types and gives the Conv1d /
    ConvTranspose1d kernels batch_3d=False (flattened to out x in*k), in a group of their own when
    other 3-D parameters keep batch_3d=True."""
    P = pytest.importorskip("torch.nn.utils.parametrizations")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.up = nn.Conv1d(4, 8, 3), nn.ConvTranspose1d(8, 4, 3)
            self.wn = P.weight_norm(nn.Conv1d(4, 8, 5))  # (8, 4, 5) direction, (8, 1, 1) magnitude
            self.proj = nn.Linear(8, 8)

    model = Net()
    kernels = ["conv.weight", "up.weight", "wn.parametrizations.weight.original1"]
    groups = param_groups(model, lr=0.05)
    assert [g["algorithm"] for g in groups] == ["htmuon", "adamw"]  # no other 3-D parameter: one group
    assert groups[0]["batch_3d"] is False and groups[0]["names"] == [*kernels, "proj.weight"]
    assert groups[0]["lr"] == 0.05
    model.experts = nn.Parameter(torch.randn(3, 8, 8))  # stacked matrices: batched
    for options in ({}, {"batch_3d": True}):
        groups = param_groups(model, lr=0.05, p=0.25, **options)
        assert [g["algorithm"] for g in groups] == ["htmuon", "htmuon", "adamw"]
        assert groups[0]["names"] == ["experts", "proj.weight"] and groups[0].get("batch_3d", True) is True
        assert groups[1]["names"] == kernels and groups[1]["batch_3d"] is False
        assert groups[1]["lr"] == 0.05 and groups[1]["p"] == 0.25
    flat = param_groups(model, batch_3d=False)  # all flattened: one group
    assert [(g["algorithm"], g.get("batch_3d")) for g in flat] == [("htmuon", False), ("adamw", None)]
    # the step: the kernel's update is its flattened matrix's, the experts' their batch's
    opt = HTMuon(param_groups(model), lr=0.1, method="svd")
    conv, experts = model.conv.weight, model.experts
    refs = {}
    for p, batch_3d in ((conv, False), (experts, True)):
        q = nn.Parameter(p.detach().clone())
        refs[p] = (q, HTMuon([q], lr=0.1, method="svd", batch_3d=batch_3d))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for p, (q, ref) in refs.items():
        q.grad = p.grad.clone()
        ref.step()
    opt.step()
    for p, (q, _) in refs.items():
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ a group's own lr / weight_decay


def test_an_all_adamw_group_keeps_its_own_lr_and_weight_decay():
    """nanoGPT / HF-style groups (decay / no decay): a user group all of whose parameters route to
    AdamW keeps the lr and weight_decay it sets; what it does not set comes from adamw_lr /
    adamw_weight_decay (its own adamw_lr / adamw_weight_decay first); mixed groups as before. The same
    at add_param_group and after a state_dict round trip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    wide = dict(lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.05)

    def settings(opt):
        return [(g["algorithm"], len(g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]

    def build():
        return HTMuon(
            [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0, "lr": 3e-4}],
            **wide,
        )

    opt = build()
    assert settings(opt) == [("htmuon", 2, 0.02, 0.1), ("adamw", 4, 3e-4, 0.0)]
    # what the group does not set: from adamw_lr / adamw_weight_decay, as before
    only_wd = HTMuon([{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], **wide)
    assert settings(only_wd) == [("htmuon", 2, 0.02, 0.0), ("adamw", 4, 1e-3, 0.0)]
    # the group's own adamw_lr / adamw_weight_decay beat its lr / weight_decay
    own = HTMuon(
        [{"params": vectors, "lr": 3e-4, "adamw_lr": 2e-3, "weight_decay": 0.2, "adamw_wd": 0.01}], **wide
    )
    assert settings(own) == [("adamw", 4, 2e-3, 0.01)]
    # named: an all-AdamW group of embeddings and norms keeps its settings too
    emb = nn.Embedding(10, 8)
    named = HTMuon(
        [{"params": [("embed.weight", emb.weight), ("norm.bias", vectors[0])], "lr": 5e-4}], **wide
    )
    assert settings(named) == [("adamw", 2, 5e-4, 0.05)]
    # a mixed group: its lr / weight_decay are the HTMuon half's, the AdamW half takes adamw_* (as before)
    mixed = HTMuon([{"params": model.parameters(), "lr": 0.05, "weight_decay": 0.1}], **wide)
    assert settings(mixed) == [("htmuon", 2, 0.05, 0.1), ("adamw", 4, 1e-3, 0.05)]
    # add_param_group: the same rule
    later = HTMuon([{"params": matrices, "weight_decay": 0.1}], **wide)
    later.add_param_group({"params": vectors, "weight_decay": 0.0, "lr": 3e-4})
    assert settings(later) == settings(opt)
    # state_dict round trip: a rebuilt optimizer has the same groups and continues exactly
    x = torch.randn(5, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert [(g["lr"], g["weight_decay"]) for g in saved_opt["param_groups"]] == [(0.02, 0.1), (3e-4, 0.0)]
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    expected = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved_model)
    resumed = build()
    resumed.load_state_dict(saved_opt)
    assert settings(resumed) == settings(opt)
    resumed.zero_grad()
    model(x).square().mean().backward()
    resumed.step()
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p, q)


def test_adamw_flags_that_change_the_update_are_refused():
    """amsgrad=True, and decoupled_weight_decay=False (Adam's L2 penalty) where a part of the group
    decays, would be silently ignored. At weight decay 0 the two decays are the same update (none), so a
    group copied from torch.optim.Adam without decay is accepted (it was refused) unless routing gives
    one of its parts a decay (the AdamW part's adamw_weight_decay: it was accepted); a tensor
    weight_decay is read as its value (it was accepted whatever it held)."""
    w, m = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="^amsgrad=True in param group 0: "):
        HTMuon([dict(params=[w], use_muon=False, amsgrad=True)])
    adamw_part, htmuon_part = "its adamw part's weight_decay", "its htmuon part's weight_decay"
    for group, kw, shown in (
        (dict(params=[w], use_muon=False, weight_decay=0.1), {}, f"{adamw_part} 0.1"),
        (dict(params=[w], use_muon=False), dict(weight_decay=0.01), f"{adamw_part} 0.01"),
        (dict(params=[w], use_muon=False), dict(adamw_weight_decay=0.1), f"{adamw_part} 0.1"),
        (dict(params=[m, w], weight_decay=0.0), dict(adamw_weight_decay=0.1), f"{adamw_part} 0.1"),
        (dict(params=[m, w]), dict(weight_decay=0.1, adamw_weight_decay=0.0), f"{htmuon_part} 0.1"),
        # a tensor decay too (it was accepted, and ignored as a float one would be)
        (dict(params=[w], use_muon=False, weight_decay=torch.tensor(0.25)), {}, f"{adamw_part} 0.25"),
        (dict(params=[m], weight_decay=torch.tensor([0.25])), {}, f"{htmuon_part} 0.25"),
    ):
        with pytest.raises(
            ValueError, match=re.escape(f"decoupled_weight_decay=False in param group 0 ({shown})")
        ):
            HTMuon([dict(group, decoupled_weight_decay=False)], **kw)
    HTMuon([dict(params=[w], use_muon=False, amsgrad=False, decoupled_weight_decay=True)])
    HTMuon([dict(params=[m, w], weight_decay=torch.tensor(0.0), decoupled_weight_decay=False)])  # no decay
    # groups copied whole from torch.optim.AdamW, and from torch.optim.Adam without decay, are accepted
    HTMuon([dict(torch.optim.AdamW([w]).param_groups[0], use_muon=False)])
    adam = dict(torch.optim.Adam([m, w]).param_groups[0], decoupled_weight_decay=False)
    assert adam["weight_decay"] == 0
    HTMuon([adam], weight_decay=0.1, adamw_weight_decay=0.0)  # the group's own 0 for its HTMuon part
    HTMuon([dict(adam, params=[w], use_muon=False)], weight_decay=0.1, adamw_weight_decay=0.1)  # its own 0


@pytest.mark.parametrize("key", ["adamw_lr", "adamw_weight_decay"])
def test_non_finite_adamw_settings_are_refused_at_construction(key):
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=f"Invalid {key}: inf"):
        HTMuon([w], **{key: float("inf")})


def test_other_optimizers_names_are_refused_only_where_they_contradict():
    """``betas`` / ``eps`` / ``adamw_wd`` beside HTMuon's own key: another value is refused with both
    named; the same value is accepted, ``betas`` as a list (a JSON config) and as a tuple alike (a list
    was refused as a contradiction of the equal tuple)."""
    w = nn.Parameter(torch.randn(4))
    for alias, key, a, b in (
        ("betas", "adamw_betas", (0.8, 0.9), (0.9, 0.99)),
        ("eps", "adamw_eps", 1e-8, 1e-6),
        ("adamw_wd", "adamw_weight_decay", 0.1, 0.0),
    ):
        message = f"{alias}={a!r} contradicts {key}={b!r} in param group 0"
        with pytest.raises(ValueError, match=re.escape(message)):
            HTMuon([{"params": [w], alias: a, key: b}])
    for betas, adamw_betas in (([0.8, 0.9], (0.8, 0.9)), ((0.8, 0.9), [0.8, 0.9]), ((0.8, 0.9), (0.8, 0.9))):
        group = HTMuon([{"params": [w], "betas": betas, "adamw_betas": adamw_betas}]).param_groups[0]
        assert group["adamw_betas"] == (0.8, 0.9) and "betas" not in group


def test_param_groups_lr_and_weight_decay_are_the_htmuon_groups():
    """param_groups' lr / weight_decay set the HTMuon group only: the AdamW group (norms, biases,
    embeddings) takes adamw_lr / adamw_weight_decay, else the optimizer's."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    hgroup, agroup = param_groups(model, lr=0.05, weight_decay=0.1)
    assert (hgroup["lr"], hgroup["weight_decay"]) == (0.05, 0.1)
    assert "lr" not in agroup and "weight_decay" not in agroup
    groups = HTMuon(param_groups(model, lr=0.05, weight_decay=0.1), lr=0.02, weight_decay=0.0).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.05, 0.1), (0.02, 0.0)]
    groups = HTMuon(param_groups(model, weight_decay=0.1, adamw_weight_decay=0.01)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.01]


def test_param_groups_give_the_adamw_parts_own_options_to_its_group():
    """Options the AdamW part reads (adamw_betas, adamw_eps, check_finite; betas / eps as aliases)
    reach the AdamW group as they do through HTMuon(..., **options); the HTMuon-only ones do not."""
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    options = {"adamw_betas": (0.8, 0.9), "adamw_eps": 1e-6, "check_finite": False}
    via_groups = HTMuon(param_groups(model, p=0.25, **options)).param_groups
    via_optimizer = HTMuon(param_groups(model), p=0.25, **options).param_groups
    for g, h in zip(via_groups, via_optimizer):
        assert (g["adamw_betas"], g["adamw_eps"], g["check_finite"]) == ((0.8, 0.9), 1e-6, False)
        assert (h["adamw_betas"], h["adamw_eps"], h["check_finite"]) == ((0.8, 0.9), 1e-6, False)
    assert "p" not in param_groups(model, p=0.25)[1]
    agroup = HTMuon(param_groups(model, betas=[0.7, 0.8], eps=1e-7)).param_groups[1]
    assert (agroup["algorithm"], agroup["adamw_betas"], agroup["adamw_eps"]) == ("adamw", (0.7, 0.8), 1e-7)
    # and the AdamW part steps with them: a NaN gradient in a norm gain is taken, not refused
    opt = HTMuon(param_groups(model, check_finite=False), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    model[1].weight.grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 0 and torch.isnan(model[1].weight[0])


def test_a_groups_own_batch_3d_decides_its_routing():
    """A group's batch_3d (not only the optimizer's) decides whether a 3-D tensor is a batch of
    matrices or one flattened matrix, so whether (4, 1, 8) is four 1 x 8 vectors or a 4 x 8 matrix."""
    stacked = nn.Parameter(torch.randn(4, 1, 8))
    assert [g["algorithm"] for g in HTMuon([{"params": [stacked]}]).param_groups] == ["adamw"]
    for params in ([stacked], [("experts.w1", stacked)]):
        groups = HTMuon([{"params": params, "batch_3d": False}]).param_groups
        assert [(g["algorithm"], g["batch_3d"]) for g in groups] == [("htmuon", False)]
    groups = HTMuon([{"params": [stacked], "batch_3d": True}], batch_3d=False).param_groups
    assert [g["algorithm"] for g in groups] == ["adamw"]


def test_numpy_false_settings_route_as_false():
    """HTMuon takes a NumPy bool (a config sweep's value) as the Python one, but routing read only
    ``False`` itself as false: a group's ``batch_3d=np.False_`` routed a (c, 1, k) kernel as c stacked
    1 x k rows (AdamW) while the step then flattened it (a c x k matrix), and ``param_groups(model,
    batch_3d=np.False_)`` did the same; ``decoupled_weight_decay=np.False_`` (Adam's L2 penalty) on a
    decaying group was not refused; ``use_muon=np.False_`` was refused ("must be True or False").
    Now each is what ``False`` gives."""
    np = pytest.importorskip("numpy")
    kernel = nn.Parameter(torch.randn(8, 1, 3))
    for flag in (False, np.False_):
        groups = HTMuon([{"params": [kernel], "batch_3d": flag}]).param_groups
        assert [(g["algorithm"], g["batch_3d"]) for g in groups] == [("htmuon", False)], flag
        model = nn.Sequential(nn.Linear(4, 4))
        model.register_parameter("w3", nn.Parameter(torch.randn(8, 1, 3)))
        routed = [(g["algorithm"], g["names"]) for g in param_groups(model, batch_3d=flag)]
        assert routed == [("htmuon", ["w3", "0.weight"]), ("adamw", ["0.bias"])], flag
        w = nn.Parameter(torch.randn(4))
        with pytest.raises(ValueError, match=r"^decoupled_weight_decay=False in param group 0 "):
            HTMuon([dict(params=[w], use_muon=False, weight_decay=0.1, decoupled_weight_decay=flag)])
        groups = HTMuon([dict(params=[w], use_muon=flag), dict(params=[kernel], use_muon=not flag)])
        assert [g["algorithm"] for g in groups.param_groups] == ["adamw", "htmuon"], flag
