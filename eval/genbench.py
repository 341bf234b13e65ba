"""GenBench: ``python eval/genbench.py checkpoint=PATH bench=toy [engine=...] [out=FOLDER]``.

Streams every case of a suite (``toy``, ``toy_long`` or a manifest) through the pipeline, writes the videos and
scores each case over the whole video and over time windows; writes ``results.json``, ``report.md`` and
``report.html`` to ``out``. The same command again skips finished cases. With ``-m`` (several settings) each job
gets a sub-folder and the sweep ends with one comparison table. Configuration: ``conf/genbench.yaml``; the logic
is in ``liveavatar.evaluation`` (``genbench``, ``suites``, ``scoring``, ``genbench_report``).

TPP: ``torchrun --nproc_per_node=N+1 eval/genbench.py engine=tpp ...``: every rank takes every case; the output
rank writes and scores.
"""
import sys
import traceback

import hydra
from omegaconf import DictConfig, open_dict

from liveavatar.cli import check_group_choices, fail


@hydra.main(config_path="../conf", config_name="genbench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from liveavatar.components import UserError
    from liveavatar.engine.tpp import GroupFailure, RankFailure
    from liveavatar.evaluation.genbench import GenBenchError, run_genbench
    from liveavatar.evaluation.genbench_report import md_table
    from liveavatar.models.checkpoint import CheckpointError

    hc = HydraConfig.get()
    with open_dict(cfg):
        cfg.out = hc.runtime.output_dir
        cfg.label_overrides = [o for o in hc.overrides.task if not o.split("=")[0] in ("out", "progress", "cases")]
    try:
        results = run_genbench(cfg)
    except (GenBenchError, UserError, CheckpointError) as err:
        fail(str(err))
    except GroupFailure as err:
        if isinstance(err, RankFailure):
            traceback.print_exception(err.__cause__)
        fail(f"tpp stopped: {err} (finished cases are kept; the same command continues)", 3)
    except KeyboardInterrupt:
        fail("interrupted: finished cases are kept; the same command continues", 130)
    if results is None:  # a TPP rank that does not output
        return
    print(md_table({results["suite"]: {**results["whole"], **results["timing"]}}))
    print(f"{results['cases']} cases scored, {len(results['failed'])} failed; report: {cfg.out}/report.html")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("model", "engine"))
    main()
