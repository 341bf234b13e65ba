"""TPP under torchrun on the CPU (gloo): frame-for-frame equal to the sequential engine, and fault handling."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
COMMON = ["max_seconds=1.2", "output.frames=true"]


def infer(*args, nproc=None, env=None, timeout=240):
    cmd = (TORCHRUN + [f"--nproc_per_node={nproc}"] if nproc else [sys.executable]) + [str(ROOT / "infer.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sequential_frames(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    ran = {}

    def frames(steps):
        if steps not in ran:
            r = infer(f"output.path={out}/{len(steps)}.mp4", f"denoise.steps={steps}", "engine=sequential", *COMMON)
            assert r.returncode == 0, r.stderr
            ran[steps] = np.load(out / f"{len(steps)}.frames.npy")
        return ran[steps]

    return frames


@pytest.mark.parametrize(
    "steps,nproc,extra",
    [("[1000,750,500]", 4, []), ("[1000,750,500,250]", 4, ["engine.decode_on_last=true"])],
    ids=["3 steps + decode rank", "4 steps, decode on the last rank"],
)
def test_tpp_equals_sequential(tmp_path, sequential_frames, steps, nproc, extra):
    r = infer("engine=tpp", f"output.path={tmp_path}/tpp.mp4", f"denoise.steps={steps}", *COMMON, *extra, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "tpp.frames.npy")
    np.testing.assert_array_equal(got, sequential_frames(steps))
    assert "wait share" in r.stdout and "bottleneck: rank" in r.stdout
    assert "time to first frame" in r.stdout


def test_tpp_rank_count_mismatch_is_one_line(tmp_path):
    r = infer("engine=tpp", f"output.path={tmp_path}/x.mp4", *COMMON, nproc=3)
    assert r.returncode != 0
    assert "engine=tpp with 4 steps needs 5 ranks" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_a_failing_rank_stops_every_rank_with_its_name(tmp_path):
    start = time.perf_counter()
    r = infer("engine=tpp", f"output.path={tmp_path}/x.mp4", "denoise.steps=[1000,500]", "max_seconds=4",
              "engine.fault_poll_s=0.2", nproc=3, env={"LIVEAVATAR_TPP_FAIL": "1:3"}, timeout=120)
    elapsed = time.perf_counter() - start
    assert r.returncode != 0
    assert "rank 1: RuntimeError: injected fault at block 3" in r.stderr
    assert elapsed < 60
    assert not (tmp_path / "x.mp4").exists() and not list(tmp_path.glob(".*partial*"))


def test_engine_tpp_outside_torchrun_says_how_to_launch(tmp_path):
    r = infer("engine=tpp", f"output.path={tmp_path}/x.mp4")
    assert r.returncode == 2 and "runs under torchrun" in r.stderr


def idle_run(tmp_path, heartbeat_s):
    cmd = TORCHRUN + ["--nproc_per_node=3", str(ROOT / "tests" / "tpp_idle_worker.py"), str(tmp_path / "out.pt"),
                      str(heartbeat_s), "3.0"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_live_audio_with_a_long_pause_does_not_trip_the_timeout(tmp_path):
    """The source pauses 3 s; the process-group timeout is 1.5 s. Heartbeats every 0.3 s keep it alive, and the
    result equals the sequential engine on the same audio."""
    import torch

    r = idle_run(tmp_path, 0.3)
    assert r.returncode == 0, r.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["got"].shape == (1, 4, 8, 4, 4)
    torch.testing.assert_close(result["got"], result["expected"], rtol=1e-5, atol=1e-6)


def test_without_heartbeats_the_same_pause_trips_the_timeout(tmp_path):
    r = idle_run(tmp_path, 100.0)
    assert r.returncode != 0


def test_a_killed_rank_stops_the_run_in_bounded_time(tmp_path):
    start = time.perf_counter()
    r = infer("engine=tpp", f"output.path={tmp_path}/x.mp4", "denoise.steps=[1000,500]", "max_seconds=4",
              "engine.fault_poll_s=0.2", nproc=3, env={"LIVEAVATAR_TPP_FAIL": "1:3:kill"}, timeout=120)
    assert r.returncode != 0
    assert time.perf_counter() - start < 60
    # torchrun names the rank that died; the survivors leave no output under the final name.
    assert "rank      : 1" in r.stderr and "Signal 9" in r.stderr
    assert not (tmp_path / "x.mp4").exists()
