#!/usr/bin/env python
"""Convert a backbone checkpoint (any layout mixup_transfer.core.checkpoint.load_backbone reads).

    python tools/convert.py --to detectron2 runs/x/backbone.pth out/R50.pkl [--arch resnet50]
        -> out/R50.pkl (detectron2 weights)
           + out/voc_resnet50_C4_24k.yaml (bottleneck ResNets only)
           + out/voc_resnet50_FPN_18k.yaml + out/coco_resnet50_FPN_1x.yaml;
           their DATASETS are the toolkit's names, which
           transfer.detection.d2_backend.register_toolkit_datasets("voc" | "coco", root)
           registers
    python tools/convert.py --to torchvision moco_checkpoint.pth.tar out/backbone.pth
        -> {"model": torchvision-keyed backbone state, "meta": {...}}
"""

import json
import sys

from mixup_transfer.core import cli
from mixup_transfer.core.checkpoint import ARCHS, trust_pickled
from transfer.convert import convert_to_detectron2, convert_to_torchvision


@cli.entry
def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--to", choices=("detectron2", "torchvision"), required=True,
                   help="the output layout: detectron2 (.pkl + YAMLs) or torchvision (.pth)")
    p.add_argument("input", help="backbone checkpoint (.pth / .pth.tar)")
    p.add_argument("output", help="OUT.pkl for detectron2, OUT.pth for torchvision")
    p.add_argument("--arch", choices=ARCHS, default=None,
                   help="default: from the checkpoint's meta or its keys")
    p.add_argument("--no-configs", action="store_true", help="detectron2: write the weights only")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoints that need full unpickling (only for files you trust)")
    args = p.parse_args(argv)
    if args.allow_pickle:
        trust_pickled(args.input)
    if args.to == "detectron2":
        written = convert_to_detectron2(args.input, args.output, args.arch, not args.no_configs)
    else:
        path = convert_to_torchvision(args.input, args.output, args.arch)
        written = {"weights": path}
    print(json.dumps({k: str(v) for k, v in written.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
