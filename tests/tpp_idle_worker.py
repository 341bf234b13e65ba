"""Run by tests/test_tpp.py under torchrun: a 2-step pipeline + output rank fed by a live audio source that
goes quiet for longer than the process-group timeout. Writes the output rank's latents to argv[1]."""
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from conftest import randomise, tiny_config
from liveavatar.engine import tpp
from liveavatar.engine.stream import EngineSettings, SequentialEngine, StreamCore
from liveavatar.models import AvatarDiT

out_path, heartbeat_s, pause_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", timeout=timedelta(seconds=1.5))
rank = dist.get_rank()
layout = tpp.Layout(steps=2)
torch.manual_seed(0)
model = randomise(AvatarDiT(tiny_config(reference="sink", audio_dim=16, audio_feature_dim=8, audio_blocks=[1])), std=0.1).eval()
settings = EngineSettings(steps=[1000, 500], sink="aas")
context, reference = torch.ones(1, 4, 32) * 0.1, torch.ones(1, 4, 1, 4, 4) * 0.2
g = torch.Generator().manual_seed(5)
blocks = [torch.randn(1, 2, 4, 1, 8, generator=g) for _ in range(4)]


def live_source():
    """Audio that arrives in bursts: a long silence after the second block."""
    for b, features in enumerate(blocks):
        if b == 2:
            time.sleep(pause_s)
        yield features


torch.set_grad_enabled(False)
stats = tpp.RankStats(rank, "x")
channel = tpp.Channel(torch.device("cpu"), stats)
if layout.is_dit(rank):
    core = StreamCore(model, settings, (4, 4, 4), context, reference, lanes=1)
    stage = tpp.DiTStage(core, rank, layout, channel, tpp.StageOptions(heartbeat_s=heartbeat_s))
    for _ in stage.run(tpp.AudioFeed(live_source()) if rank == 0 else None):
        pass
else:
    got = torch.cat([x0 for _, x0 in tpp.receive_blocks(channel, layout.steps - 1)], dim=2)
    reference_core = StreamCore(model, settings, (4, 4, 4), context, reference)
    expected = torch.cat([x0 for _, x0 in SequentialEngine(reference_core).stream(blocks)], dim=2)
    torch.save({"got": got, "expected": expected}, out_path)
channel.flush()
dist.barrier()
dist.destroy_process_group()
