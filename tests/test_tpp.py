"""TPP under torchrun on the CPU (gloo): frame-for-frame equal to the sequential engine, and fault handling.

The engine comparisons stream ``tiny_checkpoint`` (conftest), a model with random non-zero weights: the
untrained preset predicts a zero velocity, and engines that agree on it agree only on their noise.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from liveavatar.inference import run

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
COMMON = ["max_seconds=1.2", "output.frames=true"]
TWO_STEPS = "denoise.steps=[1000,500]"  # the cheapest pipeline: 2 DiT ranks + the decoding rank


def infer(*args, nproc=None, env=None, timeout=240):
    cmd = (TORCHRUN + [f"--nproc_per_node={nproc}"] if nproc else [sys.executable]) + [str(ROOT / "infer.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sequential_frames(tmp_path_factory, tiny_checkpoint):
    """The sequential engine's uint8 frames ``[T, 3, H, W]`` for some overrides (run in this process, once each)."""
    out = tmp_path_factory.mktemp("seq")
    ran = {}

    def frames(*overrides):
        if overrides not in ran:
            path = out / f"{len(ran)}.mp4"
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("infer", [f"image={ROOT}/data/example/reference.png",
                                        f"audio={ROOT}/data/example/speech.wav", f"checkpoint={tiny_checkpoint}",
                                        f"output.path={path}", "output.frames=true", "engine=sequential",
                                        *overrides])
            # One thread, as every TPP rank runs (engine.threads_per_rank): CPU kernels split reductions by thread
            # count, and the comparison is exact.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                run(cfg)
            finally:
                torch.set_num_threads(threads)
            ran[overrides] = np.load(path.with_suffix(".frames.npy"))
        return ran[overrides]

    return frames


def tpp_frames(tmp_path, checkpoint, *overrides, nproc=3, timeout_s=60):
    """Run engine=tpp under torchrun; return the process result and its uint8 frames. A process-group timeout
    well below the default makes a rank that waits forever fail the test instead of hanging it."""
    r = infer("engine=tpp", f"checkpoint={checkpoint}", f"output.path={tmp_path}/tpp.mp4", "output.frames=true",
              f"engine.timeout_s={timeout_s}", *overrides, nproc=nproc, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, np.load(tmp_path / "tpp.frames.npy")


@pytest.mark.distributed
@pytest.mark.parametrize(
    "steps,nproc,extra",
    [("[1000,750,500]", 4, []), ("[1000,750,500,250]", 4, ["engine.decode_on_last=true"])],
    ids=["3 steps + decode rank", "4 steps, decode on the last rank"],
)
def test_tpp_equals_sequential(tmp_path, tiny_checkpoint, sequential_frames, steps, nproc, extra):
    r, got = tpp_frames(tmp_path, tiny_checkpoint, f"denoise.steps={steps}", "max_seconds=1.2", *extra,
                        nproc=nproc)
    np.testing.assert_array_equal(got, sequential_frames(f"denoise.steps={steps}", "max_seconds=1.2"))
    assert "wait share" in r.stdout and "bottleneck: rank" in r.stdout
    assert "time to first frame" in r.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("max_seconds,blocks,frames", [(0.08, 1, 2), (0.2, 2, 5), (0.36, 3, 9)],
                         ids=["1 block", "2 blocks", "3 blocks"])
def test_tpp_ends_cleanly_on_streams_of_up_to_steps_plus_one_blocks(tmp_path, tiny_checkpoint, sequential_frames,
                                                                    max_seconds, blocks, frames):
    """With 2 steps the AAS sink switches at block 2: every rank but the last must still take block 0's clean
    latents from the last rank when the stream ends sooner, or the last rank waits on its send until the
    process-group timeout. A block is 3 frames (0.12 s); the last one is cut to the audio."""
    r, got = tpp_frames(tmp_path, tiny_checkpoint, TWO_STEPS, f"max_seconds={max_seconds}", "engine.sink=aas",
                        timeout_s=30)
    assert f"({frames} frames" in r.stdout and got.shape[0] == frames
    decode_row = next(line.split() for line in r.stdout.splitlines() if line.split()[:2] == ["2", "decode"])
    assert decode_row[2] == str(blocks)  # blocks the decoding rank received
    np.testing.assert_array_equal(got, sequential_frames(TWO_STEPS, f"max_seconds={max_seconds}"))


SINKS = {
    "none": ["engine.sink=none"],
    "reference": ["engine.sink=reference"],
    "reference + first block": ["engine.sink=reference", "engine.keep_first_block=true"],
    "aas": ["engine.sink=aas"],
    "evicted": ["engine.sink=evicted"],   # the reference leaves at block 1 (window 1), no block-0 handover
}


@pytest.mark.distributed
@pytest.mark.parametrize("sink", list(SINKS))
def test_tpp_equals_sequential_past_the_window_with_each_sink(tmp_path, tiny_checkpoint, sequential_frames, sink):
    """5 blocks through a 1-block history window: blocks leave the cache from block 2 on, while the sink stays."""
    overrides = [TWO_STEPS, "max_seconds=0.6", "model.window_blocks=1", *SINKS[sink]]
    _, got = tpp_frames(tmp_path, tiny_checkpoint, *overrides)
    expected = sequential_frames(*overrides)
    assert got.shape[0] == 15
    np.testing.assert_array_equal(got, expected)
    # Not a comparison of noise alone: the model attends to its sink, so another sink gives other frames.
    other = SINKS["aas" if sink == "none" else "none"]
    assert not np.array_equal(expected, sequential_frames(*overrides[:3], *other))


@pytest.mark.distributed
def test_tpp_rank_count_mismatch_is_one_line(tmp_path):
    r = infer("engine=tpp", f"output.path={tmp_path}/x.mp4", *COMMON, nproc=3)
    assert r.returncode != 0
    assert "engine=tpp with 4 steps needs 5 ranks" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.distributed
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


@pytest.mark.distributed
def test_live_audio_with_a_long_pause_does_not_trip_the_timeout(tmp_path):
    """The source pauses 3 s; the process-group timeout is 1.5 s. Heartbeats every 0.3 s keep it alive, and the
    result equals the sequential engine on the same audio."""
    r = idle_run(tmp_path, 0.3)
    assert r.returncode == 0, r.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["got"].shape == (1, 4, 8, 4, 4)
    torch.testing.assert_close(result["got"], result["expected"], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_without_heartbeats_the_same_pause_trips_the_timeout(tmp_path):
    r = idle_run(tmp_path, 100.0)
    assert r.returncode != 0


@pytest.mark.distributed
def test_a_killed_rank_stops_the_run_in_bounded_time(tmp_path):
    start = time.perf_counter()
    r = infer("engine=tpp", f"output.path={tmp_path}/x.mp4", "denoise.steps=[1000,500]", "max_seconds=4",
              "engine.fault_poll_s=0.2", nproc=3, env={"LIVEAVATAR_TPP_FAIL": "1:3:kill"}, timeout=120)
    assert r.returncode != 0
    assert time.perf_counter() - start < 60
    # torchrun names the rank that died; the survivors leave no output under the final name.
    assert "rank      : 1" in r.stderr and "Signal 9" in r.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.distributed
def test_tpp_takes_precomputed_prompt_embeddings(tmp_path, tiny_checkpoint, sequential_frames):
    """``prompt_embedding=FILE`` is read as embeddings on every rank (not encoded as text), as the sequential engine
    reads it."""
    from conftest import tiny_preset

    embedding = tmp_path / "prompt.pt"
    torch.save(torch.randn(1, 7, tiny_preset().text_dim, generator=torch.Generator().manual_seed(4)), embedding)
    overrides = (TWO_STEPS, "max_seconds=0.36", f"prompt_embedding={embedding}")
    _, got = tpp_frames(tmp_path, tiny_checkpoint, *overrides)
    np.testing.assert_array_equal(got, sequential_frames(*overrides))
    assert (got != sequential_frames(TWO_STEPS, "max_seconds=0.36")).any()  # the embeddings change the video
