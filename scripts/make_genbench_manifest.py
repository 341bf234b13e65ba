"""A GenBench manifest for a folder of reference images and audio files of the same names (and optional ``.txt``
prompts): ``python scripts/make_genbench_manifest.py FOLDER OUT.yaml|OUT.jsonl [--seconds S --loop]``.

GenBench-Short style: one case per image, the audio played once. GenBench-Long style: ``--seconds 420 --loop``
loops each audio to seven minutes. Then: ``python eval/genbench.py checkpoint=... bench=OUT.yaml``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from liveavatar.evaluation.suites import SuiteError, manifest_from_folder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--seconds", type=float, default=None, help="case duration (default: the audio's length)")
    p.add_argument("--loop", action="store_true", help="loop each audio to --seconds")
    p.add_argument("--prompt", default="a person talking to the camera", help="prompt of images without a .txt")
    args = p.parse_args()
    if args.loop and not args.seconds:
        sys.exit("error: --loop needs --seconds")
    try:
        cases = manifest_from_folder(args.folder, args.out, args.seconds, args.loop, args.prompt)
    except SuiteError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {args.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()
