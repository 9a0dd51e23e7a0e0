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
                   bank_labels: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Logit-weighted supervised contrastive representation distillation (the method).

    Student anchor s_i against the teacher contrast set {t_k} (plus bank rows), teacher
    probabilities p_i = softmax(z_i / T_kd) from the anchor's own view:

        P(i) = {k : y_k = y_i}  (includes k = i),   N(i) = {j : y_j != y_i}
        A_i  = w_pull,i * sum_{k in P(i)} exp(s_i.t_k / tau)
        R_i  = sum_{j in N(i)} w_push,ij * exp(s_i.t_j / tau)
        L_i  = -log( A_i / (A_i + R_i) ) / alpha

    with w_pull,i = alpha * p_i(y_i), w_push,ij = beta_i * (1 - p_i(y_j)) and adaptive
    beta_i = beta / (p_i(y_i) + 0.5). The division by alpha keeps alpha > 1 from saturating the
    exponentials. Bank rows of the anchor's class are positives, the rest negatives.
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
