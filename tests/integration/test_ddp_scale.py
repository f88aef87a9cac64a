"""DDP at scale: the ranks of ``torchrun --nproc-per-node 4`` (gloo) attach to one real daemon through
``augserve.Loader`` (examples/ddp_loader.py), and across the ranks every sample of each epoch's
``drop_last`` plan arrives exactly once; then tools/ddp_scale.py, which measures the README's figure,
runs a 1-rank and a 2-rank job against the same daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from augserve.epochs import EpochPlan
from conftest import free_port, run_python, wait_until

pytestmark = pytest.mark.slow  # several torch processes start on a 2-core machine: tens of seconds

N_TRAIN = 1438  # the built-in digits, train split
BATCH = 64
WORLD = 4
EPOCHS = 2
STEPS = 5  # drop_last: 1,438 digits // 4 ranks = 359 per rank → 5 full batches of 64 each
KEPT = WORLD * STEPS * BATCH  # 1,280 digits per epoch; the last 158 of the epoch's order are left out


def test_four_gloo_ranks_receive_each_sample_of_every_epoch_exactly_once(daemon, tmp_path):
    assert (N_TRAIN // WORLD) // BATCH == STEPS
    record = tmp_path / "batches"
    proc = run_python("-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port", str(free_port()), "examples/ddp_loader.py",
               "--address", daemon.address, "--epochs", str(EPOCHS), "--record", str(record), "--json")  # fmt: skip
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == WORLD
    assert [(e["epoch"], e["images"], e["steps"]) for e in summary["epochs"]] == [(epoch, KEPT, [STEPS] * WORLD) for epoch in range(EPOCHS)]

    ranks = [json.loads(Path(f"{record}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(r, WORLD) for r in range(WORLD)]  # from the process group torchrun set up
    whole = EpochPlan(N_TRAIN, BATCH, seed=0)  # the order of an epoch is the same on every rank
    for epoch in range(EPOCHS):
        union = []
        for rank, recorded in enumerate(ranks):
            batches = {index: ids for e, index, ids in recorded["batches"] if e == epoch}
            assert sorted(batches) == list(range(STEPS)), f"rank {rank}, epoch {epoch}: batches {sorted(batches)}"  # each once, every rank alike
            plan = EpochPlan(N_TRAIN, BATCH, seed=0, rank=rank, world_size=WORLD, drop_last=True)
            for index, ids in batches.items():
                assert ids == plan.batch(epoch, index).tolist(), f"rank {rank}, epoch {epoch}, batch {index}: not the plan's samples"
                union += ids
        assert len(union) == len(set(union)) == KEPT, f"epoch {epoch}: {len(union) - len(set(union))} duplicates"
        order = whole.order(epoch).tolist()
        assert set(union) == set(order[:KEPT])  # exactly the epoch's first 1,280 ...
        assert set(range(N_TRAIN)) - set(union) == set(order[KEPT:])  # ... and only its tail of 158 dropped
    first_batches = [ids for e, index, ids in ranks[0]["batches"] if index == 0]
    assert first_batches[0] != first_batches[1]  # each epoch has its own order
    wait_until(lambda: not daemon.status()["streams"], 15, what="every rank's stream to detach")


def test_ddp_scale_tool_compares_rank_counts_on_one_daemon(daemon):
    proc = run_python("tools/ddp_scale.py", "--address", daemon.address, "--ranks", "1", "2", "--rounds", "1", "--epochs", "2",
               "--dataset", "digits", "--pipeline", "lenet5", "--json")  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = result["rows"]
    assert (one["ranks"], one["images_per_epoch"], one["steps_per_rank"]) == (1, N_TRAIN, [23])  # one rank: no drop_last, 22 full + 30
    assert (two["ranks"], two["images_per_epoch"], two["steps_per_rank"]) == (2, 2 * 11 * BATCH, [11, 11])  # 719 per rank → 11 full batches
    assert one["images_per_s"] > 0 and two["images_per_s"] > 0 and one["vs_first"] == 1.0
    assert two["vs_first"] == pytest.approx(two["images_per_s"] / one["images_per_s"], rel=2e-3)
    assert two["per_rank_images_per_s"] == pytest.approx(two["images_per_s"] / 2, abs=0.1)
    assert result["workers"] is None and result["conditions"]["cores"] >= 1  # an existing daemon: its workers are its own
