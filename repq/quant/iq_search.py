"""ggml's scale / codebook / sign search for the lattice i-quants (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS,
IQ2_XXS), vectorised in torch.

This is ``quantize_row_iq3_s_impl``, ``quantize_row_iq3_xxs_impl``, ``quantize_row_iq2_s_impl``,
``quantize_row_iq2_xs_impl`` and ``quantize_row_iq2_xxs_impl`` (ggml-quants.c) computed for every
sub-block at once, with the same float32 operations in the same order, so that on the same
importance it picks the same scales, codebook points and signs as ``ggml_quantize_chunk`` (the
baseline that repq's block LDLQ starts from and must beat).  Per sub-block of ``sub`` values:

    weight  w_i = imp_i · sqrt(σ² + x_i²)   (σ² = c · mean x² of the 256-block; without
                                              importance: w_i = x_i², IQ2_S: σ²/4 + x_i²)
    signs   taken from x, the search runs on |x| (parity types: an odd group of 8 flips its
            cheapest value, which then enters the search negative)
    for 2T + 1 trial inverse scales id = (2·kmax − 1 + t·step) / M, t = −T..T:
        l_i = clamp(round((id·|x_i| − 1) / 2), 0, kmax − 1)  per value: lattice coordinates
        group on the codebook?  else the best of its neighbour list at scale 1/id, under √w
        keep the trial with the largest (Σ w|x|q)² / Σ w q²       q = 2l + 1, the modelled point
    refit the groups that were off the codebook at the chosen scale; scale = Σ w|x|q / Σ w q²
    then d = max scale / 31 (fp16, times a per-type stretch), scale code = round((scale/d − 1) / 2)

M = max|x| of the sub-block, except IQ2_XXS: M = 3 · ggml's ``make_qp_quants`` scale (:func:`qp_scale`),
whose result is also the scale kept when no trial wins, and IQ2_XXS refits every group always.

The neighbour lists are ggml's ``iq2xs_init_impl`` / ``iq3xs_init_impl`` data rebuilt from the
codebook (:func:`neighbours`): for every lattice point off the codebook, the codebook entries in its
``nwant`` nearest distance shells, ordered by (distance, index), so that the first strict minimum
is ggml's choice.

Speed (4096 × 4096, byte-identical to ggml on CPU and CUDA): on an H200 0.4 s (IQ3_S) and 0.5 s
(IQ2_XS), faster than ggml's quantizer on the host's 16 cores (0.6 s, 1.2 s with unpacking); on
one CPU core 5-9 times slower than ggml's C, so on a host without a GPU, ggml's own quantizer
(:func:`repq.ggml.quants.quantize`) is the faster way to the same bytes.

Where ggml is not followed: an all-zero IQ3_S sub-block inside a non-zero block.  ggml skips it
without advancing its ``qs`` / ``signs`` pointers, so the *next* sub-block's indices land in its
slot and the rest shift (the zero sub-block then decodes to ±d·grid, the last one to index 0);
here every sub-block keeps its own slot and a zero sub-block gets index 0 and no signs — the
smallest representable magnitude, never a larger error than ggml's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..errors import UnsupportedError, UsageError
from ..ggml import quants
from . import iq_grids
from .iq_grids import QK, IqBlocks


@dataclass(frozen=True)
class SearchConstants:
    """The constants of ggml's search for one type (ggml-quants.c, named as there)."""

    step: float          # spacing of the 19 trial inverse scales (``is*0.2f`` / ``is*0.1f``)
    nwant: int           # neighbour shells per off-codebook point (``nwant``)
    sigma2_mul: float    # σ² = sigma2_mul · Σx² / 256
    d_stretch: float     # stored d = fp16(d · d_stretch) (IQ3_S's 1.033f)
    eps: float           # a sub-block with max|x| ≤ eps is zero (``!max`` / ``GROUP_MAX_EPS``)
    eps_strict: bool     # zero when max|x| < eps (IQ2_XS) rather than max|x| == 0 (IQ3_S)
    start_on_grid: bool  # ``is_on_grid`` before any trial is kept (IQ2_XS: true)
    refit_all: bool      # refit every group (IQ3_S) or only the off-codebook ones (IQ2_XS)
    trials: int = 9      # trial inverse scales t = −trials..trials (``is``)
    noimp_sigma: float = 0.0   # without importance w = noimp_sigma · σ² + x² (IQ2_S: 0.25f)
    qp: bool = False     # IQ2_XXS: trials around 3 · make_qp_quants' scale, refit always


_CONSTANTS = {
    "IQ3_S": SearchConstants(0.2, 3, 2.0, 1.033, 0.0, False, False, True),
    "IQ3_XXS": SearchConstants(0.2, 2, 2.0, 1.0125, 1e-8, True, True, False, trials=15),
    "IQ2_S": SearchConstants(0.1, 1, 2.0, 0.9875, 1e-8, True, True, False, noimp_sigma=0.25),
    "IQ2_XS": SearchConstants(0.1, 2, 1.0, 1.0, 1e-15, True, True, False),
    "IQ2_XXS": SearchConstants(0.1, 2, 1.0, 1.0, 1e-15, True, True, True, trials=6, qp=True),
}

ELEMENT_BUDGET = {"cpu": 1 << 19, "cuda": 1 << 27}
"""(sub-blocks × trials × values) per chunk, which bounds the trial tensors' memory: small on the CPU
(tens of MB, reused by the allocator rather than mapped afresh), about 10 GB at most on a GPU,
where fewer, larger chunks keep the kernel launches and host syncs few (a 4096² tensor on an H200:
IQ3_S 0.50 → 0.39 s, IQ2_XS 0.80 → 0.49 s against 2^25, the same bytes; 2^28 saves 5 % more)."""


@dataclass
class Tables:
    """Search tables of one type on one device."""

    kmax: int                 # lattice levels per coordinate
    radix: torch.Tensor       # int64 (group,): kmax**i, point id = Σ l_i · kmax**i
    on_grid: torch.Tensor     # int64 (kmax**group,): codebook index of each lattice point, −1 if none
    count: torch.Tensor       # int64 (kmax**group,): length of the point's neighbour list (0 on the codebook)
    slots: list[tuple[int, int, torch.Tensor]]   # (j0, j1, int64 (kmax**group, j1 − j0)): entries
                              # j0..j1−1 of every point's list, in (distance, index) order, padded with 0
    q: torch.Tensor           # float32 (n_grid, group): ggml's modelled points 2l + 1
    levels: torch.Tensor      # float32 (kmax,): 2l + 1
    lat_t: torch.Tensor       # int64 (group, n_grid): lattice coordinates, one row per coordinate


@cache
def neighbours(gtype: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ggml's neighbour data, rebuilt from the codebook: (kmax, on_grid, start, count, flat) as in
    :class:`Tables` (numpy)."""
    c = constants(gtype)
    lat = iq_grids.lattice(gtype)
    kmax, group = int(lat.max()) + 1, lat.shape[1]
    pts = np.array(list(itertools.product(range(kmax), repeat=group)), np.int64)[:, ::-1]  # id order
    radix = kmax ** np.arange(group)
    on_grid = np.full(kmax ** group, -1, np.int64)
    on_grid[lat @ radix] = np.arange(len(lat))
    d2 = ((pts[:, None, :] - lat[None, :, :]) ** 2).sum(-1)                  # (points, n_grid)
    order = np.argsort(d2, axis=1, kind="stable")                             # ties: lower index first
    count = np.zeros(len(pts), np.int64)
    lists = []
    for p in np.flatnonzero(on_grid < 0):
        shells = np.unique(d2[p])[:c.nwant]
        count[p] = int((d2[p] <= shells[-1]).sum())
        lists.append(order[p, :count[p]])
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    return kmax, on_grid, start, count, flat


def constants(gtype: int) -> SearchConstants:
    name = iq_grids.spec(gtype).name
    if name not in _CONSTANTS:  # pragma: no cover - spec() already rejected it
        raise UnsupportedError(f"no i-quant search for {name}")
    return _CONSTANTS[name]


_tables: dict[tuple[int, str], Tables] = {}


def tables(gtype: int, device: torch.device | str = "cpu") -> Tables:
    """The search tables of ``gtype`` on ``device`` (built once per device)."""
    key = (gtype, str(torch.device(device)))
    t = _tables.get(key)
    if t is None:
        kmax, on_grid, start, count, flat = neighbours(gtype)
        lat = iq_grids.lattice(gtype)
        lists = np.zeros((len(count), count.max()), np.int64)
        for j in range(count.max()):
            has = count > j
            lists[has, j] = flat[start[has] + j]
        dev = lambda a: torch.from_numpy(np.array(a)).to(device)  # noqa: E731
        # slots in blocks that widen further out, where few lists reach (one gather per block)
        bounds = [0]
        while bounds[-1] < count.max():
            bounds.append(min(bounds[-1] + max(1, bounds[-1] // 4), int(count.max())))
        slots = [(j0, j1, dev(lists[:, j0:j1])) for j0, j1 in itertools.pairwise(bounds)]
        t = _tables[key] = Tables(kmax, dev(kmax ** np.arange(lat.shape[1])), dev(on_grid), dev(count), slots,
                                  dev((2 * lat + 1).astype(np.float32)), dev(2 * np.arange(kmax) + 1.0).float(),
                                  dev(lat.T))
    return t


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrtf``, correctly rounded: torch's float32 sqrt on CPU is not (about 1 value in 6 is one
    ulp off); the float64 root of a float32 rounds to the correctly rounded float32 root."""
    return torch.sqrt(x.double()).float()


def _div(a: torch.Tensor, k: float) -> torch.Tensor:
    """``a / k`` correctly rounded: dividing a CUDA tensor by a Python number multiplies it by 1/k,
    which can differ in the last bit; a divisor tensor on the same device divides."""
    return a / torch.tensor(k, dtype=torch.float32, device=a.device)


def _seq_sum(terms) -> torch.Tensor:
    """Σ in the order given, one float32 rounding per addition (C's ``s += t`` loop)."""
    acc = None
    for t in terms:
        acc = t if acc is None else acc + t
    return acc


def _best_neighbour(t: Tables, point: torch.Tensor, xv: torch.Tensor, wa: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """``iq*_find_best_neighbour`` for M off-codebook groups at once: the codebook index minimising
    Σ_i wa_i (scale·q_i − xv_i)² over the point's neighbour list, first strict minimum.

    Each term depends on one coordinate's level only, so the kmax possible terms per coordinate are
    computed once per group (the same float32 operations as ggml's loop); then the lists are walked
    in blocks of slots (:attr:`Tables.slots`), over the groups whose list reaches the block (sorted
    by list length, they are a prefix), each candidate summing its terms in coordinate order.

    Args: point (M,) lattice point ids; xv, wa (M, group); scale (M,).  Returns int64 (M,).
    """
    m, group = xv.shape
    count = t.count.index_select(0, point)
    order = torch.argsort(count, descending=True)
    point, count = point.index_select(0, order), count.index_select(0, order)
    xv, wa, scale = xv.index_select(0, order), wa.index_select(0, order), scale.index_select(0, order)
    diff = scale[:, None, None] * t.levels - xv[:, :, None]                                 # (M, group, kmax)
    terms = ((wa[:, :, None] * diff) * diff).permute(1, 0, 2).contiguous()                 # (group, M, kmax)
    longer = (m - torch.cumsum(torch.bincount(count), 0)).tolist()                        # lists longer than j
    best = torch.full((m,), float("inf"), device=xv.device)
    arg = torch.zeros(m, dtype=torch.int64, device=xv.device)
    for j0, j1, table in t.slots:
        if j0 >= len(longer) or not longer[j0]:
            break
        # the first minimum inside the block of slots, then a strict improvement on the slots
        # before it: ggml's scan, a block at a time
        n = longer[j0]
        cand = table.index_select(0, point[:n])                                            # (n, slots)
        d2 = None
        for i in range(group):
            lat = t.lat_t[i].index_select(0, cand.reshape(-1)).reshape(cand.shape)
            term = terms[i, :n].gather(1, lat)
            d2 = term if d2 is None else d2 + term
        if j1 - j0 > 1:
            d2 = d2.masked_fill(torch.arange(j0, j1, device=xv.device) >= count[:n, None], float("inf"))
        k = d2.argmin(1, keepdim=True)
        d2, cand = d2.gather(1, k)[:, 0], cand.gather(1, k)[:, 0]
        better = d2 < best[:n]
        best[:n] = torch.where(better, d2, best[:n])
        arg[:n] = torch.where(better, cand, arg[:n])
    out = torch.empty_like(arg)
    out[order] = arg
    return out


def _snap(t: Tables, lv: torch.Tensor, xg: torch.Tensor, wg: torch.Tensor, scale: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook index of each group of rounded coordinates: the entry itself if the point is on the
    codebook, else its best neighbour at the trial's scale.

    Args: lv (N, trials, values) rounded coordinates; xg, wg (N, n_groups, group) the groups' |x|
    and √w; scale (N, trials).  Returns (index (N, trials, n_groups), on-codebook flags).
    """
    n, trials, _ = lv.shape
    ng, group = xg.shape[1:]
    point = (lv.reshape(n, trials, ng, group).long() * t.radix).sum(-1)                   # (N, trials, ng)
    gi = t.on_grid.index_select(0, point.reshape(-1)).reshape(point.shape)
    off = gi < 0
    f = off.reshape(-1).nonzero()[:, 0]
    if f.numel():
        xrow = (f // (trials * ng)) * ng + f % ng
        gi.view(-1)[f] = _best_neighbour(t, point.reshape(-1).index_select(0, f),
                                         xg.reshape(-1, group).index_select(0, xrow),
                                         wg.reshape(-1, group).index_select(0, xrow),
                                         scale.reshape(-1).index_select(0, f // ng))
    return gi, ~off


def _round(idv: torch.Tensor, xv: torch.Tensor, kmax: int) -> torch.Tensor:
    """``MAX(0, MIN(kmax − 1, nearest_int(0.5f*(id*x − 1))))`` (round half to even, as ggml's)."""
    return torch.round((idv * xv - 1) * 0.5).clamp_(0, kmax - 1)


def _sums(w: torch.Tensor, xv: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ w·x·q and Σ w·q·q over the values, in C's order: w, xv (N, sub), q (N, trials, sub)."""
    wx = (w * xv).T.contiguous()[:, :, None]                                           # (sub, N, 1)
    wt = w.T.contiguous()[:, :, None]
    qt = q.permute(2, 0, 1).contiguous()                                               # (sub, N, trials)
    sqx = _seq_sum(wx[i] * qt[i] for i in range(len(qt)))
    sq2 = _seq_sum((wt[i] * qt[i]) * qt[i] for i in range(len(qt)))
    return sqx, sq2


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit for bit, also outside its asserted range (where it is not a
    rounding: ``make_qp_quants`` can get there on a near-zero denominator): int32."""
    return ((f + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def qp_scale(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """ggml's ``make_qp_quants(n, nmax, x, L, w)`` for N rows at once: its returned scale (N,).

    As in C, the levels are kept in a ``uint8_t`` array although ``round(x / scale)`` is negative
    for the negative values that IQ2_XXS's parity flip leaves in x: they wrap (−1 → 255) wherever
    the C code reads the array back, and stay negative where it uses the ``int`` it just computed.

    Args: x, w (N, n) float32, every row with max x ≥ GROUP_MAX_EPS.
    """
    n = x.shape[1]
    f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=x.device)  # noqa: E731
    mx = x.amax(1).clamp_min(0)
    stored = lambda lv: (lv & 0xFF).float()  # noqa: E731   int → uint8_t → float

    def mse(scale: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = x - scale[:, None] * lv
        return _seq_sum((w[:, i] * diff[:, i]) * diff[:, i] for i in range(n))

    iscale = torch.full_like(mx, float(nmax)) / mx
    best = mse(1 / iscale, stored(_nearest_int(iscale[:, None] * x)))
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_k = (f32(0.1) * k + nmax) / mx
        lv = _nearest_int(iscale_k[:, None] * x).clamp_max(nmax).float()
        m = mse(1 / iscale_k, lv)
        better = m < best
        best, iscale = torch.where(better, m, best), torch.where(better, iscale_k, iscale)
    li = _nearest_int(iscale[:, None] * x).clamp_max(nmax)
    lf = li.float()
    wx = w * x
    sumlx = _seq_sum(wx[:, i] * lf[:, i] for i in range(n))
    suml2 = _seq_sum((w[:, i] * lf[:, i]) * lf[:, i] for i in range(n))
    stored_l = stored(li)
    for _ in range(5):   # ggml stops after a pass without change; further passes change nothing
        for i in range(n):
            li_ = stored_l[:, i]
            slx = sumlx - wx[:, i] * li_
            sl2 = suml2 - (w[:, i] * li_) * li_
            new = _nearest_int((x[:, i] * sl2) / slx).clamp_max(nmax)
            nf = new.float()
            ok = (slx > 0) & (sl2 > 0) & (nf != li_)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + (w[:, i] * nf) * nf
            ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            stored_l[:, i] = torch.where(ok, stored(new), li_)
            sumlx, suml2 = torch.where(ok, slx, sumlx), torch.where(ok, sl2, suml2)
    return torch.where(suml2 > 0, sumlx / suml2, 0.0)


def _search_chunk(t: Tables, c: SearchConstants, group: int, xv: torch.Tensor, w: torch.Tensor,
                  top: torch.Tensor, scale0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and codebook indices of N non-zero sub-blocks: xv, w (N, sub); top (N,) the M of the
    trial scales; scale0 (N,) the scale kept when no trial wins.  Returns (scale (N,), index
    (N, sub / group), the scale at which each group's point was chosen (N, sub / group))."""
    n, sub = xv.shape
    n_trials = 2 * c.trials + 1
    wa = _sqrt(w)
    ks = torch.arange(-c.trials, c.trials + 1, device=xv.device, dtype=torch.float32)
    trial = (2 * t.kmax - 1) + ks * torch.tensor(c.step, dtype=torch.float32)          # (T,)
    idv = trial[None, :] / top[:, None]                                                 # (N, T)
    this_scale = 1 / idv
    xg, wg = xv.reshape(n, -1, group), wa.reshape(n, -1, group)
    lv = _round(idv[..., None], xv[:, None, :], t.kmax)                                 # (N, T, sub)
    gi, on = _snap(t, lv, xg, wg, this_scale)                                           # (N, T, ng)
    q = t.q.index_select(0, gi.reshape(-1)).reshape(n, n_trials, sub)
    sqx, sq2 = _sums(w, xv, q)                                  # (N, T)
    # keep a trial when (Σwxq)² / Σwq² beats the best so far, strictly and in trial order
    scale = scale0.clone()
    best = torch.zeros_like(scale)
    chosen = torch.full((n,), -1, dtype=torch.int64, device=xv.device)
    for k in range(n_trials):
        ok = (sq2[:, k] > 0) & (sqx[:, k] * sqx[:, k] > best * sq2[:, k])
        scale = torch.where(ok, sqx[:, k] / sq2[:, k], scale)
        best = torch.where(ok, scale * sqx[:, k], best)
        chosen = torch.where(ok, k, chosen)
    kept = chosen >= 0
    rows = torch.arange(n, device=xv.device)
    gbest = torch.where(kept[:, None], gi[rows, chosen.clamp(min=0)], t.on_grid[0])
    on_best = torch.where(kept[:, None], on[rows, chosen.clamp(min=0)], c.start_on_grid)
    pick = torch.where(kept, this_scale[rows, chosen.clamp(min=0)], scale0)[:, None].repeat(1, gi.shape[2])
    # refit: groups off the codebook are rounded again at the chosen scale, then the scale is refit
    redo = ((~on_best).any(1) | c.qp) & (scale > 0)
    if redo.any():
        r = redo.nonzero()[:, 0]
        lr = _round((1 / scale[r])[:, None, None], xv[r, None, :], t.kmax)
        gr, _ = _snap(t, lr, xg[r], wg[r], scale[r, None])
        gr = gr[:, 0]
        if not c.refit_all:
            gr = torch.where(on_best[r], gbest[r], gr)
        gbest[r] = gr
        pick[r] = torch.where(on_best[r] & (not c.refit_all), pick[r], scale[r, None])
        sqx, sq2 = _sums(w[r], xv[r], t.q.index_select(0, gr.reshape(-1)).reshape(len(r), 1, sub))
        sqx, sq2 = sqx[:, 0], sq2[:, 0]
        scale[r] = torch.where(sq2 > 0, sqx / sq2, scale[r])
    return scale, gbest, pick


def _check(gtype: int, x, importance) -> tuple[torch.Tensor, torch.Tensor | None]:
    sp = iq_grids.spec(gtype)
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise UsageError(f"{sp.name} search expects a 2-D array, got shape {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    if x.shape[1] % QK:
        raise UnsupportedError(f"row length {x.shape[1]} is not a multiple of the {sp.name} block size {QK}")
    if not torch.isfinite(x).all():
        raise UsageError("non-finite value (NaN or Inf) in the weights")
    if importance is None:
        if quants.requires_imatrix(gtype):
            raise UsageError(f"type {sp.name} requires an importance matrix (--imatrix)")
        return x, None
    imp = torch.as_tensor(importance).to(x.device, torch.float32).reshape(-1)
    if imp.numel() != x.shape[1]:
        raise UsageError(f"importance matrix has {imp.numel()} values, expected {x.shape[1]}")
    if not torch.isfinite(imp).all():
        raise UsageError("importance matrix contains non-finite values")
    return x, imp


def search(gtype: int, x, importance=None, *, trace: dict | None = None) -> IqBlocks:
    """ggml's quantization of ``x`` (rows, n_per_row) to ``gtype``, as unpacked blocks.

    Args:
        gtype: IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS or IQ2_XXS.
        x: float32 weights (torch tensor on any device, or array); n_per_row a multiple of 256.
        importance: per-column importance (n_per_row,), as ggml's ``quant_weights`` (an imatrix
            entry, or diag H); IQ3_S, IQ3_XXS and IQ2_S may go without (ggml then weighs by x²,
            IQ2_S by σ²/4 + x²).
        trace: if given, filled with torch tensors: "scale" (rows, n_per_row / group), the scale
            at which each entry's point was chosen, and "weight" (rows, n_per_row), w above.

    Returns:
        The blocks (numpy, row after row); :func:`repq.quant.iq_grids.pack` gives ggml's bytes.

    Raises:
        UnsupportedError: not an i-quant here, or n_per_row not a multiple of 256.
        UsageError: not 2-D, non-finite values, importance missing (IQ2_XS, IQ2_XXS) or of the
            wrong size.
    """
    sp, c = iq_grids.spec(gtype), constants(gtype)
    x, imp = _check(gtype, x, importance)
    t = tables(gtype, x.device)
    rows, n = x.shape
    xb = x.reshape(-1, QK)                                                          # (nb, 256)
    nb = xb.shape[0]
    sumx2 = _seq_sum(xb[:, i] * xb[:, i] for i in range(QK))                        # (nb,)
    sigma2 = _div(sumx2 * c.sigma2_mul, QK)
    if imp is None:
        w = xb * xb if not c.noimp_sigma else c.noimp_sigma * sigma2[:, None] + xb * xb
    else:
        w = imp.reshape(1, -1, QK).expand(rows, -1, -1).reshape(nb, QK) * _sqrt(sigma2[:, None] + xb * xb)
    neg = xb < 0
    xv = xb.abs()
    if sp.parity:   # an even number of negatives per 8: flip the value where it costs least
        g8 = (nb * QK // 8, 8)
        odd = (neg.reshape(g8).sum(1) % 2) == 1
        imin = ((w * xb) * xb).reshape(g8).argmin(1)
        flip = torch.zeros(g8, dtype=torch.bool, device=x.device)
        flip[odd, imin[odd]] = True
        flip = flip.reshape(nb, QK)
        neg ^= flip
        xv = torch.where(flip, -xv, xv)
    # per sub-block search, in chunks of bounded memory
    xs, ws = xv.reshape(-1, sp.sub), w.reshape(-1, sp.sub)
    mx = xs.amax(1)
    zero = (mx < c.eps) if c.eps_strict else (mx == 0)
    top, scale0 = mx, _div(mx, 2 * t.kmax - 1)
    if c.qp:   # IQ2_XXS: around make_qp_quants' scale; a sub-block where it is not positive is zero
        scale0 = torch.zeros_like(mx)
        live = (~zero).nonzero()[:, 0]
        scale0[live] = qp_scale(xs[live], ws[live], t.kmax + 1)
        top = scale0 * t.kmax
        zero |= top <= 0
    scale = torch.zeros_like(mx)
    gidx = torch.zeros((xs.shape[0], sp.sub // sp.group), dtype=torch.int64, device=x.device)
    pick = torch.zeros(gidx.shape, device=x.device)
    live = (~zero).nonzero()[:, 0]
    step = max(1, ELEMENT_BUDGET.get(x.device.type, ELEMENT_BUDGET["cpu"]) // ((2 * c.trials + 1) * sp.sub))
    for s0 in range(0, live.numel(), step):
        r = live[s0:s0 + step]
        scale[r], gidx[r], pick[r] = _search_chunk(t, c, sp.group, xs[r], ws[r], top[r], scale0[r])
    negs = neg.reshape(-1, sp.sub)
    negs[zero] = False
    flipped = scale < 0   # ggml: "should never happen"; flip the sub-block's signs
    negs[flipped] = ~negs[flipped]
    scale = scale.abs()
    if trace is not None:
        trace.update(scale=pick.reshape(rows, -1), weight=w.reshape(rows, n))
    return _finish(sp, c, scale.reshape(nb, sp.n_sub), gidx.reshape(nb, sp.n_groups), negs.reshape(nb, QK))


def _finish(sp, c: SearchConstants, scale: torch.Tensor, gidx: torch.Tensor, neg: torch.Tensor) -> IqBlocks:
    """Super-scale d = max scale / 31 and the 4-bit scale codes; blocks to numpy."""
    max_scale = scale.amax(1)
    d = _div(max_scale, 31)
    empty = max_scale == 0
    dd = torch.where(empty, 1.0, d)
    code = torch.round(((1 / dd)[:, None] * scale - 1) * 0.5).clamp_(0, 15)
    code[empty] = 0
    d_store = torch.where(empty, 0.0, d * torch.tensor(c.d_stretch, dtype=torch.float32)).to(torch.float16)
    if sp.parity:   # IQ2_XS, IQ2_XXS, IQ3_XXS clear the indices and signs of an all-zero block
        gidx[empty] = 0
        neg[empty] = False
    masks = (neg.reshape(-1, QK // 8, 8).to(torch.uint8) << torch.arange(8, device=neg.device, dtype=torch.uint8)).sum(
        -1, dtype=torch.uint8)
    np_ = lambda a: a.cpu().numpy()  # noqa: E731
    return IqBlocks(np_(d_store), np_(code.to(torch.uint8)), np_(gidx), np_(masks))


@dataclass
class IqResult:
    raw: np.ndarray      # uint8: ggml's row-major bytes
    values: np.ndarray   # float32 (rows, n_per_row): what ggml decodes them to
    blocks: IqBlocks


def quantize(gtype: int, x, importance=None) -> IqResult:
    """:func:`search`, packed into ggml's bytes and decoded."""
    blocks = search(gtype, x, importance)
    n = torch.as_tensor(x).shape[1]
    return IqResult(iq_grids.pack(blocks, gtype), iq_grids.decode(blocks, gtype).reshape(-1, n), blocks)
