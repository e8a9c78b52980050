"""SAE training step speed: `python tests/bench/sae_training.py [--d-in 576 --d-sae 4608 --k 32 --batch N]`.

Times `Trainer.step` (TopK; once with no dead latents, once with a quarter of them dead so AuxK runs) against
the same TopK step written with dense autograd (encoder matmul, topk, scatter, decoder matmul, MSE, Adam),
alternating the runs so drift in the machine's speed hits all alike; reports the median of the repeats.
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from actstore.schemas.train import TrainConfig
from actstore.transforms.sae_training import Trainer


def dense_step(d_in: int, d_sae: int, k: int) -> Callable[[torch.Tensor], None]:
    """The textbook TopK step: every gradient dense."""
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    params = [
        w_dec.T.contiguous().requires_grad_(),
        torch.zeros(d_sae, requires_grad=True),
        w_dec.requires_grad_(),
        torch.zeros(d_in, requires_grad=True),
    ]
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def run(x: torch.Tensor) -> None:
        w_enc, b_enc, w_dec, b_dec = params
        pre = (x - b_dec) @ w_enc + b_enc
        top = pre.topk(k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        loss = (latents @ w_dec + b_dec - x).pow(2).sum(dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, batch_size=args.batch, total_tokens=args.batch * 1000, warmup_steps=0)
    trainer = Trainer(cfg, args.d_in)
    trainer.init_from_data(x)
    with_dead = Trainer(cfg, args.d_in)
    with_dead.init_from_data(x)

    def step_with_dead(x: torch.Tensor) -> None:
        # Random data fires nearly every latent in one batch: mark a quarter dead again before every step,
        # far more than k_aux = d_in / 2, so AuxK runs at its full size.
        with_dead.tokens_since_fired[: args.d_sae // 4] = cfg.dead_tokens
        assert with_dead.step(x).auxk_loss > 0

    runs = {
        "trainer": trainer.step,
        "trainer+auxk": step_with_dead,
        "dense autograd": dense_step(args.d_in, args.d_sae, args.k),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(x)  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    machine = platform.processor() or platform.machine()
    print(
        f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}"
    )
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rate = args.batch / median
        print(f"{name:>15}: {1 / median:6.3f} steps/s ({median:.3f} s/step, {rate:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
