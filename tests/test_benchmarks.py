"""The benchmarks' pure helpers: machine description, allocation peak, matrix sets, direction error.

The benchmarks themselves (timings) are not part of the test run.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compile_step  # noqa: E402
import machine  # noqa: E402
import matrix_step  # noqa: E402
import memory  # noqa: E402
import momentum_accuracy  # noqa: E402
import owner_split  # noqa: E402
import step_cost  # noqa: E402
from helpers import needs_torch_muon  # noqa: E402

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_parse_cpuinfo_reads_the_first_processor():
    model, flags = machine.parse_cpuinfo(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512_bf16", "amx_bf16"} <= flags and "fpu" in flags
    assert machine.parse_cpuinfo("") == ("", frozenset())


def test_cpu_id_names_the_first_processors_family_and_model():
    assert machine.cpu_id(CPUINFO) == "family 6 model 143"
    zen5 = "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    zen5 += "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\n"
    assert machine.cpu_id(zen5) == "family 26 model 2"
    assert machine.cpu_id("model name\t: AMD EPYC\n") == ""  # no family: nothing made up
    assert machine.cpu_id("cpu family\t: 6\n") == ""  # a family without its model neither


@pytest.mark.parametrize(
    "flags, isa",
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "amx_bf16"),
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, "avx512_bf16"),
        ({"avx2", "fma", "avx512f"}, "avx512"),
        ({"avx2", "fma"}, "avx2"),  # AMD EPYC (Zen 2/3) style: bf16 matmul is slow there
        ({"sse2"}, "other"),
        ({"amx_bf16"}, "other"),  # AMX without tile support is not usable
    ],
)
def test_matmul_isa_names_the_best_level(flags, isa):
    assert machine.matmul_isa(flags) == isa


def test_describe_and_header_name_the_machine(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    info = machine.describe("cpu", cpuinfo=str(f))
    assert info["isa"] == "amx_bf16" and info["torch"] == torch.__version__
    line = machine.header(info)
    assert line.startswith("# CPU Intel(R) Xeon(R) Platinum 8480+") and "amx_bf16" in line
    assert "family 6 model 143" in line and info["cpu_id"] == "family 6 model 143"
    missing = machine.describe("cpu", cpuinfo=str(tmp_path / "absent"))
    assert missing["isa"] == "other" and missing["cpu"]


@pytest.mark.parametrize("override, auto", [("0", "eigh, float32"), ("1", "fast, bfloat16")])
def test_describe_names_what_auto_runs_and_the_cpu_bf16_override(tmp_path, monkeypatch, override, auto):
    """With ``HTMUON_CPU_BF16=0`` an AVX-512-BF16 CPU runs the AVX2 path (BENCHMARKS.md §A-13's
    results/memory_s33_zen5_fp32path*.json): the header and the JSON named the ISA only, as if the
    default path had run."""
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    monkeypatch.setenv("HTMUON_CPU_BF16", override)
    info = machine.describe("cpu", cpuinfo=str(f))
    assert info["auto"] == auto and info["override"] == f"HTMUON_CPU_BF16={override}"
    assert f"HTMuon auto: {auto} (HTMUON_CPU_BF16={override})" in machine.header(info)
    monkeypatch.delenv("HTMUON_CPU_BF16")
    assert "override" not in machine.describe("cpu", cpuinfo=str(f))


def test_allocation_peak_is_the_running_maximum_in_time_order():
    events = [(3, -100), (1, 100), (2, 50), (4, 30)]  # out of order on purpose
    assert memory.allocation_peak(events) == (150, 80)
    assert memory.allocation_peak([(1, -10)]) == (0, -10)  # frees of older tensors only
    assert memory.allocation_peak([]) == (0, 0)


def test_profiler_allocations_see_what_is_held_at_once():
    from torch.profiler import ProfilerActivity, profile

    mib = 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b
        c = torch.empty(mib, dtype=torch.uint8)
    peak, final = memory.allocation_peak(memory.profiler_allocations(prof))
    assert 3 * mib <= peak < 3 * mib + 64 * 1024  # a and b together, not a + b + c
    assert mib <= final < mib + 64 * 1024  # c is still held
    del c


class _Allocating:
    """A stand-in optimizer whose step holds a 2 MiB temporary and keeps 1 MiB."""

    def __init__(self):
        self.kept = []

    def step(self):
        tmp = torch.empty(2 * 2**20, dtype=torch.uint8)
        self.kept.append(torch.empty(2**20, dtype=torch.uint8))
        del tmp


def test_memory_measures_every_step_it_is_asked_for():
    """Three steps: the peak is the third step's 2 MiB temporary over the 2 MiB the first two kept
    plus its own 1 MiB (5 MiB), and 3 MiB are retained."""
    mib, slack = 2**20, 64 * 1024
    r = memory.measure(_Allocating(), 3, torch.device("cpu"))
    assert 5 * mib <= r["peak"] < 5 * mib + slack and 3 * mib <= r["retained"] < 3 * mib + slack, r


@needs_torch_muon
def test_memory_rows_are_measured_after_their_warm_up_step(monkeypatch):
    """The state is allocated by a warm-up step before the measured ones: a row retains nothing."""
    shapes = [(16, 24), (24, 16)]
    monkeypatch.setattr(memory, "matrix_set", lambda *a: shapes)
    rows = [r for r in step_cost.all_rows() if r.key in ("muon", "p0", "interval5")]
    args = type("A", (), dict(routing="standard", layers=None, seed=0))
    res = memory.run_model("60m", rows, args, torch.device("cpu"))
    assert res["param_bytes"] == 4 * (2 * 16 * 24)  # float32 parameters
    assert [(r["key"], r["steps"]) for r in res["rows"]] == [("muon", 1), ("p0", 1), ("interval5", 5)]
    for r in res["rows"]:
        assert r["retained"] == 0 and r["peak"] > 0, r


def test_memory_table_applies_the_target_to_muons_peak_plus_a_tenth_of_the_parameters(capsys):
    mib = memory.MIB
    row = dict(retained=0, rss_peak=None, steps=1)
    res = dict(
        model="60m",
        matrices=2,
        param_bytes=100 * mib,
        rows=[
            dict(row, key="muon", label="muon", peak=10 * mib),
            dict(row, key="a", label="a", peak=20 * mib),  # limit 10 + 10 MiB: met
            dict(row, key="b", label="b", peak=21 * mib),
        ],
    )
    memory.print_table(res)
    out = capsys.readouterr().out
    assert "= 20 MiB" in out
    table = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    cells = {cols[0][2:]: cols for cols in table}
    assert cells["a"][1:4] == ["20.0", "0.200", "2.0"] and cells["a"][-1] == "met |"
    assert cells["b"][-1] == "NOT met |"


@needs_torch_muon
def test_chunk_budget_times_each_budget_against_muon_in_alternating_pairs(monkeypatch, tmp_path):
    """The ratio is the HTMuon step's wall time over Muon's, timed in pairs whose order alternates,
    and every optimizer is measured after its warm-up step (its state exists)."""
    import chunk_budget

    monkeypatch.setattr(chunk_budget, "matrix_set", lambda *a: [(16, 24), (24, 16)])
    order = []

    def fake_timed(opt, steps, device):  # (CPU, wall) seconds per step
        muon = isinstance(opt, torch.optim.Muon)
        order.append("muon" if muon else "htmuon")
        return (1.0, 2.0) if muon else (3.0, 3.0)

    def spy_measure(opt, steps, device):
        assert all(opt.state[p] for g in opt.param_groups for p in g["params"]), "measured before warm-up"
        return real_measure(opt, steps, device)

    real_measure = chunk_budget.measure
    monkeypatch.setattr(chunk_budget, "timed", fake_timed)
    monkeypatch.setattr(chunk_budget, "measure", spy_measure)
    out = tmp_path / "c.json"
    argv = ["chunk_budget.py", "--models", "60m", "--budgets", "1", "--rounds", "3", "--steps", "1"]
    monkeypatch.setattr("sys.argv", [*argv, "--threads", "0", "--json", str(out)])
    chunk_budget.main()
    (row,) = json.loads(out.read_text())["results"]
    assert row["ratio_wall"] == pytest.approx([1.5] * 3) and row["ratio_wall_median"] == pytest.approx(1.5)
    assert order == ["muon", "htmuon", "htmuon", "muon", "muon", "htmuon"]
    assert row["peak_bytes"] > 0 and row["muon_peak_bytes"] > 0


@needs_torch_muon
def test_matrix_step_times_every_row_on_its_own_matrix():
    """The per-matrix benchmark's loop (no timing is asserted): every row steps, every round is kept,
    and the rows' optimizers really take steps (their parameters move)."""
    times = matrix_step.measure((8, 12), rounds=3, steps=1, seed=0)
    assert set(times) == set(matrix_step.ROWS) and all(len(v) == 3 and min(v) > 0 for v in times.values())
    p = torch.nn.Parameter(torch.zeros(8, 12))
    p.grad = torch.ones(8, 12)
    for make in matrix_step.ROWS.values():
        before = p.detach().clone()
        make([p]).step()
        assert not torch.equal(p.detach(), before)


def test_momentum_accuracy_reads_the_matrix_groups_momenta_from_a_checkpoint(tmp_path):
    from htmuon import HTMuon
    from htmuon.train import checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Conv2d(2, 3, 3))
    opt = HTMuon(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    checkpoint.save(tmp_path / "ckpt.pt", {"step": 1, "optimizer": opt.state_dict()})
    mats = momentum_accuracy.momenta(checkpoint.load(tmp_path / "ckpt.pt"))
    assert [tuple(m.shape) for m in mats] == [(5, 6), (3, 18)]  # matrices only, conv flattened
    assert torch.equal(mats[0], opt.state[model[0].weight]["momentum_buffer"].double())
    M = mats[0]
    assert momentum_accuracy.below_domain(M) == 0.0
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(momentum_accuracy.exact(M, 0.5), (U * s.sqrt()) @ Vh)


def test_owner_split_reproduces_the_per_window_imbalance_and_its_fix():
    """The simulation of the step's owner choice: per window (before) a window of one 4096x11008
    matrix always went to rank 0; per step (now) the ranks share evenly."""
    shapes = [(1, 4096, 11008)] * 8
    costs = [owner_split.matrix_cost(s) for s in shapes]
    before = owner_split.shares(
        owner_split.per_window(shapes, 4, owner_split.F.DEFAULT_CHUNK_BYTES), costs, 4
    )
    assert before == [1.0, 0.0, 0.0, 0.0]
    _, owners = owner_split.plan_replicated_step([s[1:] for s in shapes], shapes, [4] * 8, 2**22, 4)
    assert owner_split.shares(owners, costs, 4) == [0.25] * 4


def test_matrix_sets_have_the_paper_shapes():
    shapes = step_cost.matrix_set("60m")
    assert len(shapes) == 8 * 7 and shapes[:7] == [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
    assert len(step_cost.matrix_set("135m")) == 12 * 7
    assert sum(a * b for a, b in step_cost.matrix_set("135m")) == 12 * (4 * 768**2 + 3 * 768 * 2048)
    assert step_cost.matrix_set("60m", "paper", layers=1)[-2:] == [(32000, 512)] * 2


@needs_torch_muon
def test_direction_error_reads_the_map_off_one_step():
    g = torch.Generator().manual_seed(0)
    G = step_cost.power_law_matrix((48, 32), g)
    s = torch.linalg.svdvals(G)
    assert math.isclose(s[0].item(), 1.0, rel_tol=1e-9) and math.isclose(s[-1].item(), 1e-3, rel_tol=1e-6)
    rows = {r.key: r for r in step_cost.all_rows()}
    assert step_cost.direction_error(rows["svd"], G, torch.device("cpu")) < 1e-4  # exact backend
    assert step_cost.direction_error(rows["eigh"], G, torch.device("cpu")) < 1e-4
    # Muon's NS5 is a rough polar factor by design (singular values in ~[0.7, 1.2]), not the s^p map
    assert step_cost.direction_error(rows["muon"], G, torch.device("cpu")) > 0.05
    assert rows["interval5"].exact_p is None and rows["interval5"].steps == step_cost.INTERVAL
    # each row's error is against its own map: the polar factor for p = 0, s^0.125 for the others
    assert {k: r.exact_p for k, r in rows.items()} == dict(
        muon=0.0, p0=0.0, default=0.125, fast_fp32=0.125, fast_bf16=0.125, fast5=0.125, eigh=0.125,
        svd=0.125, interval5=None,
    )  # fmt: skip


def test_target_verdicts_apply_the_issue_limits():
    def row(key, ratio, err=None):  # the wall ratios (read on a GPU) are the CPU ones halved
        return dict(
            key=key, label=key, ratio_cpu_median=ratio, ratio_wall_median=ratio / 2, error_power_law=err
        )

    res = dict(
        rows=[
            row("muon", 1.0),
            row("default", 1.2),
            row("fast_fp32", 1.2, 0.03),
            row("fast5", 1.2),
            row("paper", 6.0),
        ]
    )
    *per_row, paper = step_cost.target_verdicts(res)
    assert {t.split(" ")[0]: met for t, _, met in per_row} == {
        "default": True,
        "fast_fp32": False,
        "fast5": False,
    }
    assert "paper" in paper[0] and paper[1] == "5.00x" and paper[2] is True  # 6.0 / 1.2
    wall = step_cost.target_verdicts(res, "wall")  # 0.6x: every time target met, the error one not
    assert [met for _, _, met in wall[:-1]] == [True, False, True] and wall[0][1] == "0.60x"
    res["rows"][-1]["ratio_wall_median"] = 1.2  # the paper's code on the wall clock: 2x the default's
    assert step_cost.target_verdicts(res, "wall")[-1][1:] == ("2.00x", False)


class _FakeClock:
    """Stand-in optimizers that advance a stand-in CPU clock and wall clock by their own costs (x3 from
    call ``slow_from`` on), installed as ``module.time``; ``calls`` lists the steps in order."""

    def __init__(self, monkeypatch, module, cpu: dict, wall: dict | None = None, slow_from=math.inf):
        self.cpu, self.wall, self.slow_from = cpu, wall or cpu, slow_from
        self.now = {"cpu": 0.0, "wall": 0.0}
        self.calls: list[str] = []
        clock = self
        fake_time = type(
            "T",
            (),
            {
                "process_time": staticmethod(lambda: clock.now["cpu"]),
                "perf_counter": staticmethod(lambda: clock.now["wall"]),
            },
        )
        monkeypatch.setattr(module, "time", fake_time)

    def step(self, key: str) -> None:
        self.calls.append(key)
        late = 3.0 if len(self.calls) > self.slow_from else 1.0
        self.now["cpu"] += self.cpu[key] * late
        self.now["wall"] += self.wall[key] * late

    def opt(self, key: str):
        clock = self
        return type("Opt", (), {"step": lambda self: clock.step(key)})()

    def row(self, key: str, steps: int = 1, exact_p=step_cost.P):
        return step_cost.Row(key, key, lambda *a: self.opt(key), steps=steps, exact_p=exact_p)


def _step_cost_args(**kw):
    args = dict(routing="standard", layers=None, seed=0, rounds=4, budget_s=0, errors=False)
    return type("A", (), {**args, "pairing": "adjacent", **kw})


@pytest.mark.parametrize("pairing", ["adjacent", "round"])
def test_step_cost_pairs_every_row_with_muon_steps_timed_next_to_it(monkeypatch, pairing):
    """Stand-in optimizers advance a stand-in clock; the host gets 3x slower from the second row of
    round 1 on, in the middle of the round. Adjacent pairing times each row next to its own Muon steps,
    so its ratios stay the true cost ratio; round pairing compares across the slowdown. The wall clock
    runs at other rates than the CPU clock: each ratio is of one clock's times alone, per step."""
    # round 1 runs p0 (its pair), interval5 (its pair), Muon: slow from interval5 on. Steps before it:
    # 3 warm-up, round 0 (Muon, p0, 5 interval5; adjacent: + 1 + 5 Muon), round 1's p0 (+ 1 Muon)
    slow_from = 3 + 7 + 1 + (6 + 1 if pairing == "adjacent" else 0)
    clock = _FakeClock(
        monkeypatch,
        step_cost,
        cpu={"muon": 1.0, "p0": 1.5, "interval5": 1.2},
        wall={"muon": 2.0, "p0": 2.0, "interval5": 3.0},
        slow_from=slow_from,
    )
    calls = clock.calls
    rows = [clock.row("muon"), clock.row("p0"), clock.row("interval5", steps=5)]
    monkeypatch.setattr(step_cost, "matrix_set", lambda *a: [(2, 2)])
    res = step_cost.run_model("60m", rows, _step_cost_args(pairing=pairing), torch.device("cpu"), math.inf)
    by = {r["key"]: r for r in res["rows"]}
    assert res["rounds"] == 4 and all(len(r["cpu_s"]) == 4 for r in res["rows"])
    assert by["interval5"]["cpu_s"][0] == pytest.approx(1.2)  # per step, not per round's 5 steps
    assert by["interval5"]["wall_s"][0] == pytest.approx(3.0)
    if pairing == "adjacent":
        assert by["p0"]["ratio_cpu"] == pytest.approx([1.5] * 4)
        assert by["interval5"]["ratio_cpu"] == pytest.approx([1.2] * 4)
        assert by["p0"]["ratio_wall"] == pytest.approx([1.0] * 4)  # wall over Muon's wall
        assert by["interval5"]["ratio_wall"] == pytest.approx([1.5] * 4)
        assert by["interval5"]["ratio_p0_cpu_median"] == pytest.approx(0.8)  # 1.2 / 1.5, not 1.5 / 1.2
        assert len(by["p0"]["muon_cpu_s"]) == 4
        timed = calls[3:]  # after the warm-up step of each row
        round0 = timed[: 1 + 2 + 10]  # Muon alone, then (Muon, p0), then (5 Muon, 5 interval5)
        assert round0 == ["muon", "muon", "p0"] + ["muon"] * 5 + ["interval5"] * 5
        assert timed[13:15] == ["p0", "muon"]  # round 1 starts with p0: the row first, then its Muon
    else:
        assert by["p0"]["muon_cpu_s"] is None
        assert by["p0"]["ratio_cpu"] == pytest.approx([1.5, 0.5, 1.5, 1.5])  # round 1: Muon ran slow
        assert by["p0"]["ratio_wall"] == pytest.approx([1.0, 1 / 3, 1.0, 1.0])
        assert by["interval5"]["ratio_cpu"][0] == pytest.approx(1.2)
    # the reported figure is the median over rounds (the mean would be 1.25 / 0.83 in round pairing)
    assert by["p0"]["ratio_cpu_median"] == pytest.approx(1.5)
    assert by["p0"]["ratio_wall_median"] == pytest.approx(1.0)
    assert by["muon"]["ratio_cpu"] == [1.0] * 4


def test_step_cost_stops_starting_rounds_that_would_end_past_the_deadline(monkeypatch):
    """A round (Muon alone, then Muon and p0) costs 3.5 s after a 2.5 s warm-up: with the deadline at
    14 s the third round ends at 13 s and a fourth would end past it; at least one round always runs."""
    clock = _FakeClock(monkeypatch, step_cost, cpu={"muon": 1.0, "p0": 1.5})
    monkeypatch.setattr(step_cost, "matrix_set", lambda *a: [(2, 2)])
    rows = [clock.row("muon"), clock.row("p0")]
    args = _step_cost_args(rounds=10, budget_s=1)
    assert step_cost.run_model("60m", rows, args, torch.device("cpu"), 14.0)["rounds"] == 3
    clock.now = {"cpu": 0.0, "wall": 0.0}
    assert step_cost.run_model("60m", rows, args, torch.device("cpu"), 0.0)["rounds"] == 1
    unbounded = _step_cost_args(rounds=10, budget_s=0)
    assert step_cost.run_model("60m", rows, unbounded, torch.device("cpu"), 0.0)["rounds"] == 10


@needs_torch_muon
def test_step_cost_models_share_the_budget_by_parameter_count(monkeypatch, capsys, tmp_path):
    """Each model's deadline is the start plus its cumulative share of ``--budget-s``: the last one
    ends with the whole budget, not with its own share counted from the start."""
    deadlines = {}

    def fake_run(model, rows, args, device, deadline):
        deadlines[model] = deadline
        return dict(model=model, matrices=0, matrix_params=0, rounds=1, warmup_s=0.0, rows=[])

    monkeypatch.setattr(step_cost, "run_model", fake_run)
    monkeypatch.setattr(step_cost, "time", type("T", (), {"perf_counter": staticmethod(lambda: 100.0)}))
    argv = ["step_cost.py", "--budget-s", "60", "--threads", "0", "--json", str(tmp_path / "s.json")]
    monkeypatch.setattr("sys.argv", argv)
    step_cost.main()
    size = {m: sum(a * b for a, b in step_cost.matrix_set(m)) for m in ("60m", "135m")}
    assert deadlines["60m"] == pytest.approx(100 + 60 * size["60m"] / (size["60m"] + size["135m"]))
    assert deadlines["135m"] == pytest.approx(160.0)
    assert capsys.readouterr().out.startswith("# CPU ")  # the machine header comes first


def test_step_cost_error_column_is_the_worst_shape_and_skips_interval_rows(monkeypatch):
    clock = _FakeClock(monkeypatch, step_cost, cpu={"muon": 1.0, "p0": 1.5, "interval5": 1.2})
    monkeypatch.setattr(step_cost, "matrix_set", lambda *a: [(3, 2), (5, 2), (3, 2)])
    monkeypatch.setattr(step_cost, "direction_error", lambda row, G, device: G.shape[0] / 100)
    rows = [clock.row("muon", exact_p=0.0), clock.row("p0"), clock.row("interval5", 5, exact_p=None)]
    res = step_cost.run_model("60m", rows, _step_cost_args(rounds=1, errors=True), torch.device("cpu"), 1.0)
    errors = {r["key"]: r["error_power_law"] for r in res["rows"]}
    assert errors == {"muon": 0.05, "p0": 0.05, "interval5": None}


@needs_torch_muon
def test_the_reference_is_torch_optim_muon_as_torch_configures_it():
    """Every ratio is to torch.optim.Muon: step_cost's row at the benchmark's lr, momentum and weight
    decay and torch's defaults otherwise (nesterov, 5 bf16 quintic steps, its lr rule); matrix_step's
    p0 rows apply the same update as its Muon row (the same lr rule: bit-identical where ns_dtype
    "auto" is bfloat16, within bfloat16's rounding elsewhere)."""
    p = torch.nn.Parameter(torch.zeros(6, 4))
    torch_defaults = torch.optim.Muon([p]).defaults
    for opt in (step_cost.muon_row().make([p], 0.03, 0.9, 0.2), matrix_step.ROWS["muon"]([p])):
        assert type(opt) is torch.optim.Muon
        group = opt.param_groups[0]
        for key in ("nesterov", "ns_steps", "ns_coefficients", "eps"):
            assert group[key] == torch_defaults[key], key
    group = step_cost.muon_row().make([p], 0.03, 0.9, 0.2).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.03, 0.9, 0.2)
    assert group["adjust_lr_fn"] == torch_defaults["adjust_lr_fn"]
    g = torch.Generator().manual_seed(0)
    W0, G = 0.02 * torch.randn(48, 64, generator=g), torch.randn(48, 64, generator=g)
    moved = {}
    for key in ("muon", "p0", "p0_nocheck"):
        W = torch.nn.Parameter(W0.clone())
        W.grad = G.clone()
        matrix_step.ROWS[key]([W]).step()
        moved[key] = W.detach() - W0
    for key in ("p0", "p0_nocheck"):
        assert (moved[key] - moved["muon"]).norm() < 0.05 * moved["muon"].norm(), key


def test_matrix_step_times_each_step_after_a_warm_up_in_rotating_order(monkeypatch):
    clock = _FakeClock(monkeypatch, matrix_step, cpu={"muon": 0.002, "p0": 0.003, "fast": 0.004})
    rows = {key: (lambda ps, key=key: clock.opt(key)) for key in ("muon", "p0", "fast")}
    monkeypatch.setattr(matrix_step, "ROWS", rows)
    times = matrix_step.measure((4, 4), rounds=2, steps=3, seed=0)
    assert {k: pytest.approx(v) for k, v in times.items()} == {  # ms per step
        "muon": [2.0, 2.0],
        "p0": [3.0, 3.0],
        "fast": [4.0, 4.0],
    }
    assert clock.calls == ["muon", "p0", "fast"] + ["muon"] * 3 + ["p0"] * 3 + ["fast"] * 3 + (
        ["p0"] * 3 + ["fast"] * 3 + ["muon"] * 3  # round 1 starts one row later
    )


@needs_torch_muon
def test_matrix_step_prints_each_rows_ratio_to_muon(monkeypatch, capsys):
    times = {key: [2.0, 2.0, 2.0] for key in matrix_step.ROWS}
    times["p0"] = [3.0, 1.0, 3.0]  # median of the per-round ratios: 1.5 (the mean would be 1.17)
    monkeypatch.setattr(matrix_step, "measure", lambda *a: times)
    threads = str(torch.get_num_threads())  # main sets it: unchanged here
    monkeypatch.setattr("sys.argv", ["matrix_step.py", "--shapes", "4x4", "--threads", threads])
    matrix_step.main()
    out = capsys.readouterr().out
    assert out.startswith("# CPU ")
    cells = dict(zip(matrix_step.ROWS, re.search(r"^\| 4x4 \| (.*) \|$", out, re.M).group(1).split(" | ")))
    assert cells["muon"] == "2.00 ms" and cells["p0"] == "1.50x" and cells["fast"] == "1.00x"


def _check_script(name: str) -> str:
    """The text of ``benchmarks/<name>``, after ``bash -n`` found no syntax error in it."""
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    r = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return script.read_text().replace("\\\n", " ")  # continued lines joined


def _benchmarks_run(text: str, monkeypatch, capsys) -> set[str]:
    """The benchmarks a script runs (``$PY benchmarks/NAME.py ...``), each checked to import and to
    take every option the script passes it (from the benchmark's own ``--help``: argparse would also
    take an abbreviation, which a renamed option can silently become)."""
    import importlib
    import re

    ran = set(re.findall(r"\$PY benchmarks/(\w+)\.py", text))
    for name in ran:
        passed = set()
        for line in re.findall(rf"\$PY benchmarks/{name}\.py([^\n]*)", text):
            passed |= set(re.findall(r"(--[a-z][a-z-]*)", line))
        monkeypatch.setattr("sys.argv", [f"{name}.py", "--help"])
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(name).main()
        assert exited.value.code == 0
        known_flags = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
        assert passed and passed <= known_flags, (name, passed - known_flags)
    return ran


@needs_torch_muon
def test_gpu_check_script_parses_and_its_benchmarks_take_its_options(monkeypatch, capsys):
    """benchmarks/gpu_check.sh runs only where a GPU is lent (minutes, rarely): a syntax error, a
    benchmark that no longer imports or an option it no longer takes would be found only then."""
    text = _check_script("gpu_check.sh")
    assert _benchmarks_run(text, monkeypatch, capsys) == {
        "step_cost",
        "memory",
        "chunk_budget",
        "step_profile",
    }


@needs_torch_muon
def test_cpu_check_script_parses_and_its_benchmarks_take_its_options(monkeypatch, capsys):
    """benchmarks/cpu_check.sh (issue 11's CPU measurements for a new CPU kind) runs for ~40 minutes
    and only when a session lands on such a CPU: its syntax, its benchmarks and their options, and
    the step-cost rows it names are checked here. (A QUICK=1 smoke run took ~3 minutes on a Zen 5.)"""
    import importlib
    import re

    text = _check_script("cpu_check.sh")
    ran = _benchmarks_run(text, monkeypatch, capsys)
    assert ran == {"shape_cost", "step_cost", "memory", "chunk_budget", "compile_step"}
    rows = set(re.findall(r"rows(?:60|135)(?:\+)?=\(([^)]*)\)", text))
    known = {row.key for row in importlib.import_module("step_cost").all_rows()} | {
        "paper",
        "paper_interval5",
    }
    assert rows and all(set(r.split()) <= known for r in rows), rows


def test_step_profile_counts_the_accelerator_path_on_cpu(monkeypatch, capsys):
    """``step_profile.py --accelerator-paths``: BENCHMARKS.md §A-8's operator counts of the GPU path,
    on one block of the 60M set; the stacked path dispatches fewer operators than the per-matrix one."""
    import importlib
    import re

    step_profile = importlib.import_module("step_profile")
    counts = {}
    for flags in ([], ["--accelerator-paths", "--chunk-bytes", "512MiB"]):
        argv = [
            "step_profile.py",
            "--model",
            "60m",
            "--layers",
            "1",
            "--rows",
            "p0",
            "--steps",
            "1",
            "--threads",
            "0",
        ]
        monkeypatch.setattr("sys.argv", [*argv, "--python", *flags])
        step_profile.main()
        counts[bool(flags)] = int(re.search(r"(\d+) operators", capsys.readouterr().out).group(1))
    assert 0 < counts[True] < counts[False], counts


def test_step_profile_runs_on_one_thread_unless_told(monkeypatch):
    """step_profile.py left torch's thread count as it found it: BENCHMARKS.md §A-15's command gave
    1 thread with OMP_NUM_THREADS=1 set and 2 without (§A-12's session-36 profile); its ms per step,
    compared with step_cost.py's one-thread figures, depended on the shell."""
    import importlib

    step_profile = importlib.import_module("step_profile")
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(step_profile, "run", lambda args: None)
    for flags, want in (([], [1]), (["--threads", "0"], []), (["--threads", "3"], [3])):
        threads.clear()
        monkeypatch.setattr("sys.argv", ["step_profile.py", *flags])
        step_profile.main()
        assert threads == want, flags


def test_step_cost_rows_take_a_chunk_budget():
    """``--chunk-bytes`` reproduces BENCHMARKS.md §A-7's 32 MiB rows at a commit whose default is 'auto'."""
    assert step_cost.chunk_bytes_arg("auto") == "auto"
    assert step_cost.chunk_bytes_arg("32MiB") == step_cost.chunk_bytes_arg("33554432") == 32 * 2**20
    p = torch.nn.Parameter(torch.zeros(4, 4))
    for chunk_bytes in ("auto", 4096):
        rows = [r for r in step_cost.all_rows(chunk_bytes=chunk_bytes) if r.key != "muon"]
        assert len(rows) == 8
        for row in rows:
            assert row.make([p], 0.02, 0.95, 0.0).param_groups[0]["chunk_bytes"] == chunk_bytes, row.key


def test_step_cost_rows_are_the_optimizers_their_labels_name():
    """(method, ns_dtype, p, interval) of every HTMuon row, and the benchmark's lr, momentum and
    weight decay passed on."""
    want = dict(
        p0=("ns", "auto", 0.0, 1),
        default=("auto", "auto", 0.125, 1),
        fast_fp32=("fast", torch.float32, 0.125, 1),
        fast_bf16=("fast", torch.bfloat16, 0.125, 1),
        fast5=("fast5", "auto", 0.125, 1),
        eigh=("eigh", "auto", 0.125, 1),
        svd=("svd", "auto", 0.125, 1),
        interval5=("auto", "auto", 0.125, 5),
    )
    p = torch.nn.Parameter(torch.zeros(4, 4))
    got = {}
    for row in step_cost.all_rows():
        if row.key != "muon":
            g = row.make([p], 0.03, 0.9, 0.2).param_groups[0]
            got[row.key] = (g["method"], g["ns_dtype"], g["p"], g["interval"])
            assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.03, 0.9, 0.2), row.key
    assert got == want


@needs_torch_muon
def test_compile_step_times_both_sides_alike(monkeypatch):
    """compile_step.py gave torch.optim.Muon its default weight decay (0.1: a decay pass over every
    matrix, which Muon runs even at 0) and HTMuon none (its default 0: no pass), and always timed
    Muon first, then eager, then compiled. Now the same lr and decay on both sides and a rotating order."""
    ref, eager, opt, *_ = compile_step.optimizers({"p": 0.125}, 8, 12, 1)
    for htmuon in (eager, opt):
        for group in htmuon.param_groups:
            assert (group["lr"], group["weight_decay"]) == (ref.defaults["lr"], ref.defaults["weight_decay"])
    assert ref.defaults["weight_decay"] > 0
    clock = _FakeClock(monkeypatch, machine, cpu={"muon": 1.0, "eager": 2.0, "compiled": 3.0})
    fns = {key: (lambda key=key: clock.step(key)) for key in ("muon", "eager", "compiled")}
    times = compile_step.time_rounds(fns, 3)
    assert times == {"muon": [1.0] * 3, "eager": [2.0] * 3, "compiled": [3.0] * 3}
    assert clock.calls == [
        "muon",
        "eager",
        "compiled",
        "eager",
        "compiled",
        "muon",
        "compiled",
        "muon",
        "eager",
    ]


def test_split_matmul_counts_each_product_once_against_the_rest():
    events = [
        ("aten::mm", 3000.0),
        ("aten::addmm_", 1000.0),
        ("aten::baddbmm", 2000.0),
        ("aten::matmul", 10.0),  # its own time only: the product is the mm below it
        ("aten::add_", 400.0),
        ("## Call CompiledFxGraph abc", 590.0),  # inductor's generated kernels: elementwise
    ]
    mm, rest = compile_step.split_matmul(events, steps=2)
    assert mm == pytest.approx(3.005) and rest == pytest.approx(0.495)
    assert (mm + rest) * 2 == pytest.approx(sum(t for _, t in events) / 1e3)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        compile_step.split_matmul(events, steps=0)


def test_shape_cost_batched_prints_one_row_per_shape_and_dtype(monkeypatch, capsys):
    """``shape_cost.py --batched`` (BENCHMARKS.md §A-14): a row per batch shape and dtype, its ratio
    the quotient of its two times (printed to 0.01 ms: checked where both are >= 0.05 ms, which the
    float32 2 x 256 x 512 row is on any CPU: 134 MFLOP)."""
    import importlib
    import re

    shape_cost = importlib.import_module("shape_cost")
    argv = [
        "shape_cost.py",
        "--batched",
        "--shapes",
        "2x256x512",
        "3x32x32",
        "--repeats",
        "1",
        "--threads",
        "0",
    ]
    monkeypatch.setattr("sys.argv", argv)
    shape_cost.main()
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+x\d+x\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", out, re.M)
    assert [(shape, dtype) for shape, dtype, *_ in rows] == [
        ("2x256x512", "float32"),
        ("2x256x512", "bfloat16"),
        ("3x32x32", "float32"),
        ("3x32x32", "bfloat16"),
    ], out
    timed = [(float(loop), float(bmm), float(ratio)) for *_, loop, bmm, ratio in rows]
    assert timed[0][0] >= 0.05 and timed[0][1] >= 0.05, out
    for loop, bmm, ratio in timed:
        if loop >= 0.05 and bmm >= 0.05:  # each printed value within 0.005 of the unrounded one
            assert ratio == pytest.approx(bmm / loop, abs=0.006 + 0.006 * (1 + bmm / loop) / loop), out
    # the row itself, on times whose ratio is far from 1 (measured ones are near 1 on some CPUs)
    row = shape_cost.batched_row("4x8x8", torch.bfloat16, 0.004, 0.001)
    assert row == "| 4x8x8 | bfloat16 | 4.00 | 1.00 | 0.25x |"


def test_shape_cost_matmul_takes_the_median_of_the_repeats_its_header_names(monkeypatch, capsys):
    """``shape_cost.py --matmul --repeats 5`` printed "median of 5" over 2 repeats (``repeats // 2``):
    results/matmul_s*.txt and BENCHMARKS.md §4 named a statistic the run did not take."""
    import importlib

    shape_cost = importlib.import_module("shape_cost")
    asked = []

    def fake_timed(fns, repeats):
        asked.append(repeats)
        return {k: 1e-3 for k in fns}

    monkeypatch.setattr(shape_cost, "timed", fake_timed)
    monkeypatch.setattr("sys.argv", ["shape_cost.py", "--matmul", "--repeats", "5", "--threads", "0"])
    shape_cost.main()
    assert capsys.readouterr().out.splitlines()[0].endswith(", median of 5")
    assert asked == [5, 5, 5]


def test_shape_cost_names_its_float32_reference(monkeypatch, capsys):
    """shape_cost.py's per-shape table divides by HTMuon's own float32 NS5 (``polar``), and its columns
    said "x Muon": on a bfloat16 CPU torch.optim.Muon's NS5 is 2-8x cheaper than that reference."""
    import importlib

    shape_cost = importlib.import_module("shape_cost")
    monkeypatch.setattr(shape_cost, "timed", lambda fns, repeats: {k: 1e-3 for k in fns})
    monkeypatch.setattr(
        "sys.argv", ["shape_cost.py", "--shapes", "1x8x12", "--repeats", "1", "--threads", "0"]
    )
    shape_cost.main()
    table = capsys.readouterr().out.splitlines()[1]
    assert "fast x NS5 fp32" in table and "NS5 fp32 ms" in table and "Muon" not in table, table


def test_every_benchmark_that_reads_a_clock_names_the_machine():
    """BENCHMARKS.md §0: every benchmark prints the CPU model and its matmul ISA (machine.header);
    esd_speed, fast_speed, dist_step, data_stream and esd_memory printed timings without them."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    timing = []
    for script in sorted(folder.glob("*.py")):
        text = script.read_text()
        if script.name == "machine.py":  # the shared helpers (time_rounds), not a benchmark
            continue
        if re.search(r"time\.(perf_counter|process_time)\(|time_rounds\(", text):
            timing.append(script.name)
            assert re.search(r"print\(header\((info|describe\()", text), script.name
    assert {"step_cost.py", "esd_speed.py", "fast_speed.py", "dist_step.py"} <= set(timing)


@needs_torch_muon
def test_fast_speed_prints_the_machine_header_first(monkeypatch, capsys):
    import importlib

    fast_speed = importlib.import_module("fast_speed")
    monkeypatch.setattr("sys.argv", ["fast_speed.py", "--shapes", "8x12", "--repeats", "1", "--threads", "0"])
    fast_speed.main()
    first, *_ = capsys.readouterr().out.splitlines()
    assert first.startswith("# CPU ") and "matmul ISA" in first and torch.__version__ in first


def test_fast_speed_rotates_the_order_of_its_calls(monkeypatch):
    """fast_speed.py timed torch.optim.Muon's NS5 first in every round and each variant in the same
    place after it (the matrix it had just read still in cache)."""
    import importlib

    fast_speed = importlib.import_module("fast_speed")
    clock = _FakeClock(monkeypatch, machine, cpu={"muon": 1.0, "a": 2.0, "b": 4.0})
    fns = {key: (lambda key=key: clock.step(key)) for key in ("muon", "a", "b")}
    assert fast_speed.timed(fns, 3) == {"muon": 1.0, "a": 2.0, "b": 4.0}
    assert clock.calls[3:] == ["muon", "a", "b", "a", "b", "muon", "b", "muon", "a"]  # after 3 warm-ups


def test_work_count_refuses_unknown_rows(monkeypatch, capsys):
    """``--rows fast5_typo`` counted torch.optim.Muon's row alone, silently."""
    import importlib

    work_count = importlib.import_module("work_count")
    argv = ["work_count.py", "--models", "60m", "--rows", "fast5_typo", "--threads", "0", "--json", ""]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exited:
        work_count.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and "unknown --rows ['fast5_typo']; valid: [" in err


def test_fast_accuracy_columns_use_their_own_references(monkeypatch, capsys):
    """``fast_accuracy.py``: "bf16" is the algorithm's error against the exact map of the same
    bfloat16 input, "bf16 total" against the unrounded matrix's, "bf16 rounding alone" the distance
    between those two maps; the p = 0 columns are against the exact polar factor."""
    import importlib

    fast_accuracy = importlib.import_module("fast_accuracy")
    from htmuon import polar, spectral_power

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # run() sets 1: leave this process's
    args = type("A", (), dict(shapes=["32x48"], p=0.125, methods=["fast"], seed=0))
    fast_accuracy.run(args)
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 32x48")]
    assert [r[1] for r in rows] == ["log-uniform", "power-law", "gaussian", "flat+tail"]
    for r in rows:
        fast_p0, muon_p0 = float(r[-2].rstrip("%")), float(r[-1].rstrip(" |%"))
        assert fast_p0 < 5.0 and muon_p0 > 15.0, r  # NS5 is a rough polar factor; fast is not
    G = fast_accuracy.cases(32, 48, 0)["log-uniform"]
    G16 = G.bfloat16()
    ref, ref16 = fast_accuracy.exact(G, 0.125), fast_accuracy.exact(G16, 0.125)
    out16 = spectral_power(G16, 0.125, method="fast", ns_dtype=torch.bfloat16)
    muon = polar(G.float(), dtype=torch.float32)
    e = fast_accuracy.err
    want = [e(ref16, ref), e(out16, ref16), e(out16, ref), e(muon, fast_accuracy.exact(G, 0.0)) + " |"]
    assert [rows[0][k] for k in (2, 4, 5, 7)] == want, rows[0]
    assert 0.5 < float(rows[0][2].rstrip("%")) < 20  # rounding alone is not zero


def test_fast_accuracy_cases_take_tall_shapes():
    """``fast_accuracy.py --shapes 1376x512`` (the LLaMA gate / up matrices) stopped with a shape error:
    its spectra had m values, more than a tall matrix has. The wide shapes' matrices are unchanged."""
    import importlib

    fast_accuracy = importlib.import_module("fast_accuracy")
    for m, n in ((24, 16), (16, 24)):
        for name, G in fast_accuracy.cases(m, n, 0).items():
            s = torch.linalg.svdvals(G)
            assert G.shape == (m, n) and s.numel() == 16, name
            if name != "gaussian":
                assert s.max().item() == pytest.approx(1.0) and s.min().item() == pytest.approx(1e-3), name
