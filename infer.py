"""Stream an audio-driven avatar video: ``python infer.py checkpoint=PATH image=ref.png audio=speech.wav``.

Configuration: ``conf/infer.yaml`` (Hydra overrides on the command line). The logic is in
``liveavatar.inference``.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parent / "conf"


def check_group_choices(argv: list[str]) -> None:
    """Name an unknown preset or engine in one line before Hydra composes (its own message is longer)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("model", "engine") and value and not (CONF / key / f"{value}.yaml").is_file():
            known = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
            print(f"error: {key}={value}: unknown; choose one of {', '.join(known)}", file=sys.stderr)
            sys.exit(2)


@hydra.main(config_path="conf", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from liveavatar.engine.tpp import PeerFailure
    from liveavatar.inference import UserError, run

    try:
        report = run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except PeerFailure as err:
        print(f"error: tpp stopped: {err}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        sys.exit(130)
    if report is not None:  # TPP: only the output rank has a report
        print(report.summary())
        if cfg.output.report:
            report.save(cfg.output.report)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
