"""Train a DiT: ``python train.py experiment=toy_teacher`` (Stage 0) or ``experiment=toy_df`` (Stage 1).

Configuration: ``conf/train.yaml`` plus the groups ``model``, ``data``, ``trainer``, ``logger`` and
``experiment`` (Hydra overrides on the command line; ``-m`` sweeps). The same command started again continues
the run from its last checkpoint. The logic is in ``liveavatar.training``.
"""
import sys

import hydra
from omegaconf import DictConfig

from liveavatar.cli import check_group_choices, fail


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from liveavatar.models.checkpoint import CheckpointError
    from liveavatar.training.launch import train
    from liveavatar.training.run_folder import RunFolderError

    try:
        done = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (RunFolderError, CheckpointError, ValueError, ImportError) as err:
        fail(str(err).splitlines()[0] if isinstance(err, RunFolderError) else str(err))
    except KeyboardInterrupt:
        fail("interrupted: the run can be continued with the same command", 130)
    print(f"trained {done['steps']} steps in {done['train_seconds']:.0f} s (final loss {done['final_loss']}); "
          f"weights: {HydraConfig.get().runtime.output_dir}/model")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("model", "data", "trainer", "logger", "experiment"))
    main()
