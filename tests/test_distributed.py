"""Two CPU processes (torchrun, gloo) train exactly as one process does on the same data."""

import subprocess
import sys
import textwrap

import torch

from feedbackcam.data.dataset import FeedbackBatch
from feedbackcam.distributed import SINGLE, Dist, local_batch_size, shard_order
from feedbackcam.models import build_model
from feedbackcam.objective import FeedbackConfig
from feedbackcam.train import feedback_step

N, SIZE, BATCH, EPOCHS, SEED = 32, 32, 8, 2, 3


def make_data():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(N, SIZE, SIZE, dtype=torch.uint8)
    for i in range(N):
        y, x = torch.randint(0, SIZE // 2, (2,), generator=g).tolist()
        masks[i, y : y + SIZE // 2, x : x + SIZE // 2] = 1
    images = torch.randint(0, 256, (N, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (N,), generator=g)
    return images, masks, labels


def make_model():
    torch.manual_seed(0)
    return build_model("small_cnn", 3, width=8)


CFG = FeedbackConfig.thesis(lam=0.5, second_order="full")

WORKER = textwrap.dedent(
    f"""
    import sys, torch
    from feedbackcam.data.dataset import TensorData
    from feedbackcam.distributed import init_from_env, wrap
    from feedbackcam.train import train_one_epoch
    sys.path.insert(0, {{tests!r}})
    from test_distributed import CFG, make_data, make_model

    def main():  # the DDP wrapper is released when it returns, as in the library's code paths
        ctx, device = init_from_env("cpu")
        images, masks, labels = make_data()
        data = TensorData(images, masks, labels, torch.ones(len(labels), dtype=torch.bool))
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ddp = wrap(model, ctx)
        for epoch in range({EPOCHS}):
            stats = train_one_epoch(ddp, data, torch.arange(len(labels)).numpy(), opt, CFG,
                                batch_size={BATCH}, generator=None, ctx=ctx, epoch=epoch,
                                seed={SEED})
        if ctx.is_main:
            torch.save({{"state": model.state_dict(), "loss": stats["train_loss"]}}, sys.argv[1])

    main()
    """
)


def test_two_gloo_processes_match_single_process_training(tmp_path):
    script = tmp_path / "worker.py"
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    script.write_text(WORKER.replace("{tests!r}", repr(tests_dir)))
    out = tmp_path / "ddp.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the failing rank's traceback comes before torchrun's summary: show both
    assert proc.returncode == 0, proc.stderr[-12000:]
    ddp = torch.load(out, weights_only=True)

    # one process, the same global batches: DistributedSampler's shuffle, interleaved by rank
    images, masks, labels = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    two = Dist(rank=0, world_size=2)
    for epoch in range(EPOCHS):
        shares = [shard_order(N, epoch=epoch, seed=SEED, ctx=Dist(r, 2)) for r in range(2)]
        local = local_batch_size(BATCH, two)
        for start in range(0, N // 2, local):
            idx = torch.cat([s[start : start + local] for s in shares])
            batch = FeedbackBatch(
                images[idx].permute(0, 3, 1, 2).float() / 255,
                labels[idx],
                masks[idx].float(),
                torch.ones(len(idx), dtype=torch.bool),
            )
            feedback_step(model, batch, opt, CFG)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert any(
        not torch.equal(value, make_model().state_dict()[name])
        for name, value in model.state_dict().items()
    )


def test_shards_partition_the_epoch_and_single_process_is_unsharded():
    shares = [shard_order(10, epoch=1, seed=0, ctx=Dist(r, 2)) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == list(range(10))
    assert local_batch_size(8, SINGLE) == 8


def test_teardown_releases_a_ddp_wrapper_left_in_a_reference_cycle(tmp_path):
    """A DDP wrapper kept alive by a reference cycle holds the gloo group past
    destroy_process_group; torn down at interpreter exit, it aborted a rank now and then. The
    exit handler collects such cycles before destroying the group (automatic collection is off
    here, so only the handler can free it)."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from feedbackcam.distributed import _destroy

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    gc.disable()
    try:
        ddp = DistributedDataParallel(make_model())
        ddp.__dict__["cycle"] = [ddp]
        alive = weakref.ref(ddp)
        del ddp
        _destroy()
        assert alive() is None and not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
