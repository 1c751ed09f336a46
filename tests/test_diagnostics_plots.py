"""htmuon.diagnostics.plots: PNGs are written, paths returned, no pyplot state left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from htmuon.diagnostics import ESDReport, analyze  # noqa: E402
from htmuon.diagnostics.plots import plot_esd, plot_layer_alpha, plot_update_spectra  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _no_pyplot_figures() -> bool:
    import matplotlib.pyplot as plt

    return plt.get_fignums() == []


@pytest.fixture(scope="module")
def reports():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64), nn.Conv2d(8, 16, 3))
    b = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    return {"Muon": analyze(a), "HTMuon": analyze(b, fit="ks")}


def test_plot_layer_alpha(tmp_path, reports):
    out = plot_layer_alpha(reports, tmp_path / "sub" / "alpha.png")
    assert out == str(tmp_path / "sub" / "alpha.png") and _is_png(out)
    assert _no_pyplot_figures()


def test_plot_layer_alpha_series_follow_the_shared_layer_order(tmp_path, reports, monkeypatch):
    """A report listing its layers in another order (safetensors sorts names) is drawn left to right."""
    from htmuon.diagnostics import plots

    first = reports["Muon"]
    shuffled = ESDReport(rows=list(reversed(first.rows)), fit=first.fit)
    seen = {}
    real_save = plots._save

    def save(fig, path):
        seen["x"] = [list(line.get_xdata()) for line in fig.axes[0].lines if len(line.get_xdata()) > 2]
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    plot_layer_alpha({"a": first, "b": shuffled}, tmp_path / "order.png")
    assert seen["x"] == [[0, 1, 2], [0, 1, 2]]


def test_plot_esd_from_matrix_and_eigenvalues(tmp_path):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 200, generator=g)
    for fit in ("ks", "median", "fix-finger"):
        assert _is_png(plot_esd(W, tmp_path / f"esd_{fit}.png", fit=fit))
    ev = torch.linalg.svdvals(W.double()) ** 2
    assert _is_png(plot_esd(ev.numpy(), tmp_path / "esd_np.png"))
    assert _is_png(plot_esd(nn.Conv2d(16, 32, 3).weight, tmp_path / "esd_conv.png"))
    assert _no_pyplot_figures()


def test_plot_update_spectra(tmp_path, monkeypatch):
    """One line per label: the singular values in descending order against rank 1..k (a matrix's own
    computed), divided by the largest with normalize=True."""
    from htmuon.diagnostics import plots

    g = torch.Generator().manual_seed(0)
    G = torch.randn(128, 64, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(G)
    seen = []
    real_save = plots._save

    def save(fig, path):
        seen.append([(list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines])
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    spectra = {"Muon": torch.ones(64), "HTMuon p=0.125": s**0.125, "momentum (matrix)": G}
    assert _is_png(plot_update_spectra(spectra, tmp_path / "upd.png"))
    shuffled = s[torch.randperm(64, generator=g)]
    assert _is_png(
        plot_update_spectra({"a": (3.0 * shuffled).tolist()}, tmp_path / "upd_norm.png", normalize=True)
    )
    (muon, ht, momentum), (norm,) = seen
    assert all(x == list(range(1, 65)) for x, _ in (muon, ht, momentum, norm))
    assert muon[1] == [1.0] * 64
    torch.testing.assert_close(torch.tensor(ht[1], dtype=torch.float64), s**0.125)
    torch.testing.assert_close(torch.tensor(momentum[1], dtype=torch.float64), s)
    torch.testing.assert_close(torch.tensor(norm[1], dtype=torch.float64), s / s[0])
    assert _no_pyplot_figures()


def test_plot_bad_input(tmp_path, reports):
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_layer_alpha({}, tmp_path / "x.png")
    with pytest.raises(TypeError, match="not an ESDReport"):
        plot_layer_alpha({"a": [1, 2]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least 2 eigenvalues"):
        plot_esd(torch.tensor([1.0, 0.0]), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        plot_esd([1.0, float("nan"), 3.0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_update_spectra({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="expected singular values or a matrix"):
        plot_update_spectra({"a": torch.ones(2, 2, 2)}, tmp_path / "x.png")


def test_plot_esd_draws_the_layers_own_fit(tmp_path, monkeypatch):
    """The fitted line is analyze's fit of the weight (its xmin, alpha and tail share: the density
    ``(n_tail / n) (alpha - 1) / xmin (x / xmin)^-alpha``); a weight whose ESD is degenerate in its own
    precision (an orthogonal bf16 layer) gets no line, as analyze gets no alpha."""
    from htmuon.diagnostics import plots

    seen = []
    real_save = plots._save

    def save(fig, path):
        ax = fig.axes[0]
        seen.append(([(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines], ax.get_title()))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 200, generator=g, dtype=torch.float64) @ torch.diag(
        torch.arange(1, 201, dtype=torch.float64) ** -0.5
    )
    row = analyze(W).rows[0]
    plot_esd(W, tmp_path / "esd.png")
    (x, y), _ = seen[0][0][0], seen[0][1]
    assert x[0] == pytest.approx(row["xmin"], rel=1e-9)
    share = row["num_pl_spikes"] / row["num_evals"]
    assert y[0] == pytest.approx(share * (row["alpha"] - 1) / row["xmin"], rel=1e-9)
    assert f"α = {row['alpha']:.3f}" in seen[0][1]
    Q = nn.init.orthogonal_(torch.empty(64, 64)).to(torch.bfloat16)
    assert analyze(Q).rows[0]["status"].startswith("failed: degenerate ESD")
    plot_esd(Q, tmp_path / "q.png")
    lines, title = seen[1]
    assert lines == [] and "degenerate ESD" in title


def test_a_numpy_matrix_is_plotted_as_a_matrix_not_as_eigenvalues(tmp_path, monkeypatch):
    """A weight or update given as a numpy array gets its own ESD / singular values, as the same tensor
    does (its entries were taken as the eigenvalues or singular values, silently)."""
    from htmuon.diagnostics import plots

    seen = []
    real_save = plots._save

    def save(fig, path):
        seen.append([list(ln.get_ydata()) for ln in fig.axes[0].lines] + [fig.axes[0].get_title()])
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 100, generator=g, dtype=torch.float64)
    plot_esd(W, tmp_path / "t.png")
    plot_esd(W.numpy(), tmp_path / "n.png")
    assert seen[0] == seen[1]  # the same fitted line and title ("tail k of 100"), not of 30000 entries
    plot_update_spectra({"U": W}, tmp_path / "ut.png")
    plot_update_spectra({"U": W.numpy()}, tmp_path / "un.png")
    assert seen[2] == seen[3] and len(seen[3][0]) == 100


def test_the_path_suffix_picks_the_format_and_esd_checks_it_before_the_analysis(
    tmp_path, reports, monkeypatch
):
    """``alpha.pdf`` held PNG bytes (every plot was saved as PNG whatever its name); now the suffix
    picks the format, no suffix is a PNG, and a suffix matplotlib cannot write is refused: by
    ``htmuon esd --plot`` before any checkpoint is read."""
    from htmuon.cli import main
    from htmuon.diagnostics import cli as esd_cli

    pdf = plot_layer_alpha(reports, tmp_path / "alpha.pdf")
    with open(pdf, "rb") as f:
        assert f.read(5) == b"%PDF-"
    svg = plot_update_spectra({"a": torch.randn(8, 6)}, tmp_path / "sv.SVG")
    with open(svg) as f:
        assert "<svg" in f.read(4000)
    assert _is_png(plot_esd(torch.randn(40, 30), tmp_path / "esd"))
    with pytest.raises(ValueError, match=r"cannot write a plot as \.txt .*\.pdf"):
        plot_layer_alpha(reports, tmp_path / "alpha.txt")
    assert not (tmp_path / "alpha.txt").exists()

    torch.save(nn.Linear(30, 20).state_dict(), tmp_path / "w.pt")
    read = []
    monkeypatch.setattr(esd_cli, "_load_target", lambda *a: read.append(a) or nn.Linear(30, 20))
    assert main(["esd", str(tmp_path / "w.pt"), "--plot", str(tmp_path / "alpha.docx")]) == 2
    assert read == [] and not (tmp_path / "alpha.docx").exists()
    assert main(["esd", str(tmp_path / "w.pt"), "--plot", str(tmp_path / "cli.pdf")]) == 0
    with open(tmp_path / "cli.pdf", "rb") as f:
        assert f.read(5) == b"%PDF-"
