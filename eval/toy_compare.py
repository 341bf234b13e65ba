"""Trained vs untrained on the toy world: ``python eval/toy_compare.py checkpoint=outputs/train/toy_df/model``.

Streams held-out toy clips with the engine for the trained checkpoint and for the same model freshly
initialised, scores lip sync and identity (``liveavatar.metrics.toy``, exact because the renderer is known),
and writes to ``out``: ``report.json`` ({"trained": {...}, "untrained": {...}, "ground_truth": {...}}), a plot
of identity error over time, and an mp4 of the trained model's first clip. Configuration:
``conf/toy_compare.yaml``.
"""
import sys

import hydra
from omegaconf import DictConfig

from liveavatar.cli import check_group_choices, fail


@hydra.main(config_path="../conf", config_name="toy_compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from liveavatar.evaluation.toy_compare import CompareError, compare

    try:
        report = compare(cfg)
    except CompareError as err:
        fail(str(err))
    print(report)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("model", "engine"))
    main()
