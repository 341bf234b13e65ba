"""Stream an audio-driven avatar video: ``python infer.py checkpoint=PATH image=ref.png audio=speech.wav``.

Configuration: ``conf/infer.yaml`` (Hydra overrides on the command line). The logic is in
``liveavatar.inference``.
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("infer")


@hydra.main(config_path="conf", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from liveavatar.inference import UserError, run

    try:
        report = run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
    print(report.summary())


if __name__ == "__main__":
    main()
