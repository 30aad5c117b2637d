#!/usr/bin/env python
"""Score VOC detection result files (comp4_det_<split>_<class>.txt) with the devkit's rules; prints
JSON.

    python tools/eval_voc.py --devkit data/VOCdevkit --year 2007 --split test --results RESULTS_DIR
"""

import json
import sys

from mixup_transfer.core import cli
from mixup_transfer.core.constants import VOC_CLASSES
from mixup_transfer.core.units import with_units
from transfer.voc_eval import METRICS, evaluate_voc_results


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--devkit", required=True,
                   help="VOCdevkit folder (holding VOC<year>) or VOC<year> itself")
    p.add_argument("--year", default="2007", help="the VOC<year> folder of the devkit (default "
                                                  "2007)")
    p.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    p.add_argument("--results", required=True,
                   help="folder with comp4_det_<split>_<class>.txt files")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="default: 11point for 2007 (the VOC2007 devkit rule), area for later "
                        "years")
    p.add_argument("--iou", type=float, default=0.5,
                   help="IoU a detection must reach to count (default 0.5)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names (default: the 20 VOC classes)")
    args = p.parse_args(argv)
    classes = tuple(args.classes.split(",")) if args.classes else VOC_CLASSES
    out = evaluate_voc_results(args.devkit, args.results, args.year, args.split, args.metric,
                               args.iou, classes)
    print(json.dumps(with_units(out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
