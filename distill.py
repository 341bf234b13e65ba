"""Distil a streaming few-step student (Stage 2, Self-Forcing DMD): ``python distill.py experiment=toy_dmd``.

Configuration: ``conf/distill.yaml`` plus the groups ``model``, ``data``, ``trainer``, ``logger`` and
``experiment``. The same command started again continues the run from its last checkpoint. The logic is in
``liveavatar.training`` (``dmd.py`` the module, ``dmd_loss.py`` the losses, ``rollout.py`` the rollout).
"""
import sys

import hydra
from omegaconf import DictConfig

from liveavatar.cli import check_group_choices, fail


@hydra.main(config_path="conf", config_name="distill", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from liveavatar.models.checkpoint import CheckpointError
    from liveavatar.training.distill_launch import distill
    from liveavatar.training.dmd import NonFiniteError
    from liveavatar.training.run_folder import RunFolderError

    try:
        done = distill(cfg, Path(HydraConfig.get().runtime.output_dir))
    except NonFiniteError as err:
        fail(str(err), 3)
    except (RunFolderError, CheckpointError, ValueError, ImportError) as err:
        fail(str(err).splitlines()[0] if isinstance(err, RunFolderError) else str(err))
    except KeyboardInterrupt:
        fail("interrupted: the run can be continued with the same command", 130)
    print(f"{done['stage']}: {done['steps']} generator steps in {done['train_seconds']:.0f} s (final generator loss "
          f"{done['final_loss']}); weights: {HydraConfig.get().runtime.output_dir}/model")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("model", "data", "trainer", "logger", "experiment"))
    main()
