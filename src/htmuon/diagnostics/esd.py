"""Layer-wise empirical spectral densities (ESDs) and their heavy-tail metrics.

:func:`analyze` takes a model, a state_dict, a checkpoint file or folder (:mod:`.readers`; read
one batch of layers at a time) or a single tensor, picks the weight matrices WeightWatcher would
analyse, computes their eigenvalues batched by shape on the weights' device, fits the power-law
exponent ``alpha`` (:mod:`.powerlaw`) and returns an :class:`ESDReport` with WeightWatcher's
columns. :func:`alpha_table` puts several reports side by side.

Conventions (WeightWatcher 0.7.7, measured and read from its source; no normalisation):

* Eigenvalues ``lambda = svdvals(W)^2`` of the ``N x M`` matrix (``N >= M``); ``M`` of them.
* Layers: ``Linear`` and ``Embedding`` (the weight matrix), ``Conv2d`` (the ``kh*kw`` slices
  ``W[:, :, i, j]``, each scaled by ``sqrt(0.5)`` -- so eigenvalues times 0.5 -- eigenvalues
  pooled, ``rf = kh*kw``), ``Conv1d`` (see ``conv1d`` below). A module's kind is found by
  ``isinstance`` or, like WeightWatcher, by its class name containing ``linear``, ``conv1d``,
  ``conv2d`` or ``embedding`` (so e.g. Hugging Face's GPT-2 ``Conv1D``, a 2-D weight, counts).
* A layer is skipped when ``M * rf < min_evals`` (8), ``M * rf > max_evals`` (15000) or
  ``N > max_N`` (50000), or when its weight is not real floating point (a quantized or complex
  module's); skipped layers are listed in :attr:`ESDReport.skipped` with the reason.
* Without a module (a state_dict or a tensor) the kind is inferred from the shape: 2-D -> linear,
  3-D -> conv1d, 4-D -> conv2d. In a state_dict only floating tensors whose key ends in
  ``weight`` count (biases, norms and buffers are not layers).

Differences from WeightWatcher, all deliberate:

* float64 (or bf16/fp16) weights are not rounded to float32 first.
* ``conv1d="slices"`` (default) pools the ``k`` tap matrices ``W[:, :, t]`` (``rf = k``).
  WeightWatcher 0.7.7 instead passes the 3-D weight to SciPy's SVD, which (SciPy >= 1.15) batches
  it over output channels as ``in x k`` matrices and keeps the largest ``min(out, in, k)``
  singular values; ``conv1d="ww"`` reproduces that for comparisons.
* Conv2d: ``N = max(out, in)``, ``M = min(out, in)`` always (WeightWatcher swaps them once per
  slice when ``out < in``, so for an even number of slices it reports them the other way round).
* ``method="gram"`` (the default for float64) takes the eigenvalues of the small Gram matrix
  ``W^T W`` rather than singular values: 2-6x faster on CPU, identical to ~1e-13 relative for
  eigenvalues well above its rounding floor ``lambda_max * N * eps``, but blind below it (~1e-7 x
  the largest singular value), so its ``matrix_rank`` counts ``lambda > lambda_max * N * eps``
  instead of ``s > s_max * N * eps``. Use ``method="svd"`` for WeightWatcher's exact rank
  definition, and for a rank-deficient layer with ``lambda_max`` beyond ~1e10 (``lambda_max * eps``
  near ``thresh = 1e-5``): the Gram route returns its zero eigenvalues as rounding noise of a few
  ``lambda_max * eps``, above ``thresh``, and the fit uses them. Computed in float32 (``method="gram"``
  with ``dtype=torch.float32``, or on a GPU) that happens from ``lambda_max`` ~1e2 on.
* A degenerate ESD -- eigenvalues equal to within rounding, as an orthogonal or identity layer's
  (``nn.init.orthogonal_``) -- is ``status = "failed: degenerate ESD (...)"`` with ``alpha = nan``
  under every fit, and a tail of such eigenvalues is never a candidate (:mod:`.powerlaw`,
  :func:`~.powerlaw.degenerate_rtol`). WeightWatcher reports the Hill estimate of the rounding
  noise (``~3e6`` for a float32 ``orthogonal_`` 128x128 layer, ``inf`` for an identity), and its
  KS search can pick such a tail at the top of an otherwise spread ESD.
* ``nn.Bilinear`` (a 3-D ``out x in1 x in2`` weight) is skipped (``"linear weight has 3 dims"``):
  there is no one matrix to analyse. WeightWatcher 0.7.7 (its class name contains ``linear``)
  passes the 3-D weight to SciPy's SVD, as for a Conv1d, and reports the top ``min(shape)``
  singular values of the ``out`` batched ``in1 x in2`` matrices.
* A tied matrix (an LM head sharing the embedding's tensor) is one layer, under its first name (as a
  checkpoint that stores it once gives it); WeightWatcher analyses it under both names, counting
  it twice in any mean.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..routing import kind_from_name
from .powerlaw import EVALS_THRESH, FITS, _check_fit, check_thresh, fit_powerlaw
from .readers import Checkpoint, TensorMeta, _storage_view, _strip_prefixes, open_checkpoint

__all__ = [
    "COLUMNS",
    "DEFAULT_MAX_EVALS",
    "DEFAULT_MAX_N",
    "DEFAULT_MIN_EVALS",
    "KINDS",
    "METHODS",
    "ESDReport",
    "alpha_table",
    "analyze",
    "layer_eigenvalues",
]

#: Layer kinds analysed.
KINDS = ("linear", "embedding", "conv1d", "conv2d")
#: Eigenvalue backends: ``"svd"`` (svdvals squared), ``"gram"`` (eigvalsh of the small Gram
#: matrix), ``"auto"`` (gram in float64, svd otherwise).
METHODS = ("auto", "svd", "gram")
CONV1D_MODES = ("slices", "ww")
#: WeightWatcher 0.7.7 layer-selection defaults (``constants.DEFAULT_MIN_EVALS`` etc.).
DEFAULT_MIN_EVALS = 8
DEFAULT_MAX_EVALS = 15000
DEFAULT_MAX_N = 50000
#: Conv2d slices are scaled by sqrt(CONV2D_NORM) (WeightWatcher's default ``conv2d_norm=True``).
CONV2D_NORM = 0.5
#: WeightWatcher's alpha warnings: below -> "over-trained", above -> "under-trained".
OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0
#: Added to each probability and to the rank in the matrix entropy (WeightWatcher's EPSILON).
ENTROPY_EPS = 1e-10
#: Upper bound on the elements stacked into one eigenvalue batch (memory, not speed).
_BATCH_ELEMS = 1 << 25
#: The same bound when weights are read from a checkpoint file batch by batch (32 MiB in float64):
#: peak memory then follows this, not the checkpoint's size.
_STREAM_BATCH_ELEMS = 1 << 22

#: Columns of :attr:`ESDReport.rows`, in order.
COLUMNS = (
    "name",
    "kind",
    "shape",
    "N",
    "M",
    "rf",
    "num_evals",
    "alpha",
    "xmin",
    "xmax",
    "D",
    "sigma",
    "num_pl_spikes",
    "alpha_weighted",
    "log_alpha_norm",
    "log_norm",
    "log_spectral_norm",
    "spectral_norm",
    "stable_rank",
    "entropy",
    "matrix_rank",
    "fit",
    "status",
    "warning",
)


# ----------------------------------------------------------------------------- report


@dataclass
class ESDReport:
    """Per-layer ESD metrics of one model, as returned by :func:`analyze`.

    Attributes:
        rows: one dict per analysed layer with the keys :data:`COLUMNS` (``shape`` is the weight's
            shape as a tuple; ``alpha`` is NaN where the fit failed, see ``status``).
        fit: the xmin rule used for every layer (one of :data:`~.powerlaw.FITS`).
        skipped: ``(name, reason)`` for each candidate layer left out.
        meta: how the eigenvalues were computed (device, dtype, method, thresholds).
    """

    rows: list[dict[str, Any]]
    fit: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def alphas(self) -> dict[str, float]:
        """``{layer name: alpha}``."""
        return {r["name"]: r["alpha"] for r in self.rows}

    @property
    def mean_alpha(self) -> float:
        """Mean of the finite alphas (NaN if there are none)."""
        vals = [r["alpha"] for r in self.rows if math.isfinite(r["alpha"])]
        return sum(vals) / len(vals) if vals else math.nan

    def column(self, key: str) -> list[Any]:
        """One column of the table as a list."""
        if key not in COLUMNS:
            raise KeyError(f"unknown column {key!r}; columns: {', '.join(COLUMNS)}")
        return [r[key] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"ESDReport(layers={len(self.rows)}, fit={self.fit!r}, mean_alpha={self.mean_alpha:.4f})"

    def to_csv(self, path: str | os.PathLike) -> str:
        """Write the table (header :data:`COLUMNS`; shape as ``AxB``) to ``path``; return the path."""
        path = os.fspath(path)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS))
            w.writeheader()
            for r in self.rows:
                w.writerow({**r, "shape": "x".join(map(str, r["shape"]))})
        return path

    def to_markdown(self, columns: Iterable[str] | None = None, digits: int = 4) -> str:
        """The table as GitHub markdown, with a header line naming the fit and the mean alpha."""
        cols = list(columns) if columns is not None else [
            "name", "kind", "shape", "alpha", "xmin", "D", "num_pl_spikes", "alpha_weighted",
            "log_norm", "stable_rank", "entropy", "matrix_rank",
        ]  # fmt: skip
        for c in cols:
            if c not in COLUMNS:
                raise KeyError(f"unknown column {c!r}; columns: {', '.join(COLUMNS)}")

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.{digits}g}"
            if isinstance(v, tuple):
                return "x".join(map(str, v))
            return str(v)

        lines = [
            f"ESD power-law fit: `{self.fit}`; {len(self.rows)} layers; mean alpha = {self.mean_alpha:.4f}",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" for _ in cols) + "|",
        ]
        lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in self.rows]
        if self.skipped:
            lines += [
                "",
                f"skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped),
            ]
        return "\n".join(lines)


def alpha_table(reports: Mapping[str, ESDReport], digits: int = 4) -> str:
    """Side-by-side markdown: one row per layer, one alpha column per report, then the mean alpha.

    Layers are in the order of the first report (layers only in later reports follow); a layer a
    report lacks is blank.

    Args:
        reports: ``{label: ESDReport}``, e.g. one per run.
        digits: significant digits.

    Returns:
        The table, with a header line naming the fit(s).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
        >>> print(alpha_table({"a": analyze(m), "b": analyze(m)}).splitlines()[2])
        | layer | a | b |
    """
    if not isinstance(reports, Mapping) or not reports:
        raise ValueError("reports must be a non-empty dict {label: ESDReport}")
    for label, rep in reports.items():
        if not isinstance(rep, ESDReport):
            raise TypeError(f"reports[{label!r}] is a {type(rep).__name__}, not an ESDReport")
    alphas = {label: rep.alphas for label, rep in reports.items()}
    names = list(dict.fromkeys(n for a in alphas.values() for n in a))
    labels = [str(lab).replace("|", "\\|") for lab in reports]
    fits = ", ".join(f"`{f}`" for f in dict.fromkeys(rep.fit for rep in reports.values()))

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.{digits}g}"

    lines = [
        f"ESD power-law alpha per layer (fit: {fits}); {len(names)} layers, {len(reports)} targets",
        "",
        "| layer | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    lines += ["| " + n + " | " + " | ".join(fmt(a.get(n)) for a in alphas.values()) + " |" for n in names]
    lines.append("| **mean** | " + " | ".join(fmt(rep.mean_alpha) for rep in reports.values()) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    name: str
    kind: str
    shape: tuple[int, ...]
    N: int
    M: int
    rf: int
    layout: str  # how the weight becomes the matrices: "matrix", "conv2d", "conv1d-slices", "conv1d-ww"
    mats_shape: tuple[int, int, int]  # (B, a, b): the matrices whose eigenvalues are pooled
    keep_top: int | None = None  # keep only the largest keep_top eigenvalues (conv1d="ww")
    scale: float = 1.0  # eigenvalue scale (0.5 for Conv2d slices)
    weight: Tensor | None = None  # in memory; None: read from the checkpoint when its batch is computed
    key: str = ""  # the tensor's name in the checkpoint
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wdtype: torch.dtype | None = None  # the stored weight's dtype (its precision: degenerate_rtol)


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    tname = str(type(module)).lower()  # WeightWatcher's rule: the class name decides
    for key, kind in (
        ("linear", "linear"),
        ("conv1d", "conv1d"),
        ("conv2d", "conv2d"),
        ("embedding", "embedding"),
    ):
        if key in tname:
            return kind
    return None


def _shape_kind(t: Tensor | TensorMeta) -> str | None:
    return {2: "linear", 3: "conv1d", 4: "conv2d"}.get(len(t.shape))


#: A candidate layer: (name, kind or None, weight -- a tensor, a checkpoint's TensorMeta, or None --,
#: the tensor's key in the checkpoint).
_Cand = tuple[str, "str | None", "Tensor | TensorMeta | None", str]


def _state_dict_cands(items: Iterable[tuple[str, Tensor | TensorMeta]]) -> list[_Cand]:
    """2-4-D tensors whose key ends in ``weight`` (biases, norms and buffers are not layers); one that
    is not floating point (a quantized layer's) is a candidate that :func:`_prepare` skips, saying why."""
    cands = []
    for key, t in items:
        if not str(key).endswith("weight") and str(key) != "tensor":  # "tensor": a file of one bare tensor
            continue
        kind = _shape_kind(t)
        if kind is None:
            continue  # 1-D weights: norms, not matrices
        name = str(key)[: -len(".weight")] if str(key).endswith(".weight") else str(key)
        cands.append((name, kind, t, str(key)))
    return cands


def _untied(cands: list[_Cand]) -> tuple[list[_Cand], list[str]]:
    """One candidate per weight: a tied matrix (an LM head sharing the embedding's tensor) is one layer,
    under its first selected name, as a checkpoint that stores it once (``save_pretrained``) gives it;
    returns the candidates kept and a note per candidate left out (as :func:`_drop_tied`)."""
    seen: dict[tuple, str] = {}
    out, notes = [], []
    for cand in cands:
        w = cand[2]
        if isinstance(w, Tensor) and _plain_tensor(w) and w.numel():
            key = _storage_view(w)
            if key in seen:
                notes.append(f"{cand[0]}: the same tensor as {seen[key]} (tied), analysed once")
                continue
            seen[key] = cand[0]
        out.append(cand)
    return out, notes


def _unwrapped(cands: list[_Cand]) -> list[_Cand]:
    """A wrapped module's layers under the names its checkpoint gives them: the ``module.`` (DDP,
    DataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes removed when every name has them."""
    names, _ = _strip_prefixes([c[0] + "." for c in cands], lightning=False)
    return [(n[:-1] or c[0], *c[1:]) for n, c in zip(names, cands)]


def _dtensor_type() -> type | None:
    """``DTensor``'s class if torch.distributed.tensor is loaded (no DTensor exists otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _plain_tensor(w: Tensor) -> bool:
    """A tensor with values in local memory: not on the meta device, not a DTensor, not a lazy
    module's uninitialized parameter."""
    dt = _dtensor_type()
    return not (
        w.device.type == "meta"
        or (dt is not None and isinstance(w, dt))
        or isinstance(w, nn.parameter.UninitializedTensorMixin)
    )


def _replicated_local(w: Any) -> Any:
    """A DTensor replicated on every rank of its mesh is whole on each: its local tensor (no
    collective). Anything else is returned as it is (a sharded DTensor is refused by _check_weight)."""
    dt = _dtensor_type()
    if dt is not None and isinstance(w, dt) and all(p.is_replicate() for p in w.placements):
        return w.to_local()
    return w


def _check_weight(name: str, w: Tensor) -> None:
    """A one-line error for a weight that holds no values here: on the meta device, a lazy module's
    uninitialized parameter, or a DTensor sharded over ranks (FSDP2, tensor parallel)."""
    if isinstance(w, nn.parameter.UninitializedTensorMixin):
        raise ValueError(
            f"layer {name!r}: its weight is an uninitialized parameter (a Lazy module before its first "
            "forward pass): run one forward pass, then analyze"
        )
    if w.device.type == "meta":
        raise ValueError(
            f"layer {name!r}: its weight is on the meta device and holds no values (a model built "
            "under torch.device('meta') or init_empty_weights): materialise it and load its weights "
            "(model.to_empty(device='cpu'), then load_state_dict) before analyze"
        )
    dt = _dtensor_type()
    if dt is not None and isinstance(w, dt):
        raise ValueError(
            f"layer {name!r}: its weight is a DTensor sharded over {w.device_mesh.size()} rank(s) "
            f"(placements {tuple(w.placements)}: FSDP2 fully_shard or tensor parallel); analyze needs "
            "whole matrices and does not gather them (a collective every rank must join): on every rank "
            "call torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
            "StateDictOptions(full_state_dict=True, cpu_offload=True)), then analyze that state_dict on "
            "rank 0 (the other ranks get an empty one)"
        )


def _collect(obj: Any) -> tuple[list[_Cand], str]:
    """Candidate layers and a description of obj (a module, a state_dict, a tensor or a Checkpoint)."""
    if isinstance(obj, Checkpoint) and obj.module is not None:
        obj = obj.module
    if isinstance(obj, nn.Module):
        cands = []
        for name, m in obj.named_modules():
            kind = _module_kind(m)
            if kind is None:
                continue
            w = getattr(m, "weight", None)
            w = _replicated_local(w) if isinstance(w, Tensor) else None
            cands.append((name or type(m).__name__, kind, w, ""))
        return _unwrapped(cands), f"model {type(obj).__name__}"
    if isinstance(obj, Tensor):
        _check_tensor_arg(obj)
        return [("tensor", _shape_kind(obj), _replicated_local(obj), "")], "tensor"
    if isinstance(obj, Checkpoint):
        return _state_dict_cands(obj.entries.items()), f"{obj.format} checkpoint {obj.path!r}"
    if isinstance(obj, Mapping):
        items = [(k, _replicated_local(t)) for k, t in obj.items() if isinstance(t, Tensor)]
        names, _ = _strip_prefixes([str(k) for k, _ in items], lightning=False)
        items = [(n, t) for n, (_, t) in zip(names, items)]
        return _state_dict_cands(items), "state_dict"
    raise TypeError(
        "analyze() takes an nn.Module, a state_dict, a checkpoint path or Checkpoint, or a tensor, "
        f"got {type(obj).__name__}"
    )


def _uncounted(obj: Any, keep: Callable[[str], bool]) -> list[str]:
    """Names of matrix-shaped (2-4-D, floating-point) tensors of ``obj`` that are no candidate layer,
    so that the report can say they were not analysed: a module's parameters outside Linear,
    Embedding, Conv1d and Conv2d weights (``nn.MultiheadAttention.in_proj_weight``, a mixture of
    experts' stacked ``(E, out, in)`` parameters), a state_dict's tensors whose key does not end in
    ``weight`` (``experts.gate_up_proj``). Only names the ``layers`` filter selects."""
    if isinstance(obj, Checkpoint) and obj.module is not None:
        obj = obj.module
    if isinstance(obj, nn.Module):
        layers = {name for name, m in obj.named_modules() if _module_kind(m) is not None}
        items = [
            (name, p.shape, p.is_floating_point())
            for name, p in obj.named_parameters()
            if not (name.rpartition(".")[0] in layers and name.rpartition(".")[2] == "weight")
        ]
    elif isinstance(obj, Checkpoint):
        items = [(str(k), t.shape, t.is_floating_point) for k, t in obj.entries.items()]
    elif isinstance(obj, Mapping):
        tensors = [(str(k), t) for k, t in obj.items() if isinstance(t, Tensor)]
        names, _ = _strip_prefixes([k for k, _ in tensors], lightning=False)  # as _collect names them
        items = [(n, t.shape, t.is_floating_point()) for n, (_, t) in zip(names, tensors)]
    else:
        return []
    by_key = not isinstance(obj, nn.Module)
    out = []
    for name, shape, floating in items:
        # a matrix has two sides > 1 (not a ViT's (1, 1, d) class token); a 2-D+ "bias" is a mask buffer
        if not (floating and 2 <= len(shape) <= 4 and sum(d > 1 for d in shape) >= 2):
            continue
        if (by_key and name.endswith("weight")) or name.endswith("bias"):
            continue
        if keep(name):
            out.append(f"{name} {tuple(shape)}")
    return out


#: How many of :func:`_uncounted`'s tensors the report's note names.
_UNCOUNTED_SHOWN = 5


def _check_tensor_arg(w: Tensor) -> None:
    """A weight tensor given on its own: 2-4-D and real floating point (a complex tensor would be
    cast to its real part, an integer one analysed as its raw codes)."""
    if w.ndim not in (2, 3, 4):
        raise ValueError(
            f"expected a weight tensor with 2 (linear), 3 (conv1d) or 4 (conv2d) dims, "
            f"got shape {tuple(w.shape)}"
        )
    if not w.is_floating_point():
        how = (
            "analyze its .real or .abs(), whichever the weights are"
            if w.is_complex()
            else "dequantize it, or cast it with .float() if its values are the weights"
        )
        dtype = str(w.dtype).replace("torch.", "")
        raise ValueError(f"expected a real floating-point weight tensor, got dtype {dtype}: {how}")


def _prepare(
    name: str,
    kind: str,
    w: Tensor | TensorMeta,
    conv1d: str,
    conv2d_norm: bool,
    key: str = "",
) -> _Layer | str:
    """The layer's geometry from its weight's shape; a skip reason (str) if the layer can't be used."""
    shape = tuple(w.shape)
    weight = w.detach() if isinstance(w, Tensor) else None
    if not (weight.is_floating_point() if weight is not None else w.is_floating_point):
        # a quantized (int8 LLM.int8, GPTQ/AWQ qweight) or complex weight: listed, not dropped unseen
        dtype = str(w.dtype).replace("torch.", "") if w.dtype is not None else "unknown"
        return f"weight dtype {dtype} is not a real floating-point dtype"
    dev = weight.device if weight is not None else torch.device("cpu")
    common = {"weight": weight, "key": key, "device": dev, "wdtype": w.dtype}
    if kind == "conv2d" and len(shape) == 4:
        out, inp, kh, kw = shape
        return _Layer(name, kind, shape, max(out, inp), min(out, inp), kh * kw, "conv2d", (kh * kw, out, inp),
                      scale=CONV2D_NORM if conv2d_norm else 1.0, **common)  # fmt: skip
    if kind == "conv1d" and len(shape) == 3:
        out, inp, k = shape
        if conv1d == "slices":
            return _Layer(
                name, kind, shape, max(out, inp), min(out, inp), k, "conv1d-slices", (k, out, inp), **common
            )
        # WeightWatcher 0.7.7 + SciPy >= 1.15: batched over out of (in x k), top min(shape) values
        return _Layer(
            name, kind, shape, max(shape), min(shape), 1, "conv1d-ww", shape, keep_top=min(shape), **common
        )
    if len(shape) == 2:  # linear, embedding, and 2-D "conv1d" (Hugging Face GPT-2 Conv1D)
        return _Layer(name, kind, shape, max(shape), min(shape), 1, "matrix", (1, *shape), **common)
    return f"{kind} weight has {len(shape)} dims {shape}"


def _matrices(L: _Layer, w: Tensor) -> Tensor:
    """The ``(B, a, b)`` matrices of a layer's weight (views where possible)."""
    w = w.detach()
    if L.layout == "conv2d":
        return w.permute(2, 3, 0, 1).reshape(L.mats_shape)
    if L.layout == "conv1d-slices":
        return w.permute(2, 0, 1)
    if L.layout == "conv1d-ww":
        return w
    return w.unsqueeze(0)


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"Invalid device: {device!r} ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r}: CUDA is not available")
    if dev.type == "meta":
        raise ValueError(f"Invalid device: {device!r}: a meta tensor holds no values to analyze")
    return dev


def _resolve_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float64 if device.type == "cpu" else torch.float32
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"Invalid dtype: {dtype}; expected torch.float64 or torch.float32")
    return dtype


def _resolve_method(method: str, dtype: torch.dtype) -> str:
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r}; expected one of {', '.join(map(repr, METHODS))}")
    if method == "auto":
        return "gram" if dtype == torch.float64 else "svd"
    return method


def _eigs(mats: Tensor, method: str) -> Tensor:
    """Eigenvalues of ``W^T W`` for a batch ``(B, a, b)``: ``(B, min(a, b))``, unsorted."""
    if method == "svd":
        return torch.linalg.svdvals(mats).square()
    with torch.autocast(mats.device.type, enabled=False):  # a float32 Gram product, not a bf16/fp16 one
        g = mats.mT @ mats if mats.shape[-2] >= mats.shape[-1] else mats @ mats.mT
    return torch.linalg.eigvalsh(g).clamp_min(0.0)


def _batched_eigenvalues(
    layers: list[_Layer],
    device: torch.device | None,
    dtype: torch.dtype,
    method: str,
    source: Checkpoint | None = None,
    batch_elems: int = _BATCH_ELEMS,
    prints: dict[str, tuple | None] | None = None,
) -> list[Tensor]:
    """Sorted (ascending) pooled eigenvalues per layer, batched over same-shape matrices.

    Layers without an in-memory weight are read from ``source`` one batch at a time (at most
    ``batch_elems`` elements, or one layer), checked for non-finite entries, and dropped after it;
    the keys of ``prints`` (when given) get their weight's :func:`_fingerprint` as they are read.
    """
    groups: dict[tuple, list[int]] = {}
    for i, L in enumerate(layers):
        groups.setdefault((str(device or L.device), L.mats_shape), []).append(i)
    out: list[Tensor | None] = [None] * len(layers)
    for (_, shape), ids in groups.items():
        per = max(1, batch_elems // max(1, math.prod(shape)))
        for a in range(0, len(ids), per):
            chunk = ids[a : a + per]
            dev = device or layers[chunk[0]].device
            lazy = [layers[i] for i in chunk if layers[i].weight is None]
            loaded = source.load([L.key for L in lazy]) if lazy else {}
            for L in lazy:
                _check_finite(L.name, loaded[L.key])
                if prints is not None and L.key in prints:
                    prints[L.key] = _fingerprint(loaded[L.key])
            parts = [
                _matrices(L, L.weight if L.weight is not None else loaded[L.key]).to(device=dev)
                for L in (layers[i] for i in chunk)
            ]
            del loaded
            if len({p.dtype for p in parts}) > 1:
                parts = [p.to(dtype) for p in parts]
            mats = torch.stack(parts).to(dtype)  # stack in the weights' dtype, convert once
            del parts
            shifts = _overflow_shifts(mats)
            for j, k in shifts:  # (a copy: stack made one)
                _scale_pow2(mats[j], -k)
            ev = _eigs(mats.reshape(-1, *shape[-2:]), method).reshape(len(chunk), -1)
            del mats
            for j, k in shifts:
                top = float(ev[j].max())  # of W / 2^k
                _scale_pow2(ev[j], 2 * k)
                if not bool(torch.isfinite(ev[j]).all()):
                    raise _overflow_error(layers[chunk[j]], top, k, dtype)
            ev = torch.sort(ev, dim=1).values
            for j, i in enumerate(chunk):
                e = ev[j]
                L = layers[i]
                if L.keep_top is not None:
                    e = e[-L.keep_top :]
                out[i] = e * L.scale if L.scale != 1.0 else e
    return out  # type: ignore[return-value]


#: Powers of two of headroom kept below the compute dtype's largest value: a layer whose eigenvalues
#: could come closer (``a * b * max|w|^2`` bounds them) is computed scaled by a power of two.
_OVERFLOW_HEADROOM = 16


def _overflow_shifts(mats: Tensor) -> list[tuple[int, int]]:
    """``(j, k)`` for each layer ``j`` of a stacked batch ``(n, B, a, b)`` whose eigenvalues could
    overflow its dtype (float32 weights from ~1e18 on computed in float32; float64 from ~1e150), with
    ``max|w| < 2^(k + 1)``: those layers are computed as ``W / 2^k`` (exact), their eigenvalues times
    ``4^k``. Empty for every layer of ordinary size (nothing rescaled, nothing changed)."""
    n, _, a, b = mats.shape
    if mats.numel() == 0:
        return []
    lo, hi = torch.aminmax(mats.reshape(n, -1), dim=1)
    log2_max = torch.log2(torch.maximum(hi, -lo)).tolist()
    limit = (math.log2(torch.finfo(mats.dtype).max) - _OVERFLOW_HEADROOM - math.log2(a * b)) / 2
    return [(j, math.floor(v)) for j, v in enumerate(log2_max) if v > limit]


def _scale_pow2(t: Tensor, k: int) -> None:
    """``t *= 2^k`` in place, exactly (two normal factors, no subnormal one; inf where it overflows)."""
    for part in (k // 2, k - k // 2):
        t.mul_(math.ldexp(1.0, part))


def _overflow_error(L: _Layer, top: float, k: int, dtype: torch.dtype) -> ValueError:
    """A layer whose eigenvalues are beyond the compute dtype's range (``top``: ``W / 2^k``'s largest)."""
    log10_max = math.log10(top) + 2 * k * math.log10(2.0) if top > 0 else math.inf
    name = str(dtype).replace("torch.", "")
    way = (
        "pass dtype=torch.float64 (htmuon esd: --device cpu)"
        if dtype != torch.float64
        else "scale its weights down (alpha does not depend on their scale)"
    )
    return ValueError(
        f"layer {L.name!r}: its eigenvalues (up to ~1e{log10_max:.0f}) are beyond the range of {name}, "
        f"the dtype they are computed in: {way}"
    )


def _drop_tied(todo: list[_Layer], source: Checkpoint | None) -> tuple[list[_Layer], list[str]]:
    """Leave out a checkpoint's layers that share the tensor of an earlier selected layer
    (:attr:`Checkpoint.tied`: one storage under two names in a ``torch.save`` file), as
    :func:`_untied` does for a module; returns the layers kept and a note per layer left out."""
    ties = source.tied if source is not None else {}
    keys = {L.key: L.name for L in todo}
    kept, notes = [], []
    for L in todo:
        first = ties.get(L.key)
        if first in keys and first != L.key:
            notes.append(f"{L.name}: the same tensor as {keys[first]} (tied), analysed once")
            continue
        kept.append(L)
    return kept, notes


def _fingerprint(t: Tensor) -> tuple:
    """Shape, dtype and a hash of the bytes of a weight read from a checkpoint (a DCP checkpoint
    writes a tied matrix's data once per name)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return (tuple(t.shape), t.dtype, hashlib.blake2b(data, digest_size=16).digest())


def layer_eigenvalues(
    weight: Tensor,
    kind: str | None = None,
    *,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    conv1d: str = "slices",
    conv2d_norm: bool = True,
) -> Tensor:
    """Sorted (ascending) eigenvalues of one layer's weight, with :func:`analyze`'s conventions.

    Args:
        weight: a 2-D (linear/embedding), 3-D (conv1d) or 4-D (conv2d) tensor.
        kind: one of :data:`KINDS`; inferred from ``weight.ndim`` if None.
        method, dtype, device, conv1d, conv2d_norm: as in :func:`analyze`.

    Returns:
        1-D tensor of ``M * rf`` eigenvalues (``lambda = s^2``, Conv2d slices scaled by 0.5).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    _check_tensor_arg(weight)
    weight = _replicated_local(weight)
    _check_weight("tensor", weight)
    kind = kind or _shape_kind(weight)
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    if conv1d not in CONV1D_MODES:
        raise ValueError(f"Invalid conv1d: {conv1d!r}; expected one of {', '.join(map(repr, CONV1D_MODES))}")
    _check_finite("tensor", weight)
    L = _prepare("tensor", kind, weight, conv1d, conv2d_norm)
    if isinstance(L, str):
        raise ValueError(L)
    dev = _resolve_device(device) or weight.device
    dt = _resolve_dtype(dev, dtype)
    return _batched_eigenvalues([L], dev, dt, _resolve_method(method, dt))[0]


def _check_finite(name: str, w: Tensor) -> None:
    if w.dtype.itemsize == 1 and w.is_floating_point():  # float8: isfinite has no kernel; upcast exactly
        w = w.float()
    if w.numel() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(
            f"layer {name!r} has {bad} non-finite (NaN/Inf) weight entries; cannot compute its ESD"
        )


def _layer_filter(layers) -> Callable[[str], bool]:
    if layers is None:
        return lambda name: True
    if isinstance(layers, str):
        try:
            pat = re.compile(layers)
        except re.error as e:
            raise ValueError(f"Invalid layers regex {layers!r}: {e}") from e
        return lambda name: pat.search(name) is not None
    if callable(layers):
        return layers
    names = set(layers)
    return lambda name: name in names


# ----------------------------------------------------------------------------- metrics


def _row(L: _Layer, ev: Tensor, fit: str, thresh: float, method: str) -> dict[str, Any]:
    # eigenvalues equal to within the weights' precision are equal (a degenerate ESD fails)
    pl = fit_powerlaw(ev, fit, thresh=thresh, N=L.N, weight_dtype=L.wdtype or ev.dtype)
    e = ev.to(torch.float64) if ev.device.type != "mps" else ev
    lam_max = e[-1]
    total = e.sum()
    sv = e.sqrt()
    eps = torch.finfo(ev.dtype).eps
    if method == "svd":  # numpy.linalg.matrix_rank's tolerance, as WeightWatcher
        rank = (sv > sv[-1] * L.N * eps).sum()
    else:  # Gram eigenvalues are only accurate down to ~ lambda_max * eps
        rank = (e > lam_max * L.N * eps).sum()
    p = e / total + ENTROPY_EPS
    entropy = -(p * p.log()).sum() / torch.log(rank.to(e.dtype) + ENTROPY_EPS)
    alpha = pl.alpha
    n_spikes = (
        (e >= pl.xmin).sum() if math.isfinite(pl.xmin) else torch.zeros((), dtype=torch.long, device=e.device)
    )
    # log10 sum lambda^alpha in log space: lambda^alpha itself leaves float64's range (lambda ~1e62
    # from float32 weights ~1e30, or alpha ~40 on lambda ~1e8) where its log does not
    # (zero eigenvalues masked to -inf, not indexed out: no host read before the one of vals below;
    # none positive gives -inf, reported as NaN as before)
    if math.isfinite(alpha):
        terms = torch.where(e > 0, alpha * e.clamp_min(torch.finfo(e.dtype).tiny).log(), -math.inf)
        log_alpha_norm = torch.logsumexp(terms, 0) / math.log(10.0)
    else:
        log_alpha_norm = torch.tensor(math.nan, dtype=e.dtype, device=e.device)
    vals = torch.stack(
        [lam_max, total, entropy, rank.to(e.dtype), n_spikes.to(e.dtype), log_alpha_norm.to(e)]
    ).tolist()
    lam_max_f, total_f, entropy_f, rank_f, n_spikes_f, log_alpha_norm_f = vals
    log_lmax = math.log10(lam_max_f) if lam_max_f > 0 else -math.inf
    warning = ""
    if alpha < OVER_TRAINED_ALPHA:
        warning = "over-trained"
    elif alpha > UNDER_TRAINED_ALPHA:
        warning = "under-trained"
    return {
        "name": L.name,
        "kind": L.kind,
        "shape": L.shape,
        "N": L.N,
        "M": L.M,
        "rf": L.rf,
        "num_evals": int(ev.numel()),
        "alpha": alpha,
        "xmin": pl.xmin,
        "xmax": pl.xmax,
        "D": pl.D,
        "sigma": pl.sigma,
        "num_pl_spikes": int(n_spikes_f),
        "alpha_weighted": alpha * log_lmax,
        "log_alpha_norm": log_alpha_norm_f if log_alpha_norm_f > -math.inf else math.nan,
        "log_norm": math.log10(total_f) if total_f > 0 else -math.inf,
        "log_spectral_norm": log_lmax,
        "spectral_norm": lam_max_f,
        "stable_rank": total_f / lam_max_f if lam_max_f > 0 else math.nan,
        "entropy": entropy_f,
        "matrix_rank": int(rank_f),
        "fit": fit,
        "status": pl.status,
        "warning": warning,
    }


# ----------------------------------------------------------------------------- analyze


@torch.no_grad()
def analyze(
    obj: Any,
    fit: str = "ks",
    *,
    layers: str | Iterable[str] | Callable[[str], bool] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    min_evals: int = DEFAULT_MIN_EVALS,
    max_evals: int = DEFAULT_MAX_EVALS,
    max_N: int = DEFAULT_MAX_N,
    conv1d: str = "slices",
    conv2d_norm: bool = True,
    thresh: float = EVALS_THRESH,
) -> ESDReport:
    """Layer-wise ESD analysis: power-law ``alpha`` and WeightWatcher's norm metrics.

    For each selected weight matrix ``W`` (``N x M``, ``N >= M``): eigenvalues
    ``lambda = svdvals(W)^2``, the power-law fit of their tail (``fit``), and::

        alpha_weighted = alpha * log10(lambda_max)      log_norm = log10(sum lambda)
        spectral_norm = lambda_max                       stable_rank = sum lambda / lambda_max
        log_alpha_norm = log10(sum lambda^alpha)         num_pl_spikes = #{lambda >= xmin}
        matrix_rank = #{s > s_max * N * eps}             entropy = -sum p ln p / ln(matrix_rank)
                                                         (p = lambda / sum lambda)

    Args:
        obj: an ``nn.Module``; a state_dict (name -> tensor); a checkpoint file or folder path
            (Hugging Face safetensors or ``pytorch_model.bin``, sharded or not; DCP; Lightning
            ``.ckpt``; a ``.pt``/``.pth`` state_dict or a dict with one under ``"model"``) or a
            :class:`~.readers.Checkpoint` (:func:`~.readers.open_checkpoint`), whose weights are
            read one batch of layers at a time; or one weight tensor (2-D linear, 3-D conv1d,
            4-D conv2d).
        fit: xmin rule, one of ``"ks"`` (WeightWatcher's default), ``"median"`` (the paper's
            estimator default), ``"fix-finger"``; see :mod:`htmuon.diagnostics.powerlaw`.
        layers: keep only these layers: a regex (``re.search`` on the name), a collection of
            names, or a predicate ``name -> bool``.
        device: where to compute; default: each weight's own device (no copies across devices).
        dtype: compute dtype; default float64 on CPU, float32 on accelerators.
        method: ``"svd"``, ``"gram"`` or ``"auto"`` (gram in float64, svd in float32).
        min_evals, max_evals, max_N: WeightWatcher's layer-selection limits on ``M * rf`` and ``N``.
        conv1d: ``"slices"`` (pool the k tap matrices) or ``"ww"`` (WeightWatcher 0.7.7's quirk);
            see the module docstring.
        conv2d_norm: scale Conv2d slices by ``sqrt(0.5)`` as WeightWatcher does by default.
        thresh: eigenvalues ``<= thresh`` are left out of the power-law fit.

    Returns:
        An :class:`ESDReport`.

    Raises:
        ValueError: a bad option, a tensor that is not 2-4-D or not real floating point, non-finite
            weights (naming the layer), weights with no values here (on the meta device, a Lazy
            module's uninitialized parameter, a DTensor sharded by FSDP2 or tensor parallelism:
            naming the layer and what to do), eigenvalues beyond the range of the compute dtype
            (naming the layer: float32 weights from ~1e18 on in float32, pass ``dtype=torch.float64``),
            or nothing to analyse (naming why each candidate was skipped).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> report = analyze(model)
        >>> [r["name"] for r in report.rows], report.fit
        (['0', '2'], 'ks')
    """
    keep, dev = _checked_options(fit, conv1d, min_evals, max_evals, max_N, layers, device)
    check_thresh(thresh)  # (before any eigenvalue is computed)
    if isinstance(obj, (str, os.PathLike)):
        with open_checkpoint(obj) as ckpt:
            return _analyze(ckpt, keep, dev, dtype, method, fit, min_evals, max_evals, max_N, conv1d,
                            conv2d_norm, thresh)  # fmt: skip
    return _analyze(
        obj, keep, dev, dtype, method, fit, min_evals, max_evals, max_N, conv1d, conv2d_norm, thresh
    )


def _checked_options(fit, conv1d, min_evals, max_evals, max_N, layers, device):
    """:func:`analyze`'s option checks (also run by :class:`AlphaTracker` when it is made): the layer
    filter and the device, each a ValueError naming the bad value."""
    _check_fit(fit)
    if conv1d not in CONV1D_MODES:
        raise ValueError(f"Invalid conv1d: {conv1d!r}; expected one of {', '.join(map(repr, CONV1D_MODES))}")
    for k, v in (("min_evals", min_evals), ("max_evals", max_evals), ("max_N", max_N)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"Invalid {k}: {v!r}; expected an int >= 0 (0 = no limit)")
    return _layer_filter(layers), _resolve_device(device)


def _analyze(obj, keep, dev, dtype, method, fit, min_evals, max_evals, max_N, conv1d, conv2d_norm, thresh):
    cands, what = _collect(obj)
    source = obj if isinstance(obj, Checkpoint) and obj.module is None else None
    first = next((w.device for _, _, w, _ in cands if isinstance(w, Tensor)), torch.device("cpu"))
    dt = _resolve_dtype(dev or first, dtype)
    meth = _resolve_method(method, dt)

    todo: list[_Layer] = []
    skipped: list[tuple[str, str]] = []
    # a tied matrix is one layer among those selected (the filter may select the head alone)
    selected, tied = _untied([c for c in cands if keep(c[0])])
    for name, kind, w, key in selected:
        if w is None:
            skipped.append((name, "no weight"))
            continue
        if isinstance(w, Tensor):
            _check_weight(name, w)
        L = _prepare(name, kind, w, conv1d, conv2d_norm, key)
        if isinstance(L, str):
            skipped.append((name, L))
            continue
        n_ev = L.M * L.rf
        if min_evals and n_ev < min_evals:
            skipped.append((name, f"M*rf={n_ev} < min_evals={min_evals}"))
        elif max_evals and n_ev > max_evals:
            skipped.append((name, f"M*rf={n_ev} > max_evals={max_evals}"))
        elif max_N and L.N > max_N:
            skipped.append((name, f"N={L.N} > max_N={max_N}"))
        else:
            if L.weight is not None:  # a checkpoint's weights are checked when read
                _check_finite(name, L.weight)
            todo.append(L)

    if not todo:
        if not cands:
            raise ValueError(
                f"nothing to analyze in the {what}: no Linear, Embedding, Conv1d or Conv2d weight found"
            )
        why = "; ".join(f"{n}: {r}" for n, r in skipped) or "no layer matched the `layers` filter"
        raise ValueError(f"nothing to analyze in the {what}: every candidate layer was skipped ({why})")

    todo, dropped = _drop_tied(todo, source)
    tied += dropped
    budget = _STREAM_BATCH_ELEMS if source is not None else _BATCH_ELEMS
    # a DCP checkpoint writes a tied embedding / head under both names and keeps no sign of the
    # sharing: such a pair with the same bytes is taken as one tied matrix (below)
    kinds = {L.key: kind_from_name(L.key, 2) for L in todo if source is not None and source.format == "dcp"}
    prints: dict[str, tuple | None] = {k: None for k, kind in kinds.items() if kind in ("embedding", "head")}
    evs = _batched_eigenvalues(todo, dev, dt, meth, source, budget, prints)
    first: dict[tuple, tuple[str, str]] = {}  # fingerprint -> (layer name, kind)
    rows = []
    for L, ev in zip(todo, evs):
        fp = prints.get(L.key)
        if fp is not None and fp in first and first[fp][1] != kinds[L.key]:
            tied.append(
                f"{L.name}: the same values as {first[fp][0]} (a tied matrix written twice), analysed once"
            )
            continue
        if fp is not None:
            first.setdefault(fp, (L.name, kinds[L.key]))
        rows.append(_row(L, ev, fit, thresh, meth))
    meta = {
        "source": what,
        "device": str(dev) if dev is not None else "weights' device",
        "dtype": str(dt).replace("torch.", ""),
        "method": meth,
        "thresh": thresh,
        "min_evals": min_evals,
        "max_evals": max_evals,
        "max_N": max_N,
        "conv1d": conv1d,
        "conv2d_norm": conv2d_norm,
        "fits": FITS,
    }
    notes = (list(obj.notes) if isinstance(obj, Checkpoint) else []) + tied
    other = _uncounted(obj, keep)
    if other:
        shown = ", ".join(other[:_UNCOUNTED_SHOWN]) + (", ..." if len(other) > _UNCOUNTED_SHOWN else "")
        notes.append(
            f"{len(other)} matrix-shaped tensor(s) are not layers WeightWatcher analyses (not the weight "
            "of a Linear, Embedding, Conv1d or Conv2d module, or a key not ending in 'weight') and were not "
            f"analysed: {shown}; pass one to analyze() as a tensor (an expert stack's matrices one by one)"
        )
    if notes:
        meta["notes"] = notes
    return ESDReport(rows=rows, fit=fit, skipped=skipped, meta=meta)
