#!/usr/bin/env python
"""Write the toy world (ImageNet / VOC / COCO / CUB layouts; with --track small or all, also
CIFAR-10/100 and TinyImageNet-200) and print a summary.

python tools/make_toy_data.py --out data/toy --preset demo --seed 0 [--ood 200]
python tools/make_toy_data.py --out data/toy_small --preset demo --track small

--ood N also writes N images per 32 x 32 toy OOD set (LSUN, LSUN_resize, iSUN, Imagenet,
Imagenet_resize shaped, mixup_transfer/toyworld/ood.py) under OUT/ood/.
"""

import sys
import time
from pathlib import Path

from mixup_transfer.core import cli
from mixup_transfer.toyworld import PRESETS, format_summary, make_toy_world
from mixup_transfer.toyworld.world import TRACKS
from wsol.data import cub_to_wsol_metadata


@cli.entry
def main(argv=None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                    help="dataset sizes (default: demo)")
    ap.add_argument("--seed", type=int, default=0,
                    help="random seed (same seed -> identical files)")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: up to 2)")
    ap.add_argument("--track", default="standard", choices=TRACKS,
                    help="standard: ImageNet, VOC, COCO, CUB; small: CIFAR-10/100, "
                         "TinyImageNet; all: both")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--ood", type=int, default=0, metavar="N",
                    help="N images per toy OOD set under OUT/ood")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    summary = make_toy_world(
        args.out, preset=args.preset, seed=args.seed, workers=args.workers,
        progress=not args.no_progress, wsol_metadata=cub_to_wsol_metadata, track=args.track,
    )
    print(format_summary(summary))
    if args.ood > 0:
        from mixup_transfer.toyworld.ood import write_ood_folders

        for name, folder in write_ood_folders(Path(args.out) / "ood", seed=args.seed,
                                              n=args.ood).items():
            print(f"  OOD {name:15s}: {args.ood} images   {folder}")
    print(f"generated in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
