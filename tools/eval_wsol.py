#!/usr/bin/env python
"""Score saved CAM score maps like wsolevaluation (MaxBoxAcc / MaxBoxAccV2); prints JSON.

    python tools/eval_wsol.py --metadata data/wsol_metadata/CUB/test --scoremaps SCOREMAP_DIR \
        [--cam-curve-interval 0.001] [--iou-thresholds 30 50 70] \
        [--multi-contour | --largest-contour]

Score maps: <scoremaps>/<image_id>.npy, float in [0, 1], 224 x 224 (GT boxes are rescaled to the
map's size with integer truncation). The JSON's "sweep" says which implementation ran (same
numbers): "numba" (the compiled one-pass sweep, the default), "opencv" (OpenCV once per distinct
mask: numba not installed, or --largest-contour) or "reference" (--reference: the per-threshold
OpenCV loop). Imports neither torch nor model code (it would cost more than the scoring).
"""
import json
import os
import sys

from mixup_transfer.core import cli


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--metadata", required=True,
                   help="metadata folder of one split (image_ids.txt, ...)")
    p.add_argument("--scoremaps", required=True, help="folder of <image_id>.npy score maps")
    p.add_argument("--cam-curve-interval", type=float, default=0.001,
                   help="spacing of the CAM thresholds swept (default 0.001: 1,000 thresholds)")
    p.add_argument("--iou-thresholds", type=int, nargs="+", default=[30, 50, 70],
                   help="IoU thresholds in percent (default 30 50 70: MaxBoxAccV2)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--multi-contour", dest="multi_contour", action="store_true", default=True,
                   help="a box around every contour of the thresholded map (MaxBoxAccV2; the "
                        "default)")
    g.add_argument("--largest-contour", dest="multi_contour", action="store_false",
                   help="one box around the largest contour (MaxBoxAcc, reported as "
                        "maxboxacc_v1 at IoU 50)")
    p.add_argument("--reference", action="store_true", help="use the slow per-threshold loop")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads scoring maps (default: the CPU cores, at most 8; same numbers)")
    args = p.parse_args(argv)
    from mixup_transfer.core.basics import progress
    from wsol.metrics import HAVE_NUMBA
    from wsol.scoremaps import score_scoremap_dir

    res = score_scoremap_dir(args.metadata, args.scoremaps, args.cam_curve_interval,
                             args.iou_thresholds, args.multi_contour,
                             "reference" if args.reference else "fast", progress=progress,
                             workers=args.workers)
    if res["sweep"] == "opencv" and not HAVE_NUMBA:
        print("note: numba is not installed, so the OpenCV sweep ran (2-6x slower, same numbers); "
              "pip install numba", file=sys.stderr)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
