"""Cross-entropy over every item without holding the (tokens x items) logits in memory.

Training scores every valid position against every item: on yelp a batch of 512 users x 50
positions x 20,034 items is 2 GB of logits, and autograd keeps a second copy for the gradient.
`linear_cross_entropy(h, E, y)` equals `F.cross_entropy(h @ E.T, y)` but works in chunks of
positions and computes the gradients of h and E during the forward pass, so peak memory is one
chunk of logits (the approach of fused linear-cross-entropy kernels such as Liger's).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**21  # logits per chunk: 8 MiB in float32, so a chunk's passes stay in cache


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for start in range(0, n, chunk):
            hc, yc = h[start:start + chunk], targets[start:start + chunk]
            log_probs = torch.log_softmax(hc @ weight.T, dim=-1)  # (c, N)
            total -= log_probs.gather(1, yc.unsqueeze(1)).sum(dtype=torch.float64)
            if want_h or want_w:
                probs = log_probs.exp_()  # softmax, in place
                probs[torch.arange(len(yc), device=h.device), yc] -= 1.0  # d loss / d logits (sum)
                if want_h:
                    grad_h[start:start + chunk] = probs @ weight
                if want_w:
                    grad_w.addmm_(probs.T, hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n = n
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (grad_h * scale if grad_h is not None else None,
                grad_w * scale if grad_w is not None else None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of `h @ weight.T` (n, N) against `targets` (n,), in bounded memory."""
    if h.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one position with a target")
    return _LinearCrossEntropy.apply(h, weight, targets)
