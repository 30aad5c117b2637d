#!/usr/bin/env python
"""Score a COCO box results JSON (pycocotools; faster-coco-eval when installed); prints the 12
stats as JSON.

    python tools/eval_coco.py --annotations instances_val2017.json --results detections.json
"""

import json
import sys

from mixup_transfer.core import cli
from mixup_transfer.core.units import with_units
from transfer.coco_eval import BACKENDS, coco_evaluate


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--annotations", required=True,
                   help="COCO ground-truth JSON (instances_*.json)")
    p.add_argument("--results", required=True,
                   help="results JSON: [{image_id, category_id, bbox, score}]")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: faster-coco-eval when installed, else pycocotools (same numbers)")
    p.add_argument("--per-category", action="store_true", help="also print AP per category")
    args = p.parse_args(argv)
    out = coco_evaluate(args.annotations, args.results, backend=args.backend,
                        per_category=args.per_category)
    print(json.dumps(with_units(out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
