"""Talk to the avatar from a browser: ``python serve.py [checkpoint=PATH] [engine=stream_batch] [server.port=8000]``.

Prints the URL to open. Configuration: ``conf/serve.yaml`` (Hydra overrides on the command line). The logic is in
``liveavatar.serving``.
"""
import sys

import hydra
from omegaconf import DictConfig

from liveavatar.cli import check_group_choices, fail


@hydra.main(config_path="conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from liveavatar.components import UserError
    from liveavatar.serving.server import GroupStopped, run

    try:
        run(cfg)
    except UserError as err:
        fail(str(err))
    except GroupStopped as err:
        fail(f"tpp stopped: {err}", 3)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("model", "engine"))
    main()
