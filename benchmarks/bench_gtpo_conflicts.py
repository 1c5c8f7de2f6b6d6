"""Is GTPO's conflict-token search a hot spot? Its time at realistic sizes against TRL's `dapo` loss on the same batch.

`conflict_weights` (torch, vectorised over the gathered batch, chunked over groups) runs once per generation batch;
the loss runs forward + backward on every micro-batch. A ratio well below 1 means no Triton kernel is needed.

    python benchmarks/bench_gtpo_conflicts.py [--device cuda]
"""

import argparse
import functools

import torch
from timing import interleaved_medians_ms

from hf_ext.losses.gtpo import conflict_weights


def dapo_like_loss_ms(rows: int, width: int, device: str) -> float:
    """TRL's token-level clipped surrogate with dapo aggregation, forward + backward, on (rows, width) log-probs."""
    logps = torch.randn(rows, width, device=device).requires_grad_(True)
    old = logps.detach() + 0.01 * torch.randn_like(logps)
    advantages = torch.randn(rows, 1, device=device)
    mask = torch.ones(rows, width, device=device)

    def step():
        ratio = torch.exp(logps - old)
        loss = -torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.28) * advantages)
        ((loss * mask).sum() / mask.sum()).backward()

    return interleaved_medians_ms({"loss": step}, device, repeats=10, warmup=1)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--num_generations", type=int, default=16)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    cli = parser.parse_args()
    print(f"device={cli.device} torch={torch.__version__} G={cli.num_generations} T={cli.width}")
    print(f"{'groups':>7} {'rows':>6} {'conflicts ms':>13} {'dapo loss ms':>13} {'ratio':>7}")
    for groups in cli.groups:
        rows = groups * cli.num_generations
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cli.vocab, (rows, cli.width), generator=generator)
        ids[:, :64] = ids[0, :64]  # a shared prompt-like prefix, so runs exist
        lengths = torch.randint(cli.width // 2, cli.width + 1, (rows,), generator=generator)
        mask = (torch.arange(cli.width)[None, :] < lengths[:, None]).long()
        advantages = torch.randn(rows, generator=generator)
        ids, mask, advantages = ids.to(cli.device), mask.to(cli.device), advantages.to(cli.device)
        search = functools.partial(conflict_weights, ids, mask, advantages, cli.num_generations)
        conflicts = interleaved_medians_ms({"search": search}, cli.device, repeats=10, warmup=1)["search"]
        loss = dapo_like_loss_ms(rows, cli.width, cli.device)
        print(f"{groups:>7} {rows:>6} {conflicts:>13.2f} {loss:>13.2f} {conflicts / loss:>7.2f}")


if __name__ == "__main__":
    main()
