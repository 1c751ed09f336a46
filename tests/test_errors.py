"""Bad input: a clear error naming the bad value, and nothing changed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers import needs_torch_muon
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
        ({"adamw_betas": (0.9, 1.0)}, r"Invalid adamw_betas: \(0\.9, 1\.0\)"),  # 1 - beta^t = 0
        ({"plugin": "normuon", "plugin_eps": 0.0}, r"Invalid plugin_eps: 0\.0 \(must be > 0"),
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


# ------------------------------------------------------------------ a refused step changes nothing


def _trained(seed=0, **kw):
    """A small model and optimizer after two good steps, with a third gradient waiting."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = HTMuon(param_groups(model), lr=0.05, **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 6)).square().sum().backward()
        if _ < 2:
            opt.step()
    return model, opt


def _fresh_twin(model, **kw):
    """The same weights and waiting gradient as ``model``, under a new optimizer with no state: what a
    load must fill (a twin trained alike would already hold the state it "loads")."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    return twin, HTMuon(param_groups(twin), lr=0.05, **kw)


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for pid, s in state["state"].items():
        assert after["state"][pid].keys() == s.keys()
        for key, value in s.items():
            got = torch.as_tensor(after["state"][pid][key])
            torch.testing.assert_close(got, torch.as_tensor(value), rtol=0, atol=0, equal_nan=True)
    assert str(after["param_groups"]) == str(state["param_groups"])


def test_tensor_lr_as_torch_optim():
    """A 1-element tensor lr (any number of dims) steps as the float; other tensor lrs are refused."""
    W0, G = torch.randn(6, 10), torch.randn(6, 10)
    out = []
    for lr in (0.02, torch.tensor(0.02), torch.tensor([0.02]), torch.tensor([[0.02]])):
        W = nn.Parameter(W0.clone())
        b = nn.Parameter(torch.ones(3))
        opt = HTMuon([W, b], lr=lr)
        W.grad, b.grad = G.clone(), torch.ones(3)
        opt.step()
        out.append((W.detach().clone(), b.detach().clone()))
    for W, b in out[1:]:
        assert torch.equal(W, out[0][0]) and torch.equal(b, out[0][1])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        HTMuon([nn.Parameter(W0.clone())], lr=torch.tensor([0.01, 0.02]))


@pytest.mark.parametrize(("key", "value"), [("lr", float("inf")), ("weight_decay", float("inf"))])
def test_infinite_lr_and_weight_decay_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"Invalid {key}: inf"):
        HTMuon([nn.Parameter(torch.randn(4, 4))], **{key: value})


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("method", "bogus", r"Invalid method in param group 0: 'bogus'"),
        ("lr", torch.tensor([1e-3, 2e-3]), r"Tensor lr must be 1-element"),
        ("lr", float("nan"), r"Invalid lr in param group 1: nan"),
        ("plugin", "adam", r"Invalid plugin in param group 0: 'adam'"),
        ("check_finite", None, r"Invalid check_finite in param group 1"),
    ],
)
def test_group_value_edited_after_construction_is_refused_before_anything_changes(key, value, match):
    model, opt = _trained()
    gi = 0 if key in ("method", "plugin") else 1  # 1: the AdamW group, stepped after the matrices
    opt.param_groups[gi][key] = value
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_first_step_refused_creates_no_state():
    model, opt = nn.Linear(4, 3), None
    opt = HTMuon(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    model.bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert len(opt.state) == 0


def _failing_backend(fail_on: set):
    """A backend that raises (or returns NaN) on matrix batches of the shapes in ``fail_on``."""
    from htmuon.spectral import BACKENDS

    def fn(X, p, spectrum, **_):
        if tuple(X.shape[-2:]) in fail_on:
            if "nan" in fail_on:
                return torch.full_like(X, float("nan"))
            raise ValueError(f"backend failure on {tuple(X.shape)}")
        return BACKENDS["svd"].fn(X, p, spectrum)

    return fn


@pytest.fixture
def failing_backend():
    from htmuon.spectral import BACKENDS, register_backend

    made = []

    def make(fail_on):
        """The backend's name and the set of failing shapes (empty until the test fills it)."""
        failing = set()
        register_backend("test_failing", _failing_backend(failing), replace=True)
        made.append(1)
        return "test_failing", lambda: failing.update(fail_on)

    yield make
    BACKENDS.pop("test_failing", None)


def test_backend_exception_mid_step_changes_nothing(failing_backend):
    """The second bucket's backend call raises: the first bucket's direction was computed, but nothing
    (parameter, momentum, step count, AdamW part) was changed."""
    method, arm = failing_backend({(2, 8)})  # the last layer, after the 8x6 and 8x8 buckets
    model, opt = _trained(method=method)
    arm()
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"backend failure on \(1, 2, 8\)"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_non_finite_direction_falls_back_to_the_exact_rule(failing_backend):
    method, arm = failing_backend({(2, 8), "nan"})
    model, opt = _trained(method=method, momentum=0.0, nesterov=False)
    arm()
    ref, ref_opt = _trained(method="svd", momentum=0.0, nesterov=False)
    ref_opt.step()
    with pytest.warns(RuntimeWarning, match=r"'test_failing' returned NaN or Inf .* exact float64 SVD"):
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tall", [False, True], ids=["wide", "tall"])
@pytest.mark.parametrize("failure", ["nan", "raise"])
def test_a_failing_matrix_leaves_its_neighbours_directions_as_they_are_alone(failure, tall):
    """A backend that fails on one matrix of a batch (NaN, or LinAlgError for the batch): only that
    matrix gets the exact float64 SVD rule; the others keep the backend's result, bit for bit what
    they get alone. The whole batch was replaced, so a matrix's direction depended on what it was
    batched with: a 3-D parameter's stack, and on accelerators a chunk, of which a DDP / FSDP2 owner
    holds only its own share (its matrices then got the backend's result there and the exact rule in
    the single process)."""
    from htmuon import functional as F
    from htmuon.spectral import BACKENDS, register_backend

    def fn(X, p, spectrum, **_):  # the ns map; fails on a matrix whose first row is zero (X is wide)
        marked = (X[:, 0, :] == 0).all(-1)
        if bool(marked.any()) and failure == "raise":
            raise torch.linalg.LinAlgError("test failure")
        out = BACKENDS["ns"].fn(X, p, spectrum)
        return torch.where(marked[:, None, None], torch.full_like(out, float("nan")), out)

    register_backend("test_one_fails", fn, replace=True)
    try:
        g = torch.Generator().manual_seed(0)
        A, bad, C = (torch.randn(16, 24, generator=g) for _ in range(3))
        bad[0] = 0.0
        A, bad, C = (x.T.contiguous() if tall else x for x in (A, bad, C))
        group = dict(method="test_one_fails", p=0.125, spectrum="power", scale="raw")
        with pytest.warns(RuntimeWarning, match="exact float64 SVD rule"):
            batch = F.safe_direction(torch.stack([A, bad, C]), group, True)
        for i, x in ((0, A), (2, C)):
            alone = F.safe_direction(x[None], group, True)[0]
            assert torch.equal(batch[i], alone.to(batch.dtype)), i
            assert batch[i].stride() == alone.stride(), i  # a tall direction's layout kept
        with pytest.warns(RuntimeWarning):
            assert torch.equal(batch[1], F.safe_direction(bad[None], group, True)[0])
        assert rel_err_float(batch[1], F.exact_direction(bad[None], group, True)[0]) < 1e-6
    finally:
        BACKENDS.pop("test_one_fails", None)


def rel_err_float(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_windows_bounded_by_chunk_bytes_report_what_was_applied(failing_backend):
    """With chunk_bytes too small for one window, earlier windows are applied and the error says so."""
    method, arm = failing_backend({(2, 8)})
    model, opt = _trained(method=method, chunk_bytes=1)
    arm()
    first = model[0].weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"2 parameter\(s\) were already updated by this step.*each window of chunk_bytes=1, in turn",
    ):
        opt.step()
    assert not torch.equal(first, model[0].weight)


def test_failure_in_a_later_group_says_what_earlier_groups_applied(failing_backend):
    """Groups are applied in turn: a backend failing in group 2 leaves group 1 stepped, and the error
    says so (a caller must not simply retry the step)."""
    method, arm = failing_backend({(4, 4)})
    torch.manual_seed(0)
    A, B = nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(4, 4))
    opt = HTMuon([{"params": [A], "method": "svd"}, {"params": [B], "method": method}])
    arm()
    A.grad, B.grad = torch.randn(3, 5), torch.randn(4, 4)
    A0, B0 = A.detach().clone(), B.detach().clone()
    budget = r"each window of chunk_bytes='auto' \(32 MiB on CPU, 48 MiB on accelerators\), in turn"
    with pytest.raises(ValueError, match=r"1 parameter\(s\) were already updated by this step.*" + budget):
        opt.step()
    assert not torch.equal(A, A0) and torch.equal(B, B0)
    assert float(opt.state[A]["step"]) == 1.0 and B not in opt.state


def test_nan_momentum_in_state_refuses_the_step():
    model, opt = _trained(method="ns")  # ns would let NaN flow through without the check
    opt.state[model[2].weight]["momentum_buffer"][0, 0] = float("nan")
    snap = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match=r"updated buffer, or its Nesterov blend\) holds NaN"):
        opt.step()
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("method", ["ns", "fast", "eigh"])
def test_momentum_that_overflows_from_finite_values_refuses_the_step(method):
    """A finite buffer and a finite gradient of opposite signs near float32's range: the momentum update
    overflows. The step is refused, nothing changes, and the message does not blame the buffer alone."""
    model, opt = _trained(method=method)
    W = model[2].weight
    opt.state[W]["momentum_buffer"].fill_(3e38)
    W.grad.fill_(-3e38)
    assert torch.isfinite(W.grad).all()
    snap = _snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match=r"finite values near the dtype's range that overflowed"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def _load_refused(sd, match, **kw):
    model, opt = _trained(**kw)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(model, opt, snap)
    opt.step()  # still works


def test_load_state_dict_refuses_non_finite_state():
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["momentum_buffer"][0, 0] = float("nan")
    _load_refused(sd, r"parameter '0\.weight': momentum_buffer holds NaN or Inf")


def test_load_state_dict_refuses_a_non_finite_plugin_moment():
    model, opt = _trained(plugin="normuon")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["second_moment"][0, 0, 0] = float("nan")
    _load_refused(sd, r"parameter '0\.weight': second_moment holds NaN or Inf", plugin="normuon")


def test_load_state_dict_refuses_a_negative_average_of_squares():
    """An average of squares (AdamW's exp_avg_sq, NormuON's second_moment) is >= 0; a negative one (a
    damaged or edited state dict) loaded before and the next step put NaN into the parameters, silently."""
    for plugin, pid, key in ((None, 3, "exp_avg_sq"), ("normuon", 0, "second_moment")):
        kw = {"plugin": plugin} if plugin else {}
        model, opt = _trained(**kw)
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][pid][key].view(-1)[0] = -1.0
        _load_refused(sd, rf"{key} holds negative values \(an average of squares is >= 0\)", **kw)


def test_load_state_dict_checks_state_in_the_dtype_it_is_cast_to():
    """torch.optim casts loaded state to the parameter's dtype: a float32 momentum beyond float16's
    range is refused on a float16 parameter (not loaded as Inf); an average of squares that a float16
    step itself overflows to +Inf (the update is then 0, as in torch.optim.AdamW) reloads, while NaN
    or -Inf there is still refused."""
    W = nn.Parameter(torch.randn(4, 4, dtype=torch.float16))
    b = nn.Parameter(torch.randn(4, dtype=torch.float16))
    opt = HTMuon([W, b], adamw_lr=1e-3, adamw_betas=(0.9, 0.95))
    W.grad, b.grad = torch.randn(4, 4, dtype=torch.float16), torch.full((4,), 2000.0, dtype=torch.float16)
    opt.step()  # 0.05 * 2000**2 = 2e5 > 65504
    sd = copy.deepcopy(opt.state_dict())
    assert torch.isinf(sd["state"][1]["exp_avg_sq"]).all()
    HTMuon([W, b], adamw_lr=1e-3, adamw_betas=(0.9, 0.95)).load_state_dict(copy.deepcopy(sd))  # its own
    for bad in (float("nan"), -math.inf):
        broken = copy.deepcopy(sd)
        broken["state"][1]["exp_avg_sq"][0] = bad
        with pytest.raises(ValueError, match=r"exp_avg_sq holds NaN or Inf$"):
            HTMuon([W, b], adamw_lr=1e-3).load_state_dict(broken)
    wide = copy.deepcopy(sd)
    wide["state"][0]["momentum_buffer"] = torch.full((4, 4), 1e6)  # float32, finite
    fresh = HTMuon([W, b], adamw_lr=1e-3)
    with pytest.raises(
        ValueError, match=r"momentum_buffer holds NaN or Inf after the cast to the parameter's dtype float16"
    ):
        fresh.load_state_dict(wide)
    assert not fresh.state


def test_loaded_step_counters_are_fresh_tensors():
    """Loading never shares a step counter with the caller's dict (the step counts in place), and
    an integer counter becomes torch.optim's float32 tensor."""
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    saved = {pid: float(s["step"]) for pid, s in sd["state"].items()}
    sd["state"][0]["step"] = torch.tensor(2, dtype=torch.int64)
    twin, twin_opt = _fresh_twin(model)
    twin_opt.load_state_dict(sd)
    for p, q in zip(opt.param_groups[0]["params"], twin_opt.param_groups[0]["params"]):
        assert torch.equal(twin_opt.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    twin_opt.step()
    assert {pid: float(s["step"]) for pid, s in sd["state"].items()} == saved
    assert all(s["step"].dtype == torch.float32 for s in twin_opt.state.values())
    assert all(float(s["step"]) == 3.0 for s in twin_opt.state.values())


def test_state_edited_after_construction_is_refused_before_anything_changes():
    """State broken in place (not through load_state_dict) is caught by the step's own check, before
    any parameter of the step changes: a broadcastable wrong-shape buffer would otherwise fail (or
    broadcast) in the momentum update after earlier parameters were already updated."""
    model, opt = _trained()
    opt.state[model[2].weight]["momentum_buffer"] = torch.zeros(1, 8)
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"momentum_buffer has shape \(1, 8\), expected \(8, 8\)"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    model, opt = _trained()
    del opt.state[model[2].weight]["step"]
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"lacks \['step'\]"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_state_of_another_dtype_than_its_parameter_is_refused_before_anything_changes():
    """``model.to(dtype)`` after a step leaves the state in the old dtype (torch.optim casts state only
    in ``load_state_dict``): the step's check refuses it, naming that remedy, before any parameter
    changes. It failed in a later group's momentum lerp, after the earlier groups were applied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    first, second = model
    groups = [[first.weight], [second.weight], [first.bias, second.bias]]
    opt = HTMuon([{"params": g} for g in groups], lr=0.05)
    model(torch.randn(5, 6)).square().sum().backward()
    opt.step()
    second.double()
    opt.zero_grad()
    second(first(torch.randn(5, 6)).double()).square().sum().backward()
    snap = _snapshot(model, opt)
    with pytest.raises(
        ValueError,
        match=r"momentum_buffer is torch\.float32 on cpu, the parameter torch\.float64 on cpu .* "
        r"opt\.load_state_dict\(opt\.state_dict\(\)\) casts",
    ):
        opt.step()
    _assert_unchanged(model, opt, snap)
    opt.load_state_dict(opt.state_dict())  # the remedy: the state in its parameter's dtype
    opt.step()
    assert all(s[k].dtype == p.dtype for p, s in opt.state.items() for k in s if k != "step")


@pytest.mark.parametrize("other", ["adamw", pytest.param("muon", marks=needs_torch_muon)])
def test_load_state_dict_refuses_a_foreign_optimizer(other):
    model, _ = _trained()
    groups = [
        {"params": [p for p in model.parameters() if p.ndim == 2]},
        {"params": [p for p in model.parameters() if p.ndim == 1]},
    ]
    foreign = torch.optim.AdamW(groups) if other == "adamw" else torch.optim.Muon(groups[:1])
    if other == "muon":
        foreign.add_param_group({"params": groups[1]["params"]})  # Muon refuses vectors only at step
    model(torch.randn(2, 6)).sum().backward()
    if other == "adamw":
        foreign.step()
    _load_refused(
        foreign.state_dict(), r"not an HTMuon state dict: loaded param group 0 lacks the keys \['p'"
    )


def test_load_state_dict_refuses_mismatched_state():
    model, opt = _trained()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    _load_refused(bad, r"parameter '0\.weight': momentum_buffer has shape \(3, 3\), expected \(8, 6\)")
    bad = copy.deepcopy(sd)
    del bad["state"][0]["momentum_buffer"]
    _load_refused(
        bad, r"parameter '0\.weight' \(shape \(8, 6\), HTMuon matrix part\) lacks \['momentum_buffer'\]"
    )
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:2]
    _load_refused(bad, r"loaded param group 0 has 2 parameters, this optimizer's has 3")
    bad = copy.deepcopy(sd)
    bad["state"][0]["step"] = torch.tensor(2.5)
    _load_refused(bad, r"parameter '0\.weight': invalid step tensor\(2\.5000\) \(a whole number >= 0\)")
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["p"] = 7.0
    _load_refused(bad, r"Invalid p in loaded param group 0: 7\.0")


def test_old_checkpoint_with_int_steps_loads_and_continues_exactly():
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(sd)
    for s in old["state"].values():
        s["step"] = int(s["step"])
    twin, twin_opt = _fresh_twin(model)
    twin_opt.load_state_dict(old)
    opt.step()
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert all(isinstance(s["step"], torch.Tensor) for s in twin_opt.state.values())


def test_load_state_dict_warns_of_parameters_in_another_order():
    """Two same-shape matrices named in another order: a plain state dict loads its state into the
    wrong parameters (torch.optim does so silently): a warning names them, for torch's
    ``param_names`` and for ``names`` from ``param_groups``. Only a warning, as DCP's
    ``set_optimizer_state_dict`` maps by name itself and keeps the saved names. Names differing only
    by wrapper components (DDP's ``module.``, torch.compile's ``_orig_mod.``) are the same."""
    import warnings

    a, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8, 6))
    opt = HTMuon([("a.weight", a), ("b.weight", b)], lr=0.02)
    a.grad, b.grad = torch.randn(8, 6), torch.randn(8, 6)
    opt.step()
    saved = opt.state_dict()
    other = HTMuon([("b.weight", b), ("a.weight", a)], lr=0.02)
    with pytest.warns(UserWarning, match=r"'a.weight' at position 0, where this optimizer has 'b.weight'"):
        other.load_state_dict(saved)
    wrapped = HTMuon([("module.a.weight", a), ("module._orig_mod.b.weight", b)], lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped.load_state_dict(saved)
    assert torch.equal(wrapped.state[a]["momentum_buffer"], opt.state[a]["momentum_buffer"])

    model = nn.ModuleDict({"q": nn.Linear(6, 8), "v": nn.Linear(6, 8)})
    by_groups = HTMuon(param_groups(model), lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    by_groups.step()
    swapped = nn.ModuleDict({"v": model["v"], "q": model["q"]})
    with pytest.warns(UserWarning, match=r"'q\.\w+' at position 0, where this optimizer has 'v\.\w+'"):
        HTMuon(param_groups(swapped), lr=0.02).load_state_dict(by_groups.state_dict())


def test_error_messages_name_a_parameter_only_where_the_names_list_the_groups_parameters():
    """ZeroRedundancyOptimizer keeps a group's keys (its ``param_names``) but gives each rank a part of
    its parameters: a name at the same position would be another parameter's."""
    from htmuon.optim import _default_names

    p, q = torch.zeros(2, 2), torch.zeros(2, 2)
    assert _default_names([{"params": [p, q], "param_names": ["x", "y"]}])(0, 1) == "'y'"
    assert (
        _default_names([{"params": [q], "param_names": ["x", "y"]}])(0, 0) == "param_groups[0]['params'][0]"
    )
