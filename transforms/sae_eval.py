"""Held-out quality of an SAE from streamed batches: FVU, MSE, L0 and dead latents, in one pass.

Sums are kept in float64 and only divided at the end, so the result does not depend on how the tokens were
batched; the variance is taken about the mean of all evaluated tokens (not per batch), so FVU is the share
of the held-out activations' total variance the SAE fails to reconstruct.
"""

from collections.abc import Iterable

import torch
from torch import Tensor

from schemas.errors import UserError
from transforms.sae import SAE
from transforms.sae_init import check_width


def evaluate(sae: SAE, batches: Iterable[Tensor]) -> dict[str, float | int]:
    """`tokens`, `fvu`, `mse` (squared error summed over d_in, mean over tokens, in input units), `l0` (mean
    active latents per token), `dead` (latents that never fired on these tokens)."""
    tokens, squared_error, sum_sq, active = 0, 0.0, 0.0, 0
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.device)
    with torch.inference_mode():
        for batch in batches:
            check_width(batch, sae.d_in)
            x = batch.to(sae.device, sae.dtype).reshape(-1, sae.d_in)
            latents = sae.encode(x)
            recon = sae.decode(latents, x.norm(dim=-1))
            x64 = x.to(torch.float64)
            squared_error += float((recon.to(torch.float64) - x64).pow(2).sum())
            sum_sq += float(x64.pow(2).sum())
            total += x64.sum(dim=0).cpu()
            nonzero = latents != 0
            active += int(nonzero.sum())
            fired |= nonzero.any(dim=0)
            tokens += x.shape[0]
    if tokens == 0:
        raise UserError("no held-out activations to evaluate the SAE on: the holdout split is empty; "
                        "harvest more documents or lower the holdout share")
    variance = sum_sq - float(total.pow(2).sum()) / tokens
    return {"tokens": tokens, "fvu": squared_error / variance if variance > 0 else float("nan"),
            "mse": squared_error / tokens, "l0": active / tokens, "dead": int((~fired).sum())}
