"""--xt-source trajectory: the pool holds ESD's partial-sampling latents, resumes, is reused."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from loreun.cli.main import main

from .conftest import erase_args

TRAJ = ["--xt-source", "trajectory", "--trajectory-pool", "3", "--erase-from", "a bird"]


def test_a_trajectory_keeps_every_stop_of_partial_sampling():
    """pool[:, k] must be what the sampler stops at for stop=k from the same noise: the
    pool then draws from exactly partial-base's x_t distribution."""
    from loreun.pipelines.schedule import schedule_of
    from loreun.pipelines.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(seed=0)
    unet = pipe.unet.eval()

    def eps(x, t, emb):
        return unet(x, t, encoder_hidden_states=emb).sample

    sampler = schedule_of(pipe).sampler(5)
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    cond, uncond = torch.randn(2, 4, dim, generator=g), torch.randn(1, 4, dim, generator=g)
    uncond = uncond.expand(2, -1, -1)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        pool = sampler.trajectory(eps, cond, uncond, noise, 3.0)
        assert pool.shape == (2, 5, 4, 8, 8)
        for k in range(5):
            want = sampler.sample(eps, cond, uncond, noise, 3.0, stop=k)
            assert torch.allclose(pool[:, k], want, atol=1e-6), k


def test_trajectory_batches_draw_items_pool_rows_and_stops():
    from loreun.erase.items import ItemSet
    from loreun.erase.xt_sources import trajectory_batch
    from loreun.pipelines.schedule import schedule_of
    from loreun.pipelines.tiny import make_tiny_pipeline

    ddim = schedule_of(make_tiny_pipeline(seed=0)).sampler(4)
    # pool value = 100 * row + 10 * trajectory + stop, so each draw can be read back
    q, p, k = 2, 3, 4
    idx = torch.arange(q * p * k, dtype=torch.float32).view(q, p, k)
    rows, traj, stop = idx // (p * k), (idx // k) % p, idx % k
    pool = (100 * rows + 10 * traj + stop).view(q, p, k, 1, 1, 1).expand(-1, -1, -1, 1, 2, 2)
    forget = ItemSet(
        cond=torch.zeros(4, 3, 5), uncond=torch.zeros(1, 3, 5), anchor=None,
        pool=pool, pool_of=torch.tensor([0, 0, 1, 1]),
    )  # fmt: skip
    seen = set()
    for s in range(30):
        ids = torch.tensor([0, 3])
        batch = trajectory_batch(forget, ids, torch.Generator().manual_seed(s), ddim, "cpu")
        for item, x, t in zip(ids.tolist(), batch.xt[:, 0, 0, 0].tolist(), batch.t.tolist()):
            row, rest = divmod(int(x), 100)
            assert row == forget.pool_of[item]
            assert t == ddim.timesteps[rest % 10].item()
            seen.add((rest // 10, rest % 10))
        assert batch.target is None
    assert len(seen) == p * k  # every trajectory and stop gets drawn


def test_trajectory_run_resumes_exactly_and_reuses_its_pool(
    tiny_pipeline_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("LOREUN_QUIET", raising=False)  # an earlier in-process `-q` sets it
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TRAJ, "--checkpoint-every", "2", "--batch-size", "2"]
    assert main(erase_args(tiny_pipeline_dir, straight, *common, "--steps", "4")) == 0
    assert "trajectories" in capsys.readouterr().out
    pool_file = straight / "cache" / "forget-trajectories.safetensors"
    pool = load_file(str(pool_file))["x0"]
    assert pool.shape[:3] == (2, 3, 3)  # 2 concepts x 3 trajectories x 3 sample steps
    assert main(erase_args(tiny_pipeline_dir, split, *common, "--steps", "2")) == 0
    argv = erase_args(tiny_pipeline_dir, split, *common, "--steps", "4", "--resume", "latest")
    assert main(argv) == 0
    a, b = (load_file(str(d / "erased.safetensors")) for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a rerun over the same folder samples nothing and trains to the same weights
    stamp = os.stat(pool_file).st_mtime_ns
    capsys.readouterr()
    argv = erase_args(tiny_pipeline_dir, straight, *common, "--steps", "4", "--overwrite")
    assert main(argv) == 0
    assert "trajectories" not in capsys.readouterr().out
    assert os.stat(pool_file).st_mtime_ns == stamp
    c = load_file(str(straight / "erased.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    saved = json.loads((straight / "erase_config.json").read_text())
    assert (saved["xt_source"], saved["trajectory_pool"]) == ("trajectory", 3)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--trajectory-cache-mb", "0"], "--trajectory-cache-mb: must be > 0"),
        (["--trajectory-pool", "0"], "--trajectory-pool: must be > 0"),
        (
            ["--trajectory-pool", "1000", "--trajectory-cache-mb", "1"],
            "--trajectory-pool: 2 prompts x 1000 trajectories x 3 steps take 6 MB",
        ),
        (["--objective", "ga"], "--xt-source: ga trains on forward-noised forget images"),
    ],
)
def test_trajectory_settings_that_cannot_work(tiny_pipeline_dir, tmp_path, capsys, extra, needle):
    argv = erase_args(tiny_pipeline_dir, tmp_path / "o", "--xt-source", "trajectory", *extra)
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars, if any
    assert last.startswith("loreun erase: error: ") and needle in last
    assert not (tmp_path / "o" / "erased.safetensors").exists()
