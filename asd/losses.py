"""Prototypical losses of the paper: Eq. 1 (PL), Eq. 3 (PL with MPE), Eq. 4 (balanced batch),
Eqs. 5-6 (negative-prototype expansion). Embeddings and prototypes are unit-length, so dot
products are cosine similarities; tau is the temperature (0.07 in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototypical_loss(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                      tau: float = 0.07) -> torch.Tensor:
    """Eq. 1: -log softmax over all prototypes at the anchor's own prototype, mean over anchors.

    z [B, D], labels [B] (index into prototypes), prototypes [C, D].
    """
    return F.cross_entropy(z @ prototypes.T / tau, labels)


def multi_prototype_loss(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                         prototype_class: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Eq. 3 (MPE): the softmax runs over every prototype and sub-prototype P^, and the
    -log-probability is averaged over the anchor's positive set P^_c (all prototypes of its
    class), as in supervised contrastive learning; then the mean over anchors.

    prototypes [Q, D], prototype_class [Q] gives the class of each (sub-)prototype.
    """
    log_prob = F.log_softmax(z @ prototypes.T / tau, dim=1)  # [B, Q]
    positive = (prototype_class.unsqueeze(0) == labels.unsqueeze(1)).to(log_prob.dtype)
    n_pos = positive.sum(dim=1)
    if bool((n_pos == 0).any()):
        raise ValueError("an anchor has no prototype of its own class")
    return (-(log_prob * positive).sum(dim=1) / n_pos).mean()


def batch_prototypes(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 with S_c replaced by the mini-batch subset S~_c (Sec. 3.1.2): normalised means of
    the batch embeddings of each class present. Gradients flow through the prototypes.

    Returns prototypes [C_b, D] and each anchor's index into them [B].
    """
    classes, local = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(classes.numel(), z.shape[1], dtype=z.dtype, device=z.device)
    sums = sums.index_add(0, local, z)
    return F.normalize(sums, dim=1), local


def balanced_batch_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Eq. 4: Eq. 1 with in-batch prototypes, averaged over the N x K anchors of the batch."""
    prototypes, local = batch_prototypes(z, labels)
    return prototypical_loss(z, local, prototypes, tau)


def negative_prototypes(z: torch.Tensor, prototypes: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Eq. 5: pseudo-anomalies z^_{a,j} = lam z_a + (1 - lam) p_j for every anchor a and
    prototype j, L2-normalised so that they live on the same sphere as z and p.

    z [B, D], prototypes [C, D], lam [B, C] -> [B, C, D].
    """
    lam = lam.unsqueeze(-1)
    return F.normalize(lam * z.unsqueeze(1) + (1.0 - lam) * prototypes.unsqueeze(0), dim=-1)


def npe_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07,
             lam_range: tuple[float, float] = (0.25, 0.5),
             generator: torch.Generator | None = None, lam: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Eq. 6: the balanced-batch loss whose denominator also holds, as extra negatives, the
    pseudo-anomalies between the anchor and every *other* class's in-batch prototype (Eq. 5),
    with lam ~ U[a, b] drawn per (anchor, class). ``lam`` may be given explicitly (tests).
    """
    prototypes, local = batch_prototypes(z, labels)
    b, c = z.shape[0], prototypes.shape[0]
    if lam is None:
        lo, hi = lam_range
        u = torch.rand(b, c, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
        lam = lo + (hi - lo) * u
    synth = negative_prototypes(z, prototypes, lam)
    proto_logits = z @ prototypes.T / tau  # [B, C]
    synth_logits = torch.einsum("bd,bcd->bc", z, synth) / tau
    own = F.one_hot(local, c).bool()
    synth_logits = synth_logits.masked_fill(own, float("-inf"))  # j != c
    denominator = torch.logsumexp(torch.cat([proto_logits, synth_logits], dim=1), dim=1)
    return (denominator - proto_logits.gather(1, local.unsqueeze(1)).squeeze(1)).mean()
