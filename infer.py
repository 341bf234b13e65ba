"""Stream an audio-driven avatar video: ``python infer.py checkpoint=PATH image=ref.png audio=speech.wav``.

Configuration: ``conf/infer.yaml`` (Hydra overrides on the command line). The logic is in
``liveavatar.inference``.
"""
import sys
import traceback

import hydra
from omegaconf import DictConfig

from liveavatar.cli import check_group_choices, fail


@hydra.main(config_path="conf", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from liveavatar.engine.tpp import GroupFailure, RankFailure
    from liveavatar.inference import UserError, run

    try:
        report = run(cfg)
    except UserError as err:
        fail(str(err))
    except GroupFailure as err:
        if isinstance(err, RankFailure):  # this rank's own error: its traceback, then the line every rank prints
            traceback.print_exception(err.__cause__)
        fail(f"tpp stopped: {err}", 3)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
    if report is not None:  # TPP: only the output rank has a report
        print(report.summary())
        if cfg.output.report:
            report.save(cfg.output.report)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("model", "engine"))
    main()
