"""Next-token cross-entropy through the lm_head without materialising [tokens, vocab] logits.

Why: with a 32k vocabulary the logits of one micro-batch (8 x 128 tokens: 131 MB in fp32, plus
log-softmax and gradient copies) outweigh everything else a small LLaMA keeps for backward, and
they are the same for every finetuning method, which hides what WeLore-PEFT saves (gradients and
Adam state only for the low-rank factors). Here the loss is computed over chunks of tokens and the
gradients w.r.t. the hidden states (and the lm_head weight, only when it trains) are formed in the
same pass, so peak memory holds one chunk of logits and the FLOPs equal the plain
logits -> cross_entropy path (no recomputation).

This is the "fused linear cross-entropy" of Liger-Kernel / Cut-Cross-Entropy written in plain
torch: those ship Triton kernels only, and spectra must run the same path on CPU. Training only:
the gradient is computed eagerly, so there is no double backward (Hessian-vector products use
`spectra.linalg.hvp.hvp_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

LOGITS_BUDGET = 2**23  # fp32 logits alive at once (32 MiB): 256 rows of a 32k vocabulary


def default_chunk(vocab: int) -> int:
    """Rows per chunk: ~32 MiB of fp32 logits, but never so few that the matmuls starve."""
    return max(64, LOGITS_BUDGET // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly here
            for s in range(0, n, chunk):
                h = hidden[s : s + chunk].to(dtype)
                t = targets[s : s + chunk]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_h or want_w):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(t), device=t.device), t] -= 1.0
                g = g.div_(n).to(dtype)  # d(mean loss) / d logits
                if want_h:
                    grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)  # None where not wanted
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """mean_i CE(hidden[i] @ weight.T, targets[i]) for hidden [n, d], weight [vocab, d], targets [n].

    Under autocast the matmuls run in the autocast dtype (bf16 on GPU) and the softmax in fp32, as
    HF's `labels=` path does."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk or default_chunk(weight.shape[0]), dtype)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The loss of `model(input_ids=x, labels=x)` (mean next-token CE) for any HF causal LM with a
    bias-free output projection (LLaMA, Mistral, Qwen; also peft-wrapped), in chunks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(base.config, "final_logit_softcapping", None):
        return model(input_ids=input_ids, labels=input_ids).loss  # outside the fused path's assumptions
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return linear_cross_entropy(hidden[:, :-1].flatten(0, 1), head.weight, input_ids[:, 1:].flatten(), chunk)
