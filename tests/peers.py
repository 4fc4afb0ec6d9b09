"""Re-statements of how the peers compute the sign-consensus family, written from ../shared/spec
(algorithms.md §4, peers.md §1.6 and §3) in the peers' own style (argsort/topk/kthvalue, full temporaries).

They are golden references for the compat modes and the "today" baselines of the benchmarks.
"""

import torch


# ---- mergekit 0.1.5 (generalized task arithmetic, per tensor) -------------------------------------------
def mk_magnitude(delta, density):
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros_like(delta)
    w = delta.abs().view(-1).float()
    mask.view(-1)[torch.argsort(w, descending=True)[:k]] = 1
    return delta * mask


def mk_outliers(delta, density, gamma):
    if density >= 1:
        return delta
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_bot, n_top = 0, n - target
    order = torch.argsort(delta.abs().view(-1).float(), descending=False)
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[n_bot:-n_top] if n_top > 0 else order[n_bot:]] = 1
    return delta * mask


def mk_ties(base, experts, densities, weights, lam=1.0, normalize=True, consensus="sum", sparsify=mk_magnitude):
    deltas = torch.stack([sparsify(e - base, d) for e, d in zip(experts, densities, strict=True)])
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    wd = deltas * w
    if consensus:
        s = wd.sign()
        maj = ((wd.sum(0) if consensus == "sum" else s.sum(0)) >= 0).to(wd.dtype) * 2 - 1
        mask = s == maj
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0).expand_as(mixed).clone()
        div[div.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return (base + lam * mixed).to(base.dtype)


# ---- PEFT merge_utils (task tensors, no base) -----------------------------------------------------------
def peft_prune(t, density):
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def peft_ties(tensors, weights, density, method="total"):
    tt = torch.stack([peft_prune(t, density) for t in tensors])
    sign = tt.sign()
    mag = tt.sum(0) if method == "total" else sign.sum(0)
    agree = sign == torch.where(mag >= 0, 1.0, -1.0)
    w = torch.tensor(weights, dtype=tt.dtype).view(-1, *([1] * tensors[0].dim()))
    mixed = (tt * w * agree).sum(0)
    return mixed / torch.clamp(agree.sum(0), min=1.0)


# ---- official TIES / FusionBench (flattened whole model) ------------------------------------------------
def official_ties(flat_tvs, K, merge="mean"):
    """flat_tvs: (T, d); K: kept fraction. Returns the merged flat task vector."""
    n, d = flat_tvs.shape
    k = d - int(d * K)
    kth = flat_tvs.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat_tvs * (flat_tvs.abs() >= kth)
    signs = torch.sign(trimmed.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    keep = torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if merge == "mean":
        return sel.sum(0) / torch.clamp((sel != 0).sum(0).float(), min=1)
    if merge == "sum":
        return sel.sum(0)
    return sel.abs().max(0).values * signs


# ---- official Breadcrumbs (per last-dim fibre, topk) ----------------------------------------------------
def official_breadcrumbs(t, beta, gamma):
    if t.dim() == 0:
        return t
    d = t.shape[-1]
    n_top, n_keep = int(d * gamma), int(d * beta)
    a = t.abs()
    mask = torch.ones_like(t, dtype=torch.bool)
    if n_top:
        mask.scatter_(-1, a.topk(n_top, dim=-1).indices, False)
    rest = torch.where(mask, a, torch.full_like(a, -1.0))
    keep = torch.zeros_like(mask)
    keep.scatter_(-1, rest.topk(n_keep, dim=-1).indices, True)
    return t * (keep & mask)


# ---- TALL masks / Consensus / EMR (official, flat) -------------------------------------------------------
def official_tall(tvs, lambdas):
    mtl = tvs.sum(0)
    return torch.stack([tvs[t].abs() > lambdas[t] * (mtl - tvs[t]).abs() for t in range(len(tvs))])


def official_emr(tvs):
    flag = torch.where(tvs.sum(0) > 0, 1.0, -1.0)
    agree = tvs * flag > 0
    uni = flag * (tvs * agree).abs().max(0).values
    return uni, agree


# ---- TSV-M / Iso-C / Iso-CTS / TSV-C as the official code does them: one key at a time, per-matrix SVDs ----
# (AntoAndGar/task_singular_vectors TSVM_utils, danielm1405/iso-merging iso.py; the "official-style loop"
# the subspace benchmarks time). taus: list of one key's task vectors (fp32).
def official_is_matrix(key, t):
    return t.dim() == 2 and "text_projection" not in key


def official_mean(taus):
    m = torch.zeros_like(taus[0])
    for i, t in enumerate(taus):
        m += (t - m) / (i + 1)
    return m


def official_tsv_m(taus):
    T = len(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k = int(r * (1 / T))
    like = {"dtype": taus[0].dtype, "device": taus[0].device}
    u_bar, s_bar, v_bar = torch.zeros(m, r, **like), torch.zeros(r, **like), torch.zeros(r, n, **like)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        u_bar[:, i * k:(i + 1) * k] = u[:, :k]
        s_bar[i * k:(i + 1) * k] = s[:k]
        v_bar[i * k:(i + 1) * k, :] = vh[:k, :]
    p, _, q = torch.linalg.svd(u_bar, full_matrices=False)
    u_perp = p @ q
    p, _, q = torch.linalg.svd(v_bar, full_matrices=False)
    v_perp = p @ q
    return torch.linalg.multi_dot((u_perp, torch.diag(s_bar), v_perp))


def official_iso_c(taus):
    total = sum(taus)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return s.mean() * u @ vh


def official_iso_cts(taus, common_fraction=0.8):
    T = len(taus)
    total = sum(taus)
    m, n = total.shape
    r = min(m, n)
    kc = int(r * common_fraction)
    ts = round((r - kc) / T) * T
    kc = r - ts
    st = (r - kc) // T
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    uc, sc, vhc = u[:, :kc], s[:kc], vh[:kc, :]
    us, ss, vs = [], [], []
    for tau in taus:
        resid = tau - uc @ (uc.T @ tau)
        ut, stv, vht = torch.linalg.svd(resid, full_matrices=False)
        us.append(ut[:, :st])
        ss.append(stv[:st])
        vs.append(vht[:st, :])
    u_all = torch.cat([*us, uc], 1)
    s_all = torch.cat([*ss, sc])
    v_all = torch.cat([*vs, vhc], 0)
    p, _, q = torch.linalg.svd(u_all, full_matrices=False)
    u_perp = p @ q
    p, _, q = torch.linalg.svd(v_all, full_matrices=False)
    v_perp = p @ q
    return s_all.mean() * u_perp @ v_perp


def official_tsv_c(tau, T):
    m, n = tau.shape
    k = min(m, n) // T
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]


# ---- DOGE (FusionBench doge_ta / doge_am, written line by line from the spec): one layer after the other,
# autograd on the row-wise loss, a fresh Adam per layer, the m x m projector P = B B^T ----------------------
def _doge_basis(vs, rank_of):
    T = len(vs)
    m, _ = vs[0].shape
    u_bar = None
    for i, v in enumerate(vs):
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        r = s.shape[0]
        k = int(r * (1 / T))
        if u_bar is None:
            u_bar = torch.zeros(m, r)
        u_bar[:, i * k:(i + 1) * k] = u[:, :k]
    u_u = torch.linalg.svd(u_bar, full_matrices=False)[0]
    b = u_u[:, :rank_of(r)]
    return b @ b.T


def _doge_loss(vs, sum_vec, sum_delta):
    return sum(((-v * sum_vec - v * sum_delta + v * v).sum(dim=1)).pow(2).sum() for v in vs)


def official_doge(base_sd, task_sds, keys, *, per_task=False, eta=0.07, K=0.30, subspace=6, lr=1e-4, steps=400):
    """Returns (merged state dict for doge_ta | modified task vectors {key: [T tensors]} for doge_am, deltas)."""
    T = len(task_sds)
    keys = sorted(keys)
    taus = {k: [sd[k].float() - base_sd[k].float() for sd in task_sds] for k in keys}
    lams = {k: [(eta / v.norm()) if float(v.norm()) > 0 else torch.tensor(0.0) for v in taus[k]] for k in keys}
    deltas = {}
    for k in keys:
        vs = taus[k]
        P = _doge_basis(vs, (lambda r: int(r / T)) if per_task else (lambda r: int(r / subspace)))
        lam = lams[k]
        sum_vec = sum(la * v for la, v in zip(lam, vs, strict=True))
        if per_task:
            ds = [torch.zeros_like(vs[0], requires_grad=True) for _ in range(T)]
        else:
            ds = [torch.zeros_like(vs[0], requires_grad=True)]
        opt = torch.optim.Adam(ds, lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            sum_delta = sum(la * d for la, d in zip(lam, ds, strict=True)) if per_task else sum(lam) * ds[0]
            _doge_loss(vs, sum_vec, sum_delta).backward()
            for d in ds:
                d.grad -= P @ d.grad
            opt.step()
        deltas[k] = [d.detach() for d in ds]
    masks = {}
    for i in range(T):
        flat = torch.cat([taus[k][i].reshape(-1) for k in keys]).abs()
        d = flat.numel()
        thr = flat.kthvalue(d - int(d * K)).values
        for k in keys:
            masks[(k, i)] = taus[k][i].abs() >= thr
    if per_task:
        return {k: [(taus[k][i] + deltas[k][i]) * masks[(k, i)] for i in range(T)] for k in keys}, deltas
    merged = {k: v.float().clone() for k, v in base_sd.items()}
    for k in keys:
        merged[k] = base_sd[k].float() + sum(lams[k][i] * ((taus[k][i] + deltas[k][0]) * masks[(k, i)])
                                             for i in range(T))
    return merged, deltas
