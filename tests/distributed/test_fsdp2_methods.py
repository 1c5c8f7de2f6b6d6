"""Every hf_ext training method under FSDP2 sharded per decoder layer and then at the root (accelerate's FSDP2
TRANSFORMER_BASED_WRAP): 2 gloo CPU ranks must train exactly as 1 (same global batch, the same code path: one rank
also goes through ``fully_shard`` on a 1-rank mesh). ``fsdp2_methods_worker.py`` runs every scenario in one launch
per world size; see its docstring for the scenarios (fast DoRA, ALLoRA, the GRPO losses ba, real, real_bce, gtpo
and real off-policy on fixed rollouts).

Why 2 ranks are not bit-equal to 1: the math is the same, only the order of the sums differs. One rank sums each
parameter's gradient over the whole batch in one backward; two ranks sum half the rows each, and FSDP2's
reduce-scatter adds the two partial sums and divides by 2 (and a loss's own normalisation runs as mean-of-halves
rather than one mean). Each reordering costs a few fp32 ulps (2^-24 ~ 6e-8 relative) of a gradient element, so the
step-1 gradients may differ by ``GRAD_RTOL`` of each tensor's largest entry (measured <= 5e-7), and after
``STEPS`` steps of SGD / AdamW the parameters (|p| <= ~1.3) by ``atol + rtol |p|`` (measured <= 9.2e-7 absolute,
a third of the bound at most). A real aggregation error (a rank's local statistics used instead of the global ones,
a missing or doubled 1/world) moves parameters by the size of an update, >= 2.4e-4 here: 20x the bound or more.
"""

import math
from pathlib import Path

import pytest
import torch
from launch import run_ranks


pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("fsdp2_methods_worker.py")
METHODS = ["dora", "allora", "ba", "real", "real_bce", "gtpo", "real_offpolicy"]
STEPS = 3
GRAD_RTOL = 1e-5  # of each gradient tensor's largest entry
PARAM_RTOL, PARAM_ATOL = 2e-5, 2e-6
MIN_MOVE = 1e-4  # every trainable tensor moves by more than this (max abs): the comparison is not vacuous
NORM_RTOL = 1e-5  # DoRA's weight norm against the full weight's, relative to the largest row norm


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{world size: [each rank's results]} for 1 and 2 ranks."""
    out = tmp_path_factory.mktemp("fsdp2_methods")
    return {world: run_ranks(WORKER, world, out / f"world{world}") for world in (1, 2)}


def test_models_are_sharded_per_layer_and_at_the_root(runs):
    for world, ranks in runs.items():
        assert len(ranks) == world and all(r["world_size"] == world for r in ranks)
        for result in ranks:
            for method in METHODS:
                sharding = result[method]["sharding"]
                assert sharding["fsdp_modules"] == 3, (method, sharding)  # 2 decoder layers + the root
                assert sharding["local_numel"] * world == sharding["full_numel"], (method, sharding)
    rank0, rank1 = runs[2]
    for method in METHODS:  # the ranks report the same global losses
        assert rank0[method]["losses"] == rank1[method]["losses"]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_as_one(runs, method):
    one, two = runs[1][0][method], runs[2][0][method]
    assert one["initial"].keys() == two["initial"].keys() and len(one["initial"]) >= 28
    for name in one["initial"]:
        torch.testing.assert_close(two["initial"][name], one["initial"][name], rtol=0, atol=0)
        for run in (one, two):
            assert run["grads"][name] is not None and run["grads"][name].abs().max() > MIN_MOVE, name
            assert (run["final"][name] - run["initial"][name]).abs().max() > MIN_MOVE, name
        grad = one["grads"][name]
        torch.testing.assert_close(
            two["grads"][name],
            grad,
            rtol=0,
            atol=GRAD_RTOL * grad.abs().max().item(),
            msg=lambda m, name=name: f"{name}: {m}",
        )
        torch.testing.assert_close(
            two["final"][name],
            one["final"][name],
            rtol=PARAM_RTOL,
            atol=PARAM_ATOL,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)


def test_dora_weight_norm_under_fully_shard_is_that_of_the_full_weight(runs):
    """FSDP2 frees each layer's unsharded weight after forward and all-gathers it again, so the fast DoRA cache of
    ||W||^2 (keyed on data_ptr and _version) mostly misses; on every training forward the norm DoRA uses must still
    be ||W + s B A|| of the full base weight, and the cached ||W||^2 (while one is kept) that of the full weight."""
    for ranks in runs.values():
        for result in ranks:
            cache = result["dora"]["cache"]
            assert cache["calls"] == [14] * (STEPS + 3)  # every fast DoRA layer, on every forward
            keeps_cache = not all(math.isnan(e) for e in cache["cache_error"])  # NaN: no ||W||^2 cached
            assert not keeps_cache or cache["recomputed"][0] == 14  # the counting works: the first forward fills all
            for index in [*range(STEPS + 1), STEPS + 2]:  # training, a no-grad forward, and after clearing
                assert cache["norm_error"][index] < NORM_RTOL, (index, cache["norm_error"])
                if keeps_cache:
                    assert cache["cache_error"][index] < NORM_RTOL, (index, cache["cache_error"])


def test_dora_weight_norm_after_loading_base_weights_into_the_shards(runs):
    for ranks in runs.values():
        for result in ranks:
            cache = result["dora"]["cache"]
            assert cache["norm_error"][STEPS + 1] < NORM_RTOL, cache["norm_error"]
            assert cache["probe_logits_error"] < 1e-5, cache["probe_logits_error"]
