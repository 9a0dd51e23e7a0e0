"""Contrastive losses of SPEC section 4, as pure functions of tensors.

Every function L2-normalises its embedding inputs, works in the log domain, returns the mean over
the M anchors as a 0-dim tensor and uses memory O(M x (M + K)), where K is the number of memory-bank
rows appended to the contrast set. Nothing here reads globals, devices or configuration.

Notation: s_i student embedding of anchor i, t_j teacher embedding of view j (same augmented image
as s_j), y labels, tau temperature, "." the dot product of unit vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["supcon_loss", "crd_loss", "lw_supcrd_loss", "hybrid_loss", "teacher_weights"]


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(sum_{j: mask_ij} exp(x_ij)).

    Rows with an empty mask give a very negative *finite* number instead of -inf, so that the
    backward pass never evaluates exp(-inf - (-inf)) = NaN.
    """
    very_negative = torch.finfo(x.dtype).min / 4
    return torch.logsumexp(x.masked_fill(~mask, very_negative), dim=1)


def _contrast_set(t: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
    t = F.normalize(t, dim=1)
    if bank is None or bank.shape[0] == 0:
        return t
    return torch.cat([t, F.normalize(bank.to(t.dtype), dim=1)], dim=0)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "out" form) on one set of embeddings.

        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau) )
        P(i) = {p != i : y_p = y_i}

    An anchor without positives contributes 0 and still counts in the mean over the M anchors.
    """
    z = F.normalize(z, dim=1)
    m = z.shape[0]
    logits = z @ z.T / temperature
    not_self = ~torch.eye(m, dtype=torch.bool, device=z.device)
    log_prob = logits - _masked_logsumexp(logits, not_self)[:, None]
    positives = (labels[:, None] == labels[None, :]) & not_self
    n_pos = positives.sum(dim=1)
    sum_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -sum_log_prob / n_pos.clamp(min=1)
    return per_anchor.mean()


def crd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = 0.07,
             bank: torch.Tensor | None = None) -> torch.Tensor:
    """In-batch InfoNCE between student anchors and teacher targets (instance matching).

        L_i = -log( exp(s_i.t_i/tau) / sum_j exp(s_i.t_j/tau) )

    j runs over the M teacher embeddings (the other view of the same image is a negative) and the
    K bank rows, which are all negatives.
    """
    s = F.normalize(s, dim=1)
    logits = s @ _contrast_set(t, bank).T / temperature
    target = torch.arange(s.shape[0], device=s.device)
    return F.cross_entropy(logits, target)


def teacher_weights(teacher_logits: torch.Tensor, labels: torch.Tensor, contrast_labels: torch.Tensor,
                    alpha: float, beta: float, adaptive_beta: bool, kd_temperature: float,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log pull weights (M,) and log push weights (M, M + K) of LW-SupCRD.

        p_i = softmax(z_i / T_kd);  w_pull,i = alpha * p_i(y_i)
        w_push,ij = beta_i * (1 - p_i(y_j)),  beta_i = beta / (p_i(y_i) + 0.5) if adaptive else beta

    The probability factors (and beta) are floored at eps so every log weight is finite.
    """
    probs = F.softmax(teacher_logits / kd_temperature, dim=1)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    log_pull = math.log(alpha) + p_true.clamp(min=eps).log()
    # beta = 0 (no push) is floored too, so log R stays finite and its gradient defined.
    log_beta = torch.full_like(p_true, math.log(max(beta, eps)))
    if adaptive_beta:
        log_beta = log_beta - torch.log(p_true + 0.5)
    p_of_contrast_class = probs[:, contrast_labels]  # (M, M + K): p_i(y_j)
    log_push = log_beta[:, None] + (1 - p_of_contrast_class).clamp(min=eps).log()
    return log_pull, log_push


def lw_supcrd_loss(s: torch.Tensor, t: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: torch.Tensor, alpha: float = 1.0, beta: float = 10.0,
                   temperature: float = 0.07, adaptive_beta: bool = True,
                   kd_temperature: float = 1.0, bank: torch.Tensor | None = None,
                   bank_labels: torch.Tensor | None = None, eps: float = 1e-8,
                   bank_positives: bool = True) -> torch.Tensor:
    """Logit-weighted supervised contrastive representation distillation (the method).

    Student anchor s_i against the teacher contrast set {t_k} (plus bank rows), teacher
    probabilities p_i = softmax(z_i / T_kd) from the anchor's own view:

        P(i) = {k : y_k = y_i}  (includes k = i),   N(i) = {j : y_j != y_i}
        A_i  = w_pull,i * sum_{k in P(i)} exp(s_i.t_k / tau)
        R_i  = sum_{j in N(i)} w_push,ij * exp(s_i.t_j / tau)
        L_i  = -log( A_i / (A_i + R_i) ) / alpha

    with w_pull,i = alpha * p_i(y_i), w_push,ij = beta_i * (1 - p_i(y_j)) and adaptive
    beta_i = beta / (p_i(y_i) + 0.5). The division by alpha keeps alpha > 1 from saturating the
    exponentials. Bank rows of the anchor's class are positives, the rest negatives; with
    `bank_positives=False` every bank row is a negative (the published README's reading), pushed
    with w_push,ij = beta_i * (1 - p_i(y_j)) from its label.
    Computed as (logaddexp(log A_i, log R_i) - log A_i) / alpha with log-sum-exp.
    """
    if (bank is None) != (bank_labels is None):
        raise ValueError("lw_supcrd_loss: pass bank and bank_labels together (or neither)")
    s = F.normalize(s, dim=1)
    contrast = _contrast_set(t, bank)
    contrast_labels = labels if bank is None else torch.cat([labels, bank_labels.to(labels.device)])
    logits = s @ contrast.T / temperature
    log_pull, log_push = teacher_weights(teacher_logits.to(logits.dtype), labels, contrast_labels,
                                         alpha, beta, adaptive_beta, kd_temperature, eps)
    positives = labels[:, None] == contrast_labels[None, :]
    if not bank_positives and bank is not None:
        positives[:, labels.shape[0]:] = False
    log_a = log_pull + _masked_logsumexp(logits, positives)
    log_r = _masked_logsumexp(logits + log_push, ~positives)
    per_anchor = (torch.logaddexp(log_a, log_r) - log_a) / alpha
    return per_anchor.mean()


def hybrid_loss(s: torch.Tensor, t: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor, lam: float = 0.5, **lw_supcrd_kwargs) -> torch.Tensor:
    """L = lambda * SupCon(s) + (1 - lambda) * LW-SupCRD(s, t); both share the temperature."""
    temperature = lw_supcrd_kwargs.get("temperature", 0.07)
    return (lam * supcon_loss(s, labels, temperature)
            + (1 - lam) * lw_supcrd_loss(s, t, teacher_logits, labels, **lw_supcrd_kwargs))


# CRD as published by Tian et al. (SPEC section 14)
#
# Notation: v_s, v_t the L2-normalised student and teacher embeddings of the B anchors (B, D); for
# each anchor (B, K + 1, D) rows of a momentum bank, row 0 the positive (the anchor's own slot),
# rows 1..K the negatives; N the number of training images; tau the temperature.

__all__ += ["crd_nce_logits", "crd_nce_normaliser", "crd_nce_loss"]

CRD_NCE_EPS = 1e-7


def crd_nce_logits(embed: torch.Tensor, bank_rows: torch.Tensor,
                   temperature: float = 0.07) -> torch.Tensor:
    """(B, K + 1) logits l_ij = v_i . m_ij / tau, v_i = normalise(embed_i), bank rows as given.

    Computed in at least float32 (bf16 / fp16 inputs are promoted).
    """
    dtype = torch.promote_types(torch.promote_types(embed.dtype, bank_rows.dtype), torch.float32)
    v = F.normalize(embed.to(dtype), dim=1)
    return torch.bmm(bank_rows.to(dtype), v[:, :, None]).squeeze(2) / temperature


def crd_nce_normaliser(logits: torch.Tensor, n_data: int) -> float:
    """Z = mean_{i, j}(exp(l_ij)) * N over one batch's (B, K + 1) logits, as a Python float.

    CRD fixes Z_s and Z_t once, from the first batch, and keeps them afterwards.
    """
    return float(torch.exp(logits.detach()).mean()) * n_data


def _crd_nce_side(logits: torch.Tensor, z: float, n_data: int, eps: float) -> torch.Tensor:
    """Mean over the batch of -[log P(1|x_i0) + sum_k log P(0|x_ik)], in the log domain."""
    num_neg = logits.shape[1] - 1
    noise = num_neg / n_data  # K * Pn
    log_x = logits - math.log(z)
    log_denominator = torch.logaddexp(log_x, torch.full_like(log_x, math.log(noise + eps)))
    log_p_pos = log_x[:, 0] - log_denominator[:, 0]
    log_p_neg = math.log(noise) - log_denominator[:, 1:]
    return -(log_p_pos + log_p_neg.sum(dim=1)).mean()


def crd_nce_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor,
                 student_bank_rows: torch.Tensor, teacher_bank_rows: torch.Tensor, n_data: int,
                 z_student: float, z_teacher: float, temperature: float = 0.07,
                 eps: float = CRD_NCE_EPS) -> torch.Tensor:
    """CRD's NCE loss (Tian et al. 2020), both directions summed.

    The student embedding is scored against rows m_t of the TEACHER bank, the teacher embedding
    against rows m_s of the STUDENT bank (row 0 the positive, rows 1..K the negatives):

        x^s_ij = exp(v_s,i . m_t,ij / tau) / Z_s,      x^t_ij = exp(v_t,i . m_s,ij / tau) / Z_t

    With noise probability Pn = 1 / N and K negatives per anchor:

        P(1 | x) = x / (x + K * Pn + eps),      P(0 | x) = K * Pn / (x + K * Pn + eps)
        L_side   = -1/B * sum_i [ log P(1 | x_i0) + sum_{k=1..K} log P(0 | x_ik) ]
        L        = L_s + L_t

    eps = 1e-7. Z_s, Z_t are constants (see `crd_nce_normaliser`); the embeddings are L2-normalised
    here, the bank rows are used as given and get no gradient. Evaluated in the log domain
    (log x = l - log Z, log(x + c) = logaddexp(log x, log c)), in at least float32.
    """
    student_side = crd_nce_logits(student_embed, teacher_bank_rows.detach(), temperature)
    teacher_side = crd_nce_logits(teacher_embed, student_bank_rows.detach(), temperature)
    return (_crd_nce_side(student_side, z_student, n_data, eps)
            + _crd_nce_side(teacher_side, z_teacher, n_data, eps))


# ----------------------------------------------------------------------------------------------
# Logit distillation (SPEC section 13)
# ----------------------------------------------------------------------------------------------
#
# Notation: z_s, z_t student and teacher logits (B x K), y labels, T temperature,
# p = softmax(z / T). KL is summed over classes; "mean" reduces over the rows. No CE term and no
# warm-up here: the trainer adds those. The teacher is not detached inside (the caller passes
# detached logits), so these stay pure functions. Computation is in float32 (half and bfloat16
# inputs are cast with .float()); float64 inputs stay float64 (gradcheck).

__all__ += ["kd_loss", "dkd_loss", "standardize_logits", "region_logits", "sdd_loss"]

_REDUCTIONS = ("mean", "none")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _per_row_factor(value, rows: int, name: str, like: torch.Tensor):
    """A float, a 0-dim tensor or a (rows,) tensor, ready to multiply a (rows,) loss."""
    if not torch.is_tensor(value):
        return value
    if value.dim() == 0 or (value.dim() == 1 and value.shape[0] == rows):
        return value.to(like.dtype)
    raise ValueError(f"{name} must be a float, a 0-dim tensor or a tensor of shape ({rows},) "
                     f"(one value per sample), got shape {tuple(value.shape)}")


def _check_logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor, who: str) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{who}: student and teacher logits must both be (B, K) with the same shape, "
                         f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            reduction: str = "mean") -> torch.Tensor:
    """Hinton's KD term (no CE):

        L_i = T^2 * KL(softmax(z_t,i / T) || softmax(z_s,i / T))
            = T^2 * sum_k p_t,ik * (log p_t,ik - log p_s,ik)

    Log-probabilities come from log_softmax. reduction "mean" averages over the B rows, "none"
    returns the (B,) per-row values.
    """
    _check_logit_pair(student_logits, teacher_logits, "kd_loss")
    log_ps = F.log_softmax(_at_least_float32(student_logits) / temperature, dim=1)
    log_pt = F.log_softmax(_at_least_float32(teacher_logits) / temperature, dim=1)
    per_row = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * temperature ** 2
    return _reduce(per_row, reduction)


def _non_target(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The K - 1 non-target columns of x (B, K), in their order: (B, K - 1), by gather."""
    k = x.shape[1]
    cols = torch.arange(k - 1, device=x.device)[None, :]
    index = cols + (cols >= labels[:, None]).long()  # skip the label's column
    return x.gather(1, index)


def _binary_and_non_target_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(log p_y, log(1 - p_y), log p^) of one model, p^ the softmax over the non-target classes.

        log p_y       = z_y/T - LSE_k(z_k/T)
        log(1 - p_y)  = LSE_{k != y}(z_k/T) - LSE_k(z_k/T)
        log p^_j      = z_j/T - LSE_{k != y}(z_k/T)          (j != y)

    Everything is a log-sum-exp over real columns (no -inf masking), so values and gradients stay
    finite even when p_y rounds to 1.
    """
    scaled = _at_least_float32(logits) / temperature
    lse_all = torch.logsumexp(scaled, dim=1)
    other = _non_target(scaled, labels)
    lse_other = torch.logsumexp(other, dim=1)
    log_p_y = scaled.gather(1, labels[:, None]).squeeze(1) - lse_all
    log_not_y = lse_other - lse_all
    log_p_hat = other - lse_other[:, None]
    return log_p_y, log_not_y, log_p_hat


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float | torch.Tensor = 1.0, beta: float | torch.Tensor = 8.0,
             temperature: float = 4.0, reduction: str = "mean") -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), without the CE term and without the warm-up:

        b = (p_y, 1 - p_y),  p^_j = p_j / (1 - p_y) for j != y  (softmax over the K - 1 others)
        TCKD_i = T^2 * KL(b_t,i || b_s,i)
        NCKD_i = T^2 * KL(p^_t,i || p^_s,i)
        L_i    = alpha * TCKD_i + beta * NCKD_i

    alpha and beta are floats or tensors of shape (B,) (per-sample weights; a tensor is used as
    given, gradients included). Since KL(p_t || p_s) = KL(b_t || b_s) + (1 - p_t,y) KL(p^_t || p^_s),
    alpha = 1 and beta_i = 1 - p_t,i(y_i) give exactly kd_loss. The non-target terms use
    log-sum-exp over the K - 1 gathered non-target columns. reduction "mean" | "none" as kd_loss.
    """
    _check_logit_pair(student_logits, teacher_logits, "dkd_loss")
    rows, k = student_logits.shape
    if k < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got K = {k}")
    if labels.shape != (rows,):
        raise ValueError(f"dkd_loss: labels must have shape ({rows},), got {tuple(labels.shape)}")
    s_y, s_not_y, s_hat = _binary_and_non_target_log_probs(student_logits, labels, temperature)
    t_y, t_not_y, t_hat = _binary_and_non_target_log_probs(teacher_logits, labels, temperature)
    tckd = t_y.exp() * (t_y - s_y) + t_not_y.exp() * (t_not_y - s_not_y)
    nckd = (t_hat.exp() * (t_hat - s_hat)).sum(dim=1)
    alpha = _per_row_factor(alpha, rows, "alpha", tckd)
    beta = _per_row_factor(beta, rows, "beta", nckd)
    per_row = (alpha * tckd + beta * nckd) * temperature ** 2
    return _reduce(per_row, reduction)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation of LSKD (Sun et al. 2024), per row:

        Z(z) = (z - mean(z)) / (std(z) + eps),   std unbiased (divisor K - 1)

    Invariant (up to eps) to z -> a z + c with a > 0. Needs K >= 2 and a non-constant row (the
    gradient of std is undefined at zero spread).
    """
    z = _at_least_float32(logits)
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, correction=1)
    return (z - mean) / (std + eps)


SDD_GRID = 4  # SDD pools every final feature map to this grid before its coarser levels


def _check_scales(scales) -> tuple[int, ...]:
    scales = tuple(scales)
    if not scales:
        raise ValueError("region_logits: scales is empty; give grid sizes such as (1, 2, 4)")
    if any(isinstance(s, bool) or int(s) != s or s < 1 for s in scales):
        raise ValueError(f"region_logits: scales must be positive integers, got {scales}")
    scales = tuple(int(s) for s in scales)
    if len(set(scales)) != len(scales):
        raise ValueError(f"region_logits: scales must not repeat, got {scales}")
    grid = max(SDD_GRID, max(scales))
    bad = [s for s in scales if grid % s]
    if bad:
        raise ValueError(f"region_logits: every scale must divide the {grid}x{grid} grid the map is "
                         f"pooled to first; {bad} do not (scales {scales})")
    if 1 not in scales:
        raise ValueError(f"region_logits: scales must include 1 (region 0 is the global region that "
                         f"sdd_loss compares against), got {scales}")
    return tuple(sorted(scales))


def region_logits(feature_map: torch.Tensor, classifier: torch.nn.Module,
                  scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """Multi-scale region logits of SDD (Wei et al. 2024): (B, C, H, W) -> (B, K, N).

        G = adaptive_avg_pool(F, m x m),  m = max(4, max(scales))   (SDD's 4x4 grid comes first,
            at any map size: 8x8, 7x7, 6x6, or 2x2, whose cells are then repeated)
        level s = avg_pool(G, kernel m/s)  (s x s regions, each the mean of its (m/s)^2 cells)
        R = concat over s in increasing order of the level's regions, row-major;  N = sum s^2
        logits[:, :, n] = classifier(R[:, :, n])

    `classifier` is the model's own linear layer C -> K (no new parameters). With 1 in scales,
    region 0 is classifier(mean of G), the global logits whenever H and W are multiples of 4 (or
    divide it); by linearity every level's regions average to it. Scales are sorted, must be
    distinct positive integers including 1 that each divide m.
    """
    scales = _check_scales(scales)
    if feature_map.dim() != 4:
        raise ValueError(f"region_logits: feature_map must be (B, C, H, W), got shape "
                         f"{tuple(feature_map.shape)}")
    grid_size = max(SDD_GRID, scales[-1])
    grid = F.adaptive_avg_pool2d(feature_map, grid_size)
    levels = [F.avg_pool2d(grid, grid_size // s).flatten(2) if s != grid_size else grid.flatten(2)
              for s in scales]
    regions = torch.cat(levels, dim=2)  # (B, C, N)
    return classifier(regions.transpose(1, 2)).transpose(1, 2)


def sdd_loss(student_regions: torch.Tensor, teacher_regions: torch.Tensor, labels: torch.Tensor,
             base: str = "dkd", alpha: float | torch.Tensor = 1.0, beta: float | torch.Tensor = 8.0,
             temperature: float = 4.0, complementary_weight: float = 2.0,
             standardize: bool = False) -> torch.Tensor:
    """Scale-decoupled distillation (Wei et al. 2024) on region logits (B, K, N), no CE, no warm-up:

        rows (b, n), with z~ = Z(z) if standardize else z  (Z = standardize_logits, per row)
        l_bn = base(z~_s[b, :, n], z~_t[b, :, n], y_b)       (kd_loss or dkd_loss, per row)
        c_bn = [argmax_k z_t[b, k, n] == y_b]                 (teacher region n right)
        w_bn = complementary_weight if c_bn != c_b0 else 1    (region 0 = global prediction)
        L    = sum_{b, n} w_bn * l_bn / (N * B)

    Teacher and student need the same N (not the same map size). alpha and beta go to dkd_loss
    (ignored by "kd"); a (B,) tensor is a per-sample value shared by all regions of the sample.
    With N = 1 (scales (1,)) this is the base loss on the global logits.
    """
    if base not in ("kd", "dkd"):
        raise ValueError(f"sdd_loss: base must be 'kd' or 'dkd', got {base!r}")
    if student_regions.dim() != 3 or teacher_regions.dim() != 3:
        raise ValueError(f"sdd_loss: region logits must be (B, K, N), got {tuple(student_regions.shape)} "
                         f"and {tuple(teacher_regions.shape)}")
    if student_regions.shape[2] != teacher_regions.shape[2]:
        raise ValueError(f"sdd_loss: student has N = {student_regions.shape[2]} regions, teacher "
                         f"N = {teacher_regions.shape[2]}; use the same scales for both models")
    if student_regions.shape != teacher_regions.shape:
        raise ValueError(f"sdd_loss: student and teacher region logits differ in shape: "
                         f"{tuple(student_regions.shape)} vs {tuple(teacher_regions.shape)}")
    batch, k, n = student_regions.shape
    if labels.shape != (batch,):
        raise ValueError(f"sdd_loss: labels must have shape ({batch},), got {tuple(labels.shape)}")
    # (B, K, N) -> (B * N, K); row b * N + n is region n of sample b.
    zs = student_regions.transpose(1, 2).reshape(batch * n, k)
    zt = teacher_regions.transpose(1, 2).reshape(batch * n, k)
    row_labels = labels.repeat_interleave(n)
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    if base == "kd":
        per_row = kd_loss(zs, zt, temperature, reduction="none")
    else:
        def per_region(value):
            if torch.is_tensor(value) and value.dim() == 1 and value.shape[0] == batch:
                return value.repeat_interleave(n)
            return value
        per_row = dkd_loss(zs, zt, row_labels, per_region(alpha), per_region(beta), temperature,
                           reduction="none")
    correct = teacher_regions.detach().argmax(dim=1) == labels[:, None]  # (B, N)
    complementary = correct != correct[:, :1]
    weight = (1.0 + (complementary_weight - 1.0) * complementary.to(per_row.dtype)).reshape(-1)
    return (weight * per_row).sum() / (batch * n)


# ----------------------------------------------------------------------------------------------
# Feature distillers
# ----------------------------------------------------------------------------------------------

def hint_loss(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FitNet's hint loss: the mean over every element (B * C * H * W) of (r - t)^2, between the
    student's regressed hint map r and the teacher's map t of the same shape (t carries no gradient)."""
    if regressed.shape != target.shape:
        raise ValueError(f"hint_loss: the regressed student map {tuple(regressed.shape)} and the teacher's map "
                         f"{tuple(target.shape)} must have one shape")
    return (regressed - target.detach()).pow(2).mean()


def match_spatial(student_map: torch.Tensor, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two maps at one spatial size: the one of greater height average-pooled to the other's
    H x H (as the originals do, comparing heights only)."""
    hs, ht = student_map.shape[2], teacher_map.shape[2]
    if hs > ht:
        student_map = F.adaptive_avg_pool2d(student_map, (ht, ht))
    elif ht > hs:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, (hs, hs))
    return student_map, teacher_map


def attention_map(feature_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """a(f) = normalize(mean_c f_c^p), flattened over H x W per sample: (B, H*W), unit L2 rows."""
    return F.normalize(feature_map.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student_maps, teacher_maps, p: float = 2.0) -> torch.Tensor:
    """AT: sum over stage pairs i of mean over B * H * W of (a(s_i) - a(t_i))^2, the two maps of a
    pair brought to one size (`match_spatial`), a(f) = `attention_map` (the teacher's detached)."""
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        s, t = match_spatial(s, t.detach())
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total


def similarity_preserving_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """SP: G = x x^T over the batch's flattened maps (B x B), each row L2-normalised (G^);
    L = || G^_t - G^_s ||_F^2 / B^2 (the teacher's detached)."""
    b = student_map.shape[0]
    g_s = F.normalize(student_map.flatten(1) @ student_map.flatten(1).T, dim=1)
    t = teacher_map.detach().flatten(1)
    g_t = F.normalize(t @ t.T, dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


def _pkt_probabilities(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    x = torch.nan_to_num(x, nan=0.0)
    similarity = (x @ x.T + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT: x^ = x / (||x|| + eps) (NaN set to 0), S = (x^ x^^T + 1) / 2, P = S / rowsum(S) for each
    model; L = mean over all B^2 entries (the diagonal too) of P_t log((P_t + eps) / (P_s + eps)),
    the teacher's detached."""
    p_s = _pkt_probabilities(student_features, eps)
    p_t = _pkt_probabilities(teacher_features.detach(), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pairwise_distances(x: torch.Tensor, eps: float) -> torch.Tensor:
    """psi_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i . x_j, eps)), the diagonal set to 0."""
    square = x.pow(2).sum(dim=1)
    d = (square[:, None] + square[None, :] - 2 * x @ x.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))


def _angles(x: torch.Tensor) -> torch.Tensor:
    """psi_ijk = u_ij . u_ik with u_ij = normalize(x_j - x_i) (the zero vector for i = j): (B, B, B)."""
    u = F.normalize(x[None, :, :] - x[:, None, :], dim=2)
    return u @ u.transpose(1, 2)


def rkd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0, eps: float = 1e-12) -> torch.Tensor:
    """RKD: distance_weight * L_D + angle_weight * L_A. L_D: SmoothL1 (beta 1, mean over B^2) between
    the two models' pairwise distance matrices (`_pairwise_distances`), each divided by the mean of its
    positive entries; L_A: SmoothL1 (mean over B^3) between their angle tensors (`_angles`). The
    teacher's are computed without gradient."""
    with torch.no_grad():
        t_dist = _pairwise_distances(teacher_features, eps)
        t_dist = t_dist / t_dist[t_dist > 0].mean()
        t_angle = _angles(teacher_features)
    s_dist = _pairwise_distances(student_features, eps)
    s_dist = s_dist / s_dist[s_dist > 0].mean()
    distance = F.smooth_l1_loss(s_dist, t_dist)
    angle = F.smooth_l1_loss(_angles(student_features), t_angle)
    return distance_weight * distance + angle_weight * angle


def _pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """rho(a, b) = (a - mean a) . (b - mean b) / (||a - mean a|| ||b - mean b|| + eps) along `dim`
    (the eps added to the product of the two norms, as DIST's original does)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
              inter_weight: float = 1.0, intra_weight: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """DIST: Y = softmax(z / T) per model; inter = T^2 (1 - mean over samples of rho(Y_s[i, :], Y_t[i, :]))
    and intra = T^2 (1 - mean over classes of rho(Y_s[:, c], Y_t[:, c])) (`_pearson`; the columns run
    over the batch); L = inter_weight * inter + intra_weight * intra (the teacher's detached)."""
    y_s = F.softmax(_at_least_float32(student_logits) / temperature, dim=1)
    y_t = F.softmax(_at_least_float32(teacher_logits).detach() / temperature, dim=1)
    inter = temperature ** 2 * (1 - _pearson(y_s, y_t, 1, eps).mean())
    intra = temperature ** 2 * (1 - _pearson(y_s, y_t, 0, eps).mean())
    return inter_weight * inter + intra_weight * intra


def nst_loss(student_maps, teacher_maps) -> torch.Tensor:
    """NST: for each stage pair (brought to one size, `match_spatial`), each channel's map flattened
    over H x W and L2-normalised, k(u, v) = (u . v)^2; L_i = mean k(t_j, t_j') + mean k(s_j, s_j')
    - 2 mean k(s_j, t_j') (means over the batch and both channel indices); L = sum_i L_i (the
    teacher's detached)."""
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        s, t = match_spatial(s, t.detach())
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
        total = total + ((t @ t.transpose(1, 2)).pow(2).mean() + (s @ s.transpose(1, 2)).pow(2).mean()
                         - 2 * (s @ t.transpose(1, 2)).pow(2).mean())
    return total


def vid_loss(predicted_mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """VID's negative log-likelihood (without its constant) of the teacher's map t under a Gaussian
    of the regressed mean mu and one variance per channel: mean over B * C * H * W of
    0.5 * ((mu - t)^2 / var_c + log var_c) (the teacher's detached)."""
    var = variance.view(1, -1, 1, 1)
    return (0.5 * ((predicted_mean - target.detach()).pow(2) / var + var.log())).mean()


def _transformed_teacher(teacher_logits: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """p~ = softmax(z_t)^gamma / Z and the power sum Z = sum_c softmax(z_t)_c^gamma, per sample."""
    powered = F.softmax(_at_least_float32(teacher_logits).detach(), dim=1).pow(gamma)
    z = powered.sum(dim=1)
    return powered / z[:, None], z


def ttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float = 0.1,
             weighted: bool = False) -> torch.Tensor:
    """TTM: mean over samples of KL(p~ || softmax(z_s)) = sum_c p~ (log p~ - log_softmax(z_s)), the
    teacher's probabilities raised to gamma (= 1 / T) and renormalised (`_transformed_teacher`); the
    student is not temperature-scaled and there is no T^2. WTTM (`weighted`): each sample's KL
    weighted by its power sum Z."""
    target, z = _transformed_teacher(teacher_logits, gamma)
    log_student = F.log_softmax(_at_least_float32(student_logits), dim=1)
    kl = (target * (torch.log(target.clamp_min(torch.finfo(target.dtype).tiny)) - log_student)).sum(dim=1)
    return (z * kl).mean() if weighted else kl.mean()


def correlation_congruence_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """CC as RepDistiller runs it: delta = |e_s - e_t| (B x D); L = (1 / (B - 1)) sum_{i<B} sum_d
    delta_{i,d} delta_{i+1,d}, over consecutive samples of the batch."""
    delta = (student_embedding - teacher_embedding).abs()
    return (delta[:-1] * delta[1:]).sum() / (delta.shape[0] - 1)


class _GradientReversal(torch.autograd.Function):
    """The identity going forward; the gradient multiplied by `scale` going back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x going forward; `scale` times the gradient going back (a negative scale reverses it)."""
    return _GradientReversal.apply(x, scale)


def curriculum_temperature(theta: torch.Tensor, reversal: float, start: float = 1.0,
                           span: float = 20.0) -> torch.Tensor:
    """CTKD's temperature T = start + span * sigmoid(theta), its gradient to theta multiplied by
    `reversal` (negative: the temperature is learnt adversarially, to make distillation harder)."""
    return start + span * torch.sigmoid(reverse_gradient(theta, reversal))


def cosine_reversal(epoch: int, epochs: int = 10, smallest: float = -1.0) -> float:
    """CTKD's reversal schedule: (cos(pi * min(e, E) / E) + 1) / 2 * (0 - smallest) + smallest for the
    1-based epoch e, from near 0 at the start to `smallest` from epoch E on."""
    progress = min(epoch, epochs) / epochs
    return (math.cos(math.pi * progress) + 1) / 2 * (0.0 - smallest) + smallest
