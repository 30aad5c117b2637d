"""Evaluation protocols of the papers, selectable by name in the robustness stage (``protocol:``).

A protocol fills the options it names that the config leaves at null; a value the config sets wins.
``None`` (the stage's default) keeps the evaluator's own defaults, so earlier configs and outputs
are unchanged.

Sources (papers in /work/shared/papers; public code read for facts where the papers are silent):

- Attack budgets: AlignMix §4.2 (arXiv:2103.15375) "Following the evaluation protocol of (Kim et
  al., 2020), we use 8/255 l_inf eps-ball for FGSM and 4/255 l_inf eps-ball with step size 2/255
  for PGD"; MultiMix §4.2 (arXiv:2311.05538) "We follow the experimental settings of AlignMixup"
  with the same numbers. Same budgets for CIFAR-10/100, TinyImageNet (and ImageNet in AlignMix
  Table 2).
- PGD iterations and random start (papers silent): Kim et al. 2020 = PuzzleMix, snu-mllab/PuzzleMix
  ``checkpoint/test_robust.py`` at 062ccac: ``param_set = [(8, 8, 1, False), (4, 2, 20, True)]``,
  i.e. FGSM eps 8 one step no random start, PGD eps 4 step 2, 20 iterations, uniform random start
  in the eps-ball, every value /255 on ``ToTensor()`` images: [0, 1] pixel space before the
  normalisation, clipped to [0, 1], the projection ``clamp(x0 + clamp(x - x0, -eps, eps), 0, 1)``;
  the same for CIFAR-100 and TinyImageNet.
- Image size: PuzzleMix test_robust.py evaluates CIFAR at its stored 32 x 32 and TinyImageNet
  ``val/images`` at its stored 64 x 64 with no resize or crop (``transforms.ToTensor()`` only):
  ``image_size = resize`` = 32 or 64 makes the evaluator's resize + centre crop the identity on
  such images.
- OOD (CIFAR-100 in-distribution): AlignMix §4.3 "OOD examples are test images from LSUN (crop),
  iSUN and Tiny-ImageNet (crop); where crop denotes that the OOD examples are center-cropped to 32
  x 32", App. C "resizing OOD examples to 32 x 32" (LSUN (resize), TI (resize)); MultiMix Table 9
  follows AlignMix. The released ODIN folders (LSUN, LSUN_resize, iSUN, Imagenet, Imagenet_resize)
  are stored at 32 x 32, where every ``ood_transform`` is the identity; ``crop`` centre-crops
  larger images without resizing, ``resize`` squeezes the whole image to S x S.
- ImageNet: configs/robustness/imagenet.yaml's values (224 centre crop of the 256 short side,
  PuzzleMix imagenet_fast/main_fast.py; 20 PGD iterations as above).
"""

from __future__ import annotations

# the options a protocol sets; None in the stage's DEFAULTS means "the protocol's value"
PROTOCOL_KEYS = ("image_size", "resize", "fgsm_eps", "pgd_eps", "pgd_step", "pgd_iters",
                 "pgd_random_start", "ood_transform")

# what the protocol keys take when no protocol is chosen
EVALUATOR_DEFAULTS = {"image_size": 224, "resize": 256, "fgsm_eps": "8/255", "pgd_eps": "4/255",
                      "pgd_step": "2/255", "pgd_iters": 10, "pgd_random_start": True,
                      "ood_transform": "eval"}

_ATTACKS = {"fgsm_eps": "8/255", "pgd_eps": "4/255", "pgd_step": "2/255", "pgd_iters": 20,
            "pgd_random_start": True}

PROTOCOLS = {
    "cifar": {"image_size": 32, "resize": 32, **_ATTACKS, "ood_transform": "crop"},
    "tinyimagenet": {"image_size": 64, "resize": 64, **_ATTACKS, "ood_transform": "crop"},
    "imagenet": {"image_size": 224, "resize": 256, **_ATTACKS, "ood_transform": "eval"},
}


def protocol_values(name: str | None) -> dict:
    """The option values of protocol ``name`` (None: the evaluator's defaults); ValueError lists
    the names."""
    if name is None:
        return dict(EVALUATOR_DEFAULTS)
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {sorted(PROTOCOLS)} (or null)")
    return dict(PROTOCOLS[name])


def apply_protocol(cfg: dict) -> dict:
    """``cfg`` (validated stage options) with every protocol key left at None filled from
    ``cfg["protocol"]``."""
    values = protocol_values(cfg.get("protocol"))
    return {**cfg, **{k: values[k] for k in PROTOCOL_KEYS if cfg.get(k) is None}}
