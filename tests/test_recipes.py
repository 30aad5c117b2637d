"""The real-data recipes equal the papers: every paper-stated value, with its citation, against the
resolved configs (``_BASE_`` chain + the config family's DEFAULTS), so that an edit departing from
a paper fails here.

Papers: MultiMix = Venkataramanan et al., NeurIPS 2023 (arXiv:2311.05538); AlignMix = CVPR 2022
(arXiv:2103.15375); multi-mix = Shen et al. (arXiv:2406.01417). "source" rows are values the papers
leave open, taken from the public script the config header names (they guard the choice, not a
paper statement).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from mixup_transfer.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# (config file, dotted key (list indices as numbers), value, citation)
RECIPES = [
    # ---------------------------------------------------------------- ImageNet pretraining, common
    ("pretrain/_base_imagenet.yaml", "model.arch", "resnet50", "MultiMix A.1 / AlignMix B: R-50"),
    ("pretrain/_base_imagenet.yaml", "optim.epochs", 300, "AlignMix B: SGD for 300 epochs"),
    ("pretrain/_base_imagenet.yaml", "optim.lr", 0.1, "MultiMix A.1: initial learning rate 0.1"),
    ("pretrain/_base_imagenet.yaml", "optim.momentum", 0.9,
     "MultiMix A.1 / AlignMix B: momentum 0.9"),
    ("pretrain/_base_imagenet.yaml", "optim.weight_decay", 1e-4,
     "MultiMix A.1 / AlignMix B: wd 0.0001"),
    ("pretrain/_base_imagenet.yaml", "optim.schedule", "step",
     "MultiMix A.1 / AlignMix B: decay by 0.1"),
    ("pretrain/_base_imagenet.yaml", "optim.milestones", [100, 200],
     "MultiMix A.1 / AlignMix B: at 100 and 200"),
    ("pretrain/_base_imagenet.yaml", "optim.gamma", 0.1, "MultiMix A.1 / AlignMix B: by 0.1"),
    ("pretrain/_base_imagenet.yaml", "optim.nesterov", True,
     "source: PuzzleMix-300 / AlignMix code nesterov=True"),
    ("pretrain/_base_imagenet.yaml", "data.color_jitter", 0.4,
     "source: PuzzleMix-300 / AlignMix code ColorJitter 0.4"),
    ("pretrain/_base_imagenet.yaml", "data.lighting", 0.1,
     "source: PuzzleMix-300 / AlignMix code Lighting 0.1"),
    ("pretrain/_base_imagenet.yaml", "data.crop_size", 224, "source: RandomResizedCrop(224)"),
    ("pretrain/_base_imagenet.yaml", "data.val_resize", 256,
     "source: Resize(256) + CenterCrop(224)"),
    # ---------------------------------------------------------------- ImageNet ViT-S/16 (MultiMix
    # Table 3, A.1)
    ("pretrain/imagenet_vit_s16_erm.yaml", "model.arch", "vit_small_patch16_224",
     "MultiMix §4.1 / Table 3: ViT-S/16"),
    ("pretrain/imagenet_vit_s16_erm.yaml", "optim.optimizer", "adamw",
     "MultiMix A.1: ViT-S/16 using AdamW"),
    ("pretrain/imagenet_vit_s16_erm.yaml", "optim.lr", 0.01,
     "MultiMix A.1: initial learning rate 0.01 (ViT-S/16)"),
    ("pretrain/imagenet_vit_s16_erm.yaml", "optim.weight_decay", 0.01,
     "MultiMix A.1: AdamW default parameters"),
    ("pretrain/imagenet_vit_s16_erm.yaml", "optim.milestones", [100, 200],
     "MultiMix A.1: decay by 0.1 at 100, 200"),
    ("pretrain/imagenet_vit_s16_erm.yaml", "optim.batch_per_process", 128,
     "MultiMix A.1: b = 128 per GPU"),
    ("pretrain/imagenet_vit_s16_multimix.yaml", "method.n", 1000, "MultiMix A.1: n = 1000"),
    ("pretrain/imagenet_vit_s16_multimix.yaml", "method.layer", 5,
     "MultiMix A.1: the embedding (class token)"),
    ("pretrain/imagenet_vit_s16_multimix.yaml", "method.prob", 0.5,
     "MultiMix A.1: MultiMix with probability 0.5"),
    ("pretrain/imagenet_vit_s16_dense_multimix.yaml", "method.attention", "gap_l1relu",
     "MultiMix A.1: GAP, l1 o relu"),
    ("pretrain/imagenet_vit_s16_dense_multimix.yaml", "method.resolution", None,
     "MultiMix §3.3: the loss densely over all tokens/patches"),
    ("pretrain/imagenet_vit_s16_transmix.yaml", "method.mixup_alpha", 0.8,
     "source: TransMix deit_s_transmix.yaml"),
    ("pretrain/imagenet_vit_s16_transmix.yaml", "method.cutmix_alpha", 1.0,
     "source: TransMix deit_s_transmix.yaml"),
    ("pretrain/imagenet_vit_s16_transmix.yaml", "method.switch_prob", 0.5,
     "source: TransMix train.py default"),
    ("pretrain/imagenet_vit_s16_transmix.yaml", "method.smoothing", 0.1,
     "source: TransMix train.py --smoothing"),
    # TokenMix: MultiMix Table 3 row, §4.2 "with our settings"; knobs: Sense-X/TokenMix at 0e17d5d
    *[("pretrain/imagenet_vit_s16_tokenmix.yaml", key, value, cite) for key, value, cite in (
        ("optim.optimizer", "adamw", "MultiMix A.1: ViT-S/16 using AdamW (not the official "
                                     "run.sh)"),
        ("optim.lr", 0.01, "MultiMix A.1: initial learning rate 0.01 (ViT-S/16)"),
        ("optim.milestones", [100, 200], "MultiMix A.1: decay by 0.1 at 100, 200"),
        ("optim.batch_per_process", 128, "MultiMix A.1: b = 128 per GPU"),
        ("teacher", None, "given at run time (--teacher); the activation labels read it"),
        ("method.name", "tokenmix", "MultiMix Table 3: TokenMix"),
        ("method.mixup_alpha", 0.8, "source: TokenMix run.sh --mixup 0.8"),
        ("method.cutmix_alpha", 1.0, "source: TokenMix run.sh --cutmix 1.0"),
        ("method.prob", 1.0, "source: TokenMix main.py --mixup-prob default"),
        ("method.switch_prob", 0.5, "source: TokenMix main.py --mixup-switch-prob default"),
        ("method.mask_type", "block", "source: TokenMix main.py --mask-type default"),
        ("method.mask_ratio", 0.5, "source: TokenMix tokenmix.py Mixup lam_constant = 0.5"),
        ("method.minimum_tokens", 14, "source: TokenMix tokenmix.py Mixup minimum_tokens=14"),
        ("method.patch_size", 16, "source: TokenMix generate_mask 14 x 14 tokens on 224 px"),
        ("method.labels", "activation", "source: TokenMix Mixup.__call__ label maps"),
        ("method.smoothing", 0.1, "source: TokenMix main.py --smoothing default"),
        ("method.loss", "bce", "source: TokenMix run.sh --use-bce"),
    )],
    # ---------------------------------------------------------------- AlignMix ImageNet, paper
    # variant (App. B)
    ("pretrain/imagenet_alignmix_stage2.yaml", "optim.batch_size", 100,
     "AlignMix B: batch size of 100 on 4 GPUs"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "optim.batch_per_process", None,
     "AlignMix B: the batch is global"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "optim.lr_classifier", 0.1,
     "AlignMix B: classifier 0.1"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "optim.lr", 0.01,
     "AlignMix B: the remaining layers 0.01"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "optim.milestones", [100, 200],
     "AlignMix B: decay at 100 and 200"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "optim.epochs", 300, "AlignMix B: 300 epochs"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "method.name", "alignmix_stage2",
     "AlignMix §4.1: stage-2 encoder"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "method.alpha", 2.0, "AlignMix B: alpha = 2.0"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "method.eps", 0.1, "AlignMix B: eps = 0.1"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "method.n_iters", 100,
     "AlignMix B: 100 Sinkhorn iterations"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "method.resolution", 4,
     "AlignMix §4.1: A is c x 4 x 4"),
    ("pretrain/imagenet_alignmix_stage2.yaml", "method.modes",
     ["input", "feat", "feat_rev", "embedding"],
     "AlignMix §4.1 Training: x, A (12), A (13) or e uniformly"),
    # ---------------------------------------------------------------- AlignMix, the authors'
    # released commands shashankvkt/AlignMixup_CVPR22 at ec01a68: README commands +
    # {cifar10_100,tiny_imgnet,imagenet}/main.py defaults
    *[(f"pretrain/{t}_alignmix.yaml", key, value, cite)
      for t in ("cifar10", "cifar100", "tinyimagenet", "imagenet")
      for key, value, cite in (
          ("method.name", "alignmix", "the released code's variant"),
          ("method.alpha", 2.0, "README: --alpha 2.0"),
          ("method.eps", 0.1, "mixup_aligned: SinkhornDistance(eps=0.1)"),
          ("method.n_iters", 100, "mixup_aligned: max_iter=100"),
          ("method.tol", 0.1, "utils/OT.py: thresh = 1e-1"),
          ("optim.lr", 0.1, "main.py: --lr_ default 0.1"),
          ("optim.lr_classifier", None, "main.py: optim.SGD(model.parameters()): one group"),
          ("optim.momentum", 0.9, "main.py: --momentum default 0.9"),
          ("optim.weight_decay", 1e-4, "main.py: --decay default 1e-4"),
          ("optim.gamma", 0.1, "main.py: lr x 0.1 at each milestone"),
          ("optim.warmup_epochs", 0, "main.py: no warm-up"))],
    *[(f"pretrain/{t}_alignmix.yaml", key, value, cite)
      for t in ("cifar10", "cifar100", "tinyimagenet")
      for key, value, cite in (
          ("model.arch", "preactresnet18_alignmixup",
           "resnet.py: ResNet18(): BN-ReLU stem, pre-act shortcuts"),
          ("seed", 8492, "README: --manualSeed 8492"),
          ("optim.nesterov", False, "main.py: optim.SGD without nesterov"),
          ("data.padding", 4, "main.py: RandomCrop(size, padding=4)"),
          ("data.hflip", True, "main.py: RandomHorizontalFlip"))],
    *[(f"pretrain/{t}_alignmix.yaml", key, value, cite) for t in ("cifar10", "cifar100")
      for key, value, cite in (
          ("optim.batch_size", 128, "cifar10_100/main.py: --batch_size default 128"),
          ("optim.epochs", 2000, "README: --epochs 2000"),
          ("optim.milestones", [500, 1000, 1500], "cifar10_100/main.py: --schedule default"),
          ("data.crop_size", 32, "cifar10_100/main.py: RandomCrop(32, padding=4)"))],
    ("pretrain/cifar10_alignmix.yaml", "data.dataset", "cifar10", "README: --dataset cifar10"),
    ("pretrain/cifar100_alignmix.yaml", "data.dataset", "cifar100", "README: --dataset cifar100"),
    ("pretrain/tinyimagenet_alignmix.yaml", "optim.batch_size", 256,
     "tiny_imgnet/main.py: --batch_size default 256"),
    ("pretrain/tinyimagenet_alignmix.yaml", "optim.epochs", 1200, "README: --epochs 1200"),
    ("pretrain/tinyimagenet_alignmix.yaml", "optim.milestones", [600, 900],
     "tiny_imgnet/main.py: --schedule"),
    ("pretrain/tinyimagenet_alignmix.yaml", "data.crop_size", 64,
     "tiny_imgnet/main.py: RandomCrop(64, padding=4)"),
    ("pretrain/imagenet_alignmix.yaml", "model.arch", "resnet50",
     "imagenet/models/resnet50_classifier.py: R-50"),
    ("pretrain/imagenet_alignmix.yaml", "optim.batch_size", 1024, "README: --batch_size 1024"),
    ("pretrain/imagenet_alignmix.yaml", "optim.batch_per_process", None,
     "DataParallel: the batch is global"),
    ("pretrain/imagenet_alignmix.yaml", "optim.epochs", 300, "README: --epochs 300"),
    ("pretrain/imagenet_alignmix.yaml", "optim.milestones", [75, 150, 225],
     "imagenet/main.py: 0.1 ** (epoch // 75)"),
    ("pretrain/imagenet_alignmix.yaml", "optim.nesterov", True,
     "imagenet/main.py: SGD(nesterov=True)"),
    ("pretrain/imagenet_alignmix.yaml", "data.color_jitter", 0.4,
     "imagenet/main.py: ColorJitter(0.4, 0.4, 0.4)"),
    ("pretrain/imagenet_alignmix.yaml", "data.lighting", 0.1,
     "imagenet/main.py: Lighting(alphastd=0.1)"),
    ("pretrain/imagenet_alignmix.yaml", "data.crop_size", 224,
     "imagenet/main.py: RandomResizedCrop(224)"),
    ("pretrain/imagenet_alignmix.yaml", "data.val_resize", 256,
     "imagenet/main.py: Resize(256), CenterCrop(224)"),
    # ---------------------------------------------------------------- MultiMix / Dense MultiMix
    # (A.1, §4.1)
    *[(f"pretrain/imagenet_{m}.yaml", key, value, cite) for m in ("multimix", "dense_multimix")
      for key, value, cite in [
          ("optim.batch_size", None, "MultiMix A.1: the batch is stated per GPU"),
          ("optim.batch_per_process", 128, "MultiMix A.1: b = 128, all hyperparameters per GPU"),
          ("optim.lr", 0.1, "MultiMix A.1: lr 0.1"),
          ("optim.lr_classifier", None, "MultiMix A.1: one lr"),
          ("optim.milestones", [100, 200], "MultiMix A.1: decay by 0.1 at 100 and 200 epochs"),
          ("method.n", 1000, "MultiMix A.1: n = 1000 tuples"),
          ("method.m", None, "MultiMix §4.5 / A.1: m = b"),
          ("method.alpha_low", 0.5, "MultiMix A.1: alpha ~ U[0.5, 2.0]"),
          ("method.alpha_high", 2.0, "MultiMix A.1: alpha ~ U[0.5, 2.0]"),
          ("method.prob", 0.5, "MultiMix §4.1: MultiMix with probability 0.5, else input mixup"),
      ]],
    ("pretrain/imagenet_multimix.yaml", "method.layer", 5,
     "MultiMix A.1: interpolate the embedding"),
    ("pretrain/imagenet_dense_multimix.yaml", "method.attention", "gap_l1relu",
     "MultiMix A.1: GAP for u, ReLU + l1 normalisation for h"),
    ("pretrain/imagenet_dense_multimix.yaml", "method.resolution", None,
     "MultiMix A.1: r = 7 x 7 on ImageNet"),
    # ---------------------------------------------------------------- multi-mix ImageNet (§IV-C)
    ("pretrain/imagenet_multi_interp.yaml", "optim.epochs", 100,
     "multi-mix §IV-C: a total of 100 epochs"),
    ("pretrain/imagenet_multi_interp.yaml", "optim.schedule", "piecewise",
     "multi-mix §IV-C: linear ramps"),
    ("pretrain/imagenet_multi_interp.yaml", "optim.lr", 1.0, "points are absolute learning rates"),
    ("pretrain/imagenet_multi_interp.yaml", "optim.points",
     [[0, 0.5], [8, 1.0], [15, 0.125], [15, 0.2], [40, 0.02], [65, 0.002], [90, 0.0002],
      [100, 0.00002]],
     "multi-mix §IV-C: 0.5 -> 1.0 (8) -> 0.125 (15); 0.2 -> 0.02 (40); x0.1 at 65 and 90"),
    ("pretrain/imagenet_multi_interp.yaml", "data.crop_schedule", [[0, 128], [15, 224]],
     "multi-mix §IV-C phases; source: PuzzleMix-fast crop_size 128 / 224 from the 160 / 352 px "
     "copies"),
    ("pretrain/imagenet_multi_interp.yaml", "data.color_jitter", 0.0,
     "multi-mix §IV-C: only random crop and flip"),
    ("pretrain/imagenet_multi_interp.yaml", "data.lighting", 0.0,
     "multi-mix §IV-C: only random crop and flip"),
    ("pretrain/imagenet_multi_interp.yaml", "data.hflip", True,
     "multi-mix §IV-C: random horizon flip"),
    ("pretrain/imagenet_multi_interp.yaml", "method.base", "puzzlemix",
     "multi-mix Table III: with Puzzle-mix"),
    ("pretrain/imagenet_multi_interp.yaml", "method.k", 5, "multi-mix §IV-B1 / §IV-I: K = 5"),
    ("pretrain/imagenet_multi_interp.yaml", "optim.nesterov", False,
     "source: PuzzleMix-fast SGD without nesterov"),
    ("pretrain/imagenet_multi_interp.yaml", "optim.batch_size", 448,
     "source: PuzzleMix-fast phases 2-3 batch 448"),
    ("pretrain/imagenet_multi_interp.yaml", "method.puzzle.beta", 1.5,
     "source: PuzzleMix-fast TRAIN.beta 1.5"),
    # ---------------------------------------------------------------- Co-Mixup ImageNet, 100
    # epochs Co-Mixup (arXiv:2102.03065) 22.39 % error (AlignMix B Table 5, multi-mix Table III);
    # "Co-Mixup-fast" = snu-mllab/Co-Mixup comix-imagenet/ at 2a76816
    *[("pretrain/imagenet_comixup.yaml", key, value, cite) for key, value, cite in (
        ("model.arch", "resnet50", "AlignMix B Table 5: ResNet-50; source: TRAIN.arch resnet50"),
        ("optim.epochs", 100, "AlignMix B: 100 epochs, the protocol of Co-Mixup; source: README"),
        ("optim.schedule", "piecewise", "source: Co-Mixup-fast np.interp(lr_epochs, lr_values)"),
        ("optim.lr", 1.0, "the points are absolute learning rates"),
        ("optim.points",
         [[0, 0.5], [8, 1.0], [15, 0.125], [15, 0.2], [40, 0.02], [65, 0.002], [90, 0.0002],
          [100, 0.00002]],
         "source: Co-Mixup-fast phases 1-3 lr_epochs / lr_values"),
        ("data.crop_schedule", [[0, 128], [15, 224]],
         "source: Co-Mixup-fast DATA.crop_size 128 / 224"),
        ("data.scale_min", 0.087, "source: Co-Mixup-fast phases 2-3 DATA.min_scale"),
        ("data.color_jitter", 0.0, "source: Co-Mixup-fast train_transform: crop and flip only"),
        ("data.lighting", 0.0, "source: Co-Mixup-fast train_transform: crop and flip only"),
        ("model.zero_init_residual", True, "source: Co-Mixup-fast init_dist_weights"),
        ("optim.batch_size", 448, "source: Co-Mixup-fast phases 2-3 DATA.batch_size"),
        ("optim.nesterov", False, "source: Co-Mixup-fast SGD without nesterov"),
        ("optim.momentum", 0.9, "source: Co-Mixup-fast TRAIN.momentum"),
        ("optim.weight_decay", 1e-4, "source: Co-Mixup-fast TRAIN.weight_decay"),
        ("method.name", "comixup", "AlignMix B Table 5: Co-Mixup"),
        ("method.block_num", 4, "source: Co-Mixup-fast TRAIN.block_num"),
        ("method.part", 16, "source: Co-Mixup-fast lib/utils.py m_part = 16"),
        ("method.alpha", 1.0, "source: Co-Mixup-fast get_onehot_matrix Dirichlet(ones)"),
        ("method.beta", 0.32, "source: Co-Mixup-fast TRAIN.m_beta"),
        ("method.gamma", 1.0, "source: Co-Mixup-fast m_gamma = 1"),
        ("method.thres", 0.83, "source: Co-Mixup-fast TRAIN.thres"),
        ("method.thres_type", "hard", "source: Co-Mixup-fast m_thres_type = 'hard'"),
        ("method.eta", 0.05, "source: Co-Mixup-fast m_eta = 0.05"),
        ("method.omega", 0.001, "source: Co-Mixup-fast TRAIN.lam_dist"),
        ("method.set_resolve", True, "source: Co-Mixup-fast TRAIN.set_resolve"),
        ("method.niter", 3, "source: Co-Mixup-fast m_niter = 3"),
        ("method.clean_lam", 500.0, "source: Co-Mixup-fast clean_lam 1 * CE = 2 * 500 / 1000 * "
                                    "CE"),
        ("method.loss", "ce", "source: Co-Mixup-fast soft cross-entropy"),
    )],
    # ---------------------------------------------------------------- baselines: the PuzzleMix-300
    # rows
    *[(f"pretrain/imagenet_{m}.yaml", key, value, cite)
      for m in ("erm", "input_mixup", "manifold_mixup", "cutmix", "puzzlemix")
      for key, value, cite in [
          ("optim.batch_size", 256, "source: PuzzleMix-300 / CutMix README --batch_size 256"),
          ("optim.milestones", [75, 150, 225], "source: PuzzleMix-300 lr * 0.1 ** (epoch // 75)"),
          ("optim.epochs", 300, "source: PuzzleMix-300 --epochs 300"),
          ("optim.lr", 0.1, "source: PuzzleMix-300 --lr 0.1"),
      ]],
    ("pretrain/imagenet_cutmix.yaml", "method.alpha", 1.0, "source: CutMix README --beta 1.0"),
    ("pretrain/imagenet_cutmix.yaml", "method.prob", 1.0,
     "source: CutMix README --cutmix_prob 1.0"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.alpha", 1.0,
     "source: PuzzleMix-300 README --beta 1.0"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.beta", 1.2, "source: PuzzleMix-300 --p_beta 1.2"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.gamma", 0.5,
     "source: PuzzleMix-300 --p_gamma 0.5"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.eta", 0.2, "source: PuzzleMix-300 --p_eta 0.2"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.t_eps", 0.8, "source: PuzzleMix-300 --t_eps 0.8"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.grids", [2, 4, 8, 16],
     "source: PuzzleMix-300 2 ** randint(1, 5)"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.neigh_size", 2,
     "source: PuzzleMix-300 min(neigh_size, 2)"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.t_size", -1,
     "source: PuzzleMix-300 block-level transport"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.clean_lam", 0.0,
     "source: PuzzleMix-300 --clean_lam 0"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.saliency_mode", "eval",
     "source: PuzzleMix-300 model.eval()"),
    ("pretrain/imagenet_puzzlemix.yaml", "method.loss", "ce",
     "source: PuzzleMix-300 lam-weighted CE"),
    # SuperMix: MultiMix Table 7 row, A.2 "using the same settings"; knobs: alldbi/SuperMix at
    # d63d25a
    *[("pretrain/imagenet_supermix.yaml", key, value, cite) for key, value, cite in (
        ("optim.epochs", 300, "MultiMix A.2 same settings as A.1 (300 epochs)"),
        ("optim.lr", 0.1, "MultiMix A.1: initial learning rate 0.1"),
        ("optim.milestones", [100, 200], "MultiMix A.1: decay by 0.1 at 100, 200"),
        ("model.arch", "resnet50", "MultiMix Table 7: R-50"),
        ("teacher", None, "given at run time (--teacher); A.2: same network as teacher"),
        ("method.name", "supermix", "MultiMix Table 7: SuperMix"),
        ("method.mask_w", 16, "source: SuperMix README ImageNet command --w 16"),
        ("method.sigma", 2.0, "source: SuperMix README ImageNet command --sigma 2"),
        ("method.k", 2, "source: SuperMix supermix.py --k default 2"),
        ("method.alpha", 3.0, "source: SuperMix supermix.py --alpha default 3"),
        ("method.lambda_s", 25.0, "source: SuperMix supermix.py --lambda_s default 25"),
        ("method.max_iter", 50, "source: SuperMix supermix.py --max_iter default 50"),
        ("method.tol", 70.0, "source: SuperMix supermix.py --tol default 70"),
        ("method.cls_weight", 2.0, "source: SuperMix train_student.py -r default 2"),
    )],
    # ---------------------------------------------------------------- PuzzleMix: the authors'
    # CIFAR-100 and Tiny-ImageNet commands (snu-mllab/PuzzleMix README.md @ e2dbf3a) and main.py's
    # defaults and train(); CIFAR-10 takes the CIFAR-100 command (the authors publish none for
    # CIFAR-10; the same main.py)
    *[(f"pretrain/{t}_puzzlemix.yaml", f"method.{key}", value,
       f"source: PuzzleMix README / main.py: {cite}")
      for t in ("cifar10", "cifar100", "tinyimagenet")
      for key, value, cite in (
          ("alpha", 1.0, "--mixup_alpha 1.0"), ("beta", 1.2, "--beta 1.2"),
          ("gamma", 0.5, "--gamma 0.5"), ("eta", 0.2, "--eta 0.2"),
          ("n_labels", 3, "--n_labels 3"), ("neigh_size", 4, "--neigh_size 4"),
          ("transport", True, "--transport True"), ("t_eps", 0.8, "--t_eps 0.8"),
          ("grids", [2, 4, 8, 16], "block_num = 2 ** randint(1, 5)"),
          ("loss", "bce", "bce_loss(softmax(output), reweighted_target)"),
          ("t_size", 4 if t != "tinyimagenet" else -1,
           "--t_size 4 (CIFAR); default -1 (Tiny-ImageNet)"),
          ("clean_lam", 1.0 if t == "tinyimagenet" else 0.0,
           "--clean_lam 1 (Tiny-ImageNet); default 0"),
          ("saliency_mode", "train" if t == "tinyimagenet" else "eval",
           "clean_lam > 0: model.train()"))],
    # ---------------------------------------------------------------- WSOL on CUB
    ("wsol/_base_cub.yaml", "model.arch", "resnet50", "AlignMix §4.4 / Table 4: Resnet-50"),
    ("wsol/_base_cub.yaml", "input.resize", 256, "AlignMix B: resize to 256 x 256"),
    ("wsol/_base_cub.yaml", "input.crop", 224, "AlignMix B: random crop 224 x 224"),
    ("wsol/_base_cub.yaml", "input.test_size", 224,
     "AlignMix B: testing, directly resize to 224 x 224"),
    ("wsol/_base_cub.yaml", "eval.loc_threshold", 0.15, "AlignMix §4.4: binarize at 0.15"),
    ("wsol/_base_cub.yaml", "eval.loc_iou", 0.5, "AlignMix §4.4: IoU threshold of 0.5"),
    ("wsol/_base_cub.yaml", "eval.iou_thresholds", [30, 50, 70],
     "AlignMix §4.4: MaxBoxAcc-v2 (Choe et al.)"),
    ("wsol/cub_alignmix.yaml", "optim.epochs", 600, "AlignMix B: 600 epochs"),
    ("wsol/cub_alignmix.yaml", "optim.batch_per_process", 16, "AlignMix B: batch size of 16"),
    ("wsol/cub_alignmix.yaml", "optim.name", "sgd", "AlignMix B: using SGD"),
    ("wsol/cub_alignmix.yaml", "optim.lr", 0.001, "AlignMix B: R-50 remaining layers 0.001"),
    ("wsol/cub_alignmix.yaml", "optim.lr_classifier", 0.01, "AlignMix B: R-50 classifier 0.01"),
    ("wsol/cub_alignmix.yaml", "optim.large_lr_layers", ["fc"], "AlignMix B: the classifier"),
    ("wsol/cub_alignmix.yaml", "optim.momentum", 0.9, "AlignMix B: momentum 0.9"),
    ("wsol/cub_alignmix.yaml", "optim.weight_decay", 1e-4, "AlignMix B: weight decay 0.0001"),
    ("wsol/cub_alignmix.yaml", "optim.schedule", "step",
     "AlignMix B: decay by 0.1 every 150 epochs"),
    ("wsol/cub_alignmix.yaml", "optim.step_size", 150, "AlignMix B: every 150 epochs"),
    ("wsol/cub_alignmix.yaml", "optim.gamma", 0.1, "AlignMix B: by 0.1"),
    ("wsol/cub_alignmix.yaml", "method.name", "alignmix",
     "AlignMix §4.4: same procedure as classification"),
    ("wsol/cub_alignmix.yaml", "method.alpha", 2.0, "AlignMix B: alpha = 2.0"),
    ("wsol/cub_alignmix.yaml", "method.eps", 0.1, "AlignMix B: eps = 0.1"),
    ("wsol/cub_alignmix.yaml", "method.n_iters", 100, "AlignMix B: 100 iterations"),
    ("wsol/cub_alignmix.yaml", "method.tol", 0.1, "AlignMixup_CVPR22 utils/OT.py: thresh = 1e-1"),
    ("wsol/cub_multimix.yaml", "optim.epochs", 10, "multi-mix §IV-F: a maximum of 10 epochs"),
    ("wsol/cub_multimix.yaml", "optim.name", "adam", "multi-mix §IV-F: the Adam optimizer"),
    ("wsol/cub_multimix.yaml", "optim.lr", 1e-4, "multi-mix §IV-F: learning rate 0.0001"),
    ("wsol/cub_multimix.yaml", "optim.lr_classifier", 1e-4, "multi-mix §IV-F: one learning rate"),
    ("wsol/cub_multimix.yaml", "optim.freeze", ["conv1", "bn1", "layer1", "layer2", "layer3"],
     "multi-mix §IV-F: fine-tune the last ResNet block and the fc layer"),
    ("wsol/cub_multimix.yaml", "eval.every_epochs", 1,
     "multi-mix Table VI: fine-tuning steps 1..10"),
    ("wsol/cub_multimix.yaml", "eval.loc_threshold", 0.75,
     "multi-mix §IV-F: binarization threshold 0.75"),
    ("wsol/cub_multimix.yaml", "eval.loc_iou", 0.25, "multi-mix §IV-D: IoU higher than 0.25"),
    ("wsol/cub_multimix.yaml", "eval.loc_op", ">", "multi-mix §IV-D: higher than (strict)"),
    ("wsol/cub_multimix.yaml", "method.name", "none", "multi-mix §IV-F: plain fine-tuning"),
    # ---------------------------------------------------------------- robustness on ImageNet val
    ("robustness/imagenet.yaml", "sigma", 0.1, "multi-mix §IV-E: Gaussian noise N(0, 0.1^2)"),
    ("robustness/imagenet.yaml", "iou_threshold", 0.25, "multi-mix §IV-D: IoU higher than 0.25"),
    ("robustness/imagenet.yaml", "iou_op", ">", "multi-mix §IV-D: higher than (strict)"),
    ("robustness/imagenet.yaml", "data.max_val", None,
     "multi-mix §IV-D/E: the ImageNet validation set"),
    ("robustness/imagenet.yaml", "fgsm_eps", "8/255", "AlignMix §4.2 / MultiMix §4.2: FGSM 8/255"),
    ("robustness/imagenet.yaml", "pgd_eps", "4/255", "AlignMix §4.2 / MultiMix §4.2: PGD 4/255"),
    ("robustness/imagenet.yaml", "pgd_step", "2/255",
     "AlignMix §4.2 / MultiMix §4.2: step size 2/255"),
    ("robustness/imagenet.yaml", "ood_noise", "uniform,gaussian",
     "AlignMix App. C: U(0, 1) and N(mu, sigma)"),
    ("robustness/imagenet.yaml", "gaussian_std", 0.5, "AlignMix App. C: mu = sigma = 0.5"),
    ("robustness/imagenet.yaml", "ood_threshold", 0.5,
     "AlignMix §4.3 / App. C: Det Acc at threshold 0.5"),
    ("robustness/imagenet.yaml", "cam_threshold", 0.25, "source: Co-Mixup eval_loc.sh --th 0.25"),
    ("robustness/imagenet.yaml", "pgd_iters", 20,
     "source: PuzzleMix checkpoint/test_robust.py (4, 2, 20, True)"),
    ("robustness/imagenet.yaml", "pgd_random_start", True,
     "source: PuzzleMix test_robust.py random_init"),
    # ---------------------------------------------------------------- detection (MultiMix Table 5)
    ("detection/ssd300_r50_voc0712.yaml", "model.type", "ssd", "MultiMix §4.3: SSD [25]"),
    ("detection/ssd300_r50_voc0712.yaml", "model.arch", "resnet50",
     "MultiMix §4.3: R-50 backbone"),
    ("detection/ssd300_r50_voc0712.yaml", "data.voc_train", ["2007/trainval", "2012/trainval"],
     "MultiMix Table 5: VOC07+12"),
    ("detection/ssd300_r50_voc0712.yaml", "data.voc_test", "2007/test",
     "VOC07+12 protocol: VOC07 test"),
    ("detection/ssd300_r50_voc0712.yaml", "eval.metric", "11point", "VOC07 test: 11-point AP"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.lr", 0.001, "source: SSD paper §3 lr 1e-3"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.momentum", 0.9,
     "source: SSD paper §3 momentum 0.9"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.weight_decay", 0.0005,
     "source: SSD paper §3 wd 0.0005"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.reference_batch", 32,
     "source: SSD paper §3 batch 32"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.batch_per_process", 32,
     "source: SSD paper §3 / ssd.pytorch 1 x 32"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.max_iter", 120000,
     "source: ssd.pytorch voc max_iter"),
    ("detection/ssd300_r50_voc0712.yaml", "optim.warmup_iters", 0,
     "source: ssd.pytorch: no warm-up"),
    ("detection/ssd300_r50_voc0712.yaml", "model.kwargs.priors", "voc",
     "source: SSD VOC default boxes"),
    ("detection/ssd300_r50_voc0712.yaml", "data.zoom_out_ratio", 4.0,
     "source: SSD paper zoom out 16x area"),
    ("detection/ssd512_r50_voc0712.yaml", "model.size", 512, "source: SSD paper SSD512"),
    ("detection/ssd512_r50_voc0712.yaml", "model.kwargs.priors", "voc",
     "source: Caffe ssd_pascal_512.py"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "model.type", "faster_rcnn_fpn",
     "MultiMix §4.3: FasterRCNN"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "model.arch", "resnet50",
     "MultiMix §4.3: R-50 backbone"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "data.format", "coco", "MultiMix Table 5: MS-COCO"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "optim.lr", 0.02,
     "source: detectron2 1x BASE_LR 0.02"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "optim.reference_batch", 16,
     "source: detectron2 IMS_PER_BATCH 16"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "optim.max_iter", 90000,
     "source: detectron2 1x MAX_ITER"),
    ("detection/frcnn_r50_fpn_1x_coco.yaml", "model.train_sizes", [640, 672, 704, 736, 768, 800],
     "source: detectron2 faster_rcnn_R_50_FPN_1x MIN_SIZE_TRAIN"),
    # ---------------------------------------------------------------- CIFAR-10/100 (AlignMix App.
    # B, MultiMix A.1)
    *[(f"pretrain/{t}_{m}.yaml", "model.arch", "preactresnet18",
       "AlignMix §4.1 / MultiMix §4.1: PreActResnet18")
      for t in ("cifar10", "cifar100", "tinyimagenet")
      for m in ("erm", "input_mixup", "manifold_mixup", "cutmix", "puzzlemix", "multimix",
                "dense_multimix")],
    *[(f"pretrain/{t}_{m}.yaml", "model.arch", "preactresnet18_alignmixup",
       "AlignMixup_CVPR22 resnet.py: ResNet18()")
      for t in ("cifar10", "cifar100", "tinyimagenet")
      for m in ("alignmix", "alignmix_stage2", "alignmix_ae")],
    *[(f"pretrain/{t}_{m}.yaml", key, value, cite) for t in ("cifar10", "cifar100")
      for m in ("erm", "input_mixup", "manifold_mixup", "cutmix", "puzzlemix", "multimix",
                "dense_multimix", "alignmix_stage2", "alignmix_ae")
      for key, value, cite in (
          ("data.dataset", t, "AlignMix §4.1 / MultiMix §4.1: CIFAR-10 and CIFAR-100"),
          ("optim.epochs", 2000, "AlignMix B / MultiMix A.1: 2000 epochs"),
          ("optim.milestones", [500, 1000, 1500],
           "AlignMix B / MultiMix A.1: decay every 500 epochs"),
          ("optim.gamma", 0.1, "AlignMix B / MultiMix A.1: by a factor 0.1"),
          ("optim.lr", 0.1, "AlignMix B / MultiMix A.1: initial lr 0.1"),
          ("optim.batch_size", 128, "AlignMix B: batch 128; MultiMix A.1: b = 128 on one GPU"),
          ("optim.momentum", 0.9, "AlignMix B / MultiMix A.1: momentum 0.9"),
          ("optim.weight_decay", 1e-4, "AlignMix B / MultiMix A.1: weight decay 0.0001"),
          ("data.crop_size", 32, "CIFAR's 32 x 32 images"),
          ("data.padding", 4, "source: reference codes RandomCrop(32, padding=4)"))],
    # ---------------------------------------------------------------- TinyImageNet (AlignMix App.
    # B, MultiMix A.1)
    *[(f"pretrain/tinyimagenet_{m}.yaml", key, value, cite)
      for m in ("erm", "input_mixup", "manifold_mixup", "cutmix", "puzzlemix", "multimix",
                "dense_multimix", "alignmix_stage2", "alignmix_ae")
      for key, value, cite in (
          ("optim.epochs", 1200, "AlignMix B / MultiMix A.1: 1200 epochs"),
          ("optim.milestones", [600, 900], "AlignMix B / MultiMix A.1: decay at 600 and 900"),
          ("optim.lr", 0.1, "AlignMix B / MultiMix A.1: initial lr 0.1"),
          ("optim.weight_decay", 1e-4, "AlignMix B / MultiMix A.1: weight decay 0.0001"),
          ("data.crop_size", 64, "TinyImageNet's 64 x 64 images"))],
    ("pretrain/tinyimagenet_alignmix_stage2.yaml", "optim.batch_size", 128,
     "AlignMix B: batch 128 on 2 GPUs"),
    ("pretrain/tinyimagenet_multimix.yaml", "optim.batch_per_process", 128,
     "MultiMix A.1: b = 128 per GPU"),
    *[(f"pretrain/{t}_{m}.yaml", key, value, cite) for t in ("cifar10", "cifar100", "tinyimagenet")
      for m in ("alignmix_stage2", "alignmix_ae")
      for key, value, cite in (("method.alpha", 2.0, "AlignMix B: alpha = 2.0"),
                               ("method.eps", 0.1, "AlignMix B: eps = 0.1"),
                               ("method.n_iters", 100, "AlignMix B: 100 Sinkhorn iterations"),
                               ("method.tol", None, "AlignMix B: 100 iterations, no early stop"),
                               ("method.resolution", 4, "AlignMix §4.1: A is c x 4 x 4"))],
    *[(f"pretrain/{t}_{m}.yaml", key, value, cite) for t in ("cifar10", "cifar100", "tinyimagenet")
      for m in ("multimix", "dense_multimix")
      for key, value,
      cite in (("method.n", 1000, "MultiMix A.1: n = 1000"),
               ("method.m", None, "MultiMix A.1: m = b"),
                               ("method.alpha_low", 0.5, "MultiMix A.1: U[0.5, 2]"),
                               ("method.alpha_high", 2.0, "MultiMix A.1: U[0.5, 2]"),
                               ("method.prob", 0.5, "MultiMix §4.1: probability 0.5"))],
    ("pretrain/cifar10_multimix.yaml", "method.layer", 5, "MultiMix A.1: the embedding"),
    ("pretrain/cifar100_dense_multimix.yaml", "method.resolution", 4,
     "MultiMix A.1: r = 4 x 4 on CIFAR"),
    ("pretrain/cifar100_dense_multimix.yaml", "method.attention", "gap_l1relu",
     "MultiMix A.1: GAP, ReLU + l1"),
    ("pretrain/cifar100_multi_interp.yaml", "optim.epochs", 300, "multi-mix §IV-B1: 300 epochs"),
    ("pretrain/cifar100_multi_interp.yaml", "optim.milestones", [100, 200],
     "multi-mix §IV-B1: at 100 and 200"),
    ("pretrain/cifar100_multi_interp.yaml", "optim.lr", 0.2, "multi-mix §IV-B1: initial lr 0.2"),
    ("pretrain/cifar100_multi_interp.yaml", "optim.batch_size", 100,
     "multi-mix §IV-B1: batch 100"),
    ("pretrain/cifar100_multi_interp.yaml", "method.k", 5, "multi-mix §IV-B1: K = 5"),
    ("pretrain/tinyimagenet_multi_interp.yaml", "optim.epochs", 1200,
     "multi-mix §IV-B1: 1,200 epochs"),
    ("pretrain/tinyimagenet_multi_interp.yaml", "optim.milestones", [600, 900],
     "multi-mix §IV-B1: at 600 and 900"),
    ("pretrain/tinyimagenet_multi_interp.yaml", "optim.lr", 0.2,
     "multi-mix §IV-B1: initial lr 0.2"),
    ("pretrain/tinyimagenet_multi_interp.yaml", "method.base", "puzzlemix",
     "multi-mix Table I: on Puzzle-mix"),
    # ---------------------------------------------------------------- the paper pipeline
    ("pipeline/paper.yaml", "pretrain.config", "configs/pretrain/imagenet_{method}.yaml",
     "the cited recipes"),
    ("pipeline/paper.yaml", "detection.0.config", "configs/detection/ssd300_r50_voc0712.yaml",
     "MultiMix Table 5 SSD"),
    ("pipeline/paper.yaml", "detection.0.world_size", 1, "the pipeline's one process"),
    ("pipeline/paper.yaml", "detection.1.config", "configs/detection/frcnn_r50_fpn_1x_coco.yaml",
     "MultiMix Table 5 FR-CNN"),
    ("pipeline/paper.yaml", "detection.1.world_size", 1, "the pipeline's one process"),
    ("pipeline/paper.yaml", "wsol.config", "configs/wsol/cub_alignmix.yaml", "AlignMix Table 4"),
    ("pipeline/paper.yaml", "robustness.options.iou_threshold", 0.25, "multi-mix §IV-D"),
    ("pipeline/paper.yaml", "robustness.options.iou_op", ">", "multi-mix §IV-D"),
    ("pipeline/paper.yaml", "robustness.options.gaussian_std", 0.5, "AlignMix App. C"),
    ("pipeline/paper.yaml", "robustness.options.ood_threshold", 0.5, "AlignMix §4.3"),
    ("pipeline/paper.yaml", "robustness.options.sigma", 0.1, "multi-mix §IV-E"),
]


def _defaults(rel: str) -> dict:
    family = rel.split("/")[0]
    if family == "pretrain":
        from pretrain.task import DEFAULTS
    elif family == "wsol":
        from wsol.finetune import DEFAULTS
    elif family == "detection":
        from transfer.detection.config import DEFAULTS
    elif family == "pipeline":
        from mixup_transfer.pipeline.run import DEFAULTS
    elif family == "robustness":
        from transfer.robustness.stage import DEFAULTS
    else:
        raise AssertionError(f"no DEFAULTS for {rel}")
    return DEFAULTS


_CACHE: dict = {}


def resolved(rel: str) -> dict:
    if rel not in _CACHE:
        _CACHE[rel] = load_config(ROOT / "configs" / rel, defaults=_defaults(rel))
    return _CACHE[rel]


def lookup(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        else:
            assert isinstance(node, dict) and part in node, f"{dotted}: {part!r} missing"
            node = node[part]
    return node


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and not isinstance(a, bool)
            and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("rel,key,value,cite", RECIPES, ids=[f"{r}:{k}" for r, k, _, _ in RECIPES])
def test_config_value_equals_the_paper(rel, key, value, cite):
    got = lookup(resolved(rel), key)
    assert _same(got, value), f"configs/{rel}: {key} = {got!r}, but {cite} says {value!r}"


# ------------------------------------------------------------------------------- structural checks

COVERED = sorted(
    [p.relative_to(ROOT / "configs").as_posix()
     for p in (ROOT / "configs" / "pretrain").glob("*imagenet*.yaml")]
    + [p.relative_to(ROOT / "configs").as_posix()
       for p in (ROOT / "configs" / "pretrain").glob("*cifar*.yaml")]
    + [p.relative_to(ROOT / "configs").as_posix()
       for p in (ROOT / "configs" / "wsol").glob("*cub*.yaml")]
    + [p.relative_to(ROOT / "configs").as_posix()
       for p in (ROOT / "configs" / "detection").glob("*.yaml")
       if not p.name.startswith("toy_")]
    + ["robustness/imagenet.yaml", "pipeline/paper.yaml"])

# keys that are paths or names, not recipe values
_NO_CITATION = {"_BASE_", "name", "root", "image_root", "metadata_root", "config", "overrides",
                "out_root", "generate", "methods", "suites", "ood", "export_corrupted", "arch",
                "format"}


@pytest.mark.parametrize("rel", COVERED)
def test_every_value_line_carries_a_comment(rel):
    """Each `key: value` line of a real-data recipe says where its value comes from (a citation,
    "paper silent" + the source, or "engine/machine setting")."""
    missing = []
    for n, line in enumerate((ROOT / "configs" / rel).read_text().splitlines(), 1):
        m = re.match(r"^\s*(-\s+)?([A-Za-z_][\w]*):\s*(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        key, rest = m.group(2), m.group(3)
        if key in _NO_CITATION or rest == "" or rest.startswith("#"):
            continue  # a mapping header or a name / path
        if "#" not in rest:
            missing.append(f"line {n}: {line.strip()}")
    assert not missing, f"configs/{rel}: value lines without a source comment:\n" + "\n".join(
        missing
    )


@pytest.mark.parametrize("rel", [r for r in COVERED if r.startswith("pretrain/")
                                 and "_base_" not in r])
def test_pretrain_method_knobs_are_the_methods_own(rel):
    from pretrain.methods import method_knobs

    method = dict(resolved(rel)["method"])
    name = method.pop("name")
    unknown = sorted(set(method) - set(method_knobs(name)))
    assert not unknown, f"configs/{rel}: {unknown} are not knobs of {name}"
    if name == "multi_interp" and method.get("puzzle"):
        bad = sorted(set(method["puzzle"]) - set(method_knobs("puzzlemix")))
        assert not bad, f"configs/{rel}: method.puzzle {bad} are not PuzzleMix knobs"


def test_wsol_method_names_a_pretraining_method_with_its_knobs():
    from pretrain.methods import METHODS, method_knobs

    for rel in [r for r in COVERED if r.startswith("wsol/")]:
        method = dict(resolved(rel)["method"])
        name = method.pop("name", "none")
        if name == "none":
            assert method == {}, f"configs/{rel}: knobs without a method"
            continue
        assert name in METHODS, f"configs/{rel}: method.name {name!r}"
        unknown = sorted(set(method) - set(method_knobs(name)))
        assert not unknown, f"configs/{rel}: method knobs {unknown} are not knobs of {name}"


def test_global_batch_is_stated_once():
    """A pretraining recipe states the global batch or the per-process batch, never both (the
    engine derives the other from the world size)."""
    for rel in [r for r in COVERED if r.startswith("pretrain/")]:
        o = resolved(rel)["optim"]
        assert (o["batch_size"] is None) != (o["batch_per_process"] is None), (
            f"configs/{rel}: optim.batch_size={o['batch_size']} and "
            f"optim.batch_per_process={o['batch_per_process']}"
        )


def test_ssd_recipes_use_the_voc_default_boxes():
    from transfer.detection.models import SSD_SCALES

    ssd300 = resolved("detection/ssd300_r50_voc0712.yaml")["model"]
    ssd512 = resolved("detection/ssd512_r50_voc0712.yaml")["model"]
    # SSD300 VOC min sizes 30, 60, 111, 162, 213, 264 and max 315 px; SSD512 35.84 ... 460.8, max
    # 537.6 px
    assert [round(s * 300, 6) for s in SSD_SCALES[(300, ssd300["kwargs"]["priors"])]] == \
        [30, 60, 111, 162, 213, 264, 315]
    assert [round(s * 512, 6) for s in SSD_SCALES[(512, ssd512["kwargs"]["priors"])]] == \
        [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6]


def test_paper_pipeline_detection_batch_times_world_is_the_reference_batch():
    """The paper pipeline's detection entries give each config its source's global batch at the
    stated world size, so the lr is not rescaled."""
    from mixup_transfer.core.config import apply_overrides
    from transfer.detection.config import DEFAULTS as DET

    for entry in resolved("pipeline/paper.yaml")["detection"]:
        rel = entry["config"].removeprefix("configs/")
        overrides = [o for o in entry["overrides"] if not o.startswith("data.root=")]
        cfg = load_config(ROOT / "configs" / rel, overrides, defaults=DET)
        s = cfg["optim"]
        assert s["batch_per_process"] * entry["world_size"] == s["reference_batch"], (
            rel,
            s,
            entry,
        )
        assert (
            apply_overrides({}, overrides)["optim"]["batch_per_process"] == s["batch_per_process"]
        )


ALIGNMIX_CONFIGS = sorted(p.relative_to(ROOT / "configs").as_posix()
                          for p in (ROOT / "configs").glob("**/*alignmix*.yaml"))


@pytest.mark.parametrize("rel", ALIGNMIX_CONFIGS)
def test_every_alignmix_recipe_says_which_variant_it_runs_and_why(rel):
    """Each AlignMix config names its variant (the released code's `alignmix`, the paper's
    `alignmix_stage2` or `alignmix_ae`) in its header and cites the source it follows: the released
    code at a commit, or the paper."""
    text = (ROOT / "configs" / rel).read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    raw = yaml.safe_load(text)
    section = raw.get("method") or {}
    # an ablation names the method directly
    name = section if isinstance(section, str) else section.get("name")
    if name is not None:
        assert f"`{name}`" in header or f"method {name}" in header or f"({name}" in header, rel
    assert "AlignMixup_CVPR22 at ec01a68" in header or "arXiv 2103.15375" in header, rel


def _resolved_recipe(path, *overrides):
    """A pretraining recipe resolved as the stage reads it, on a placeholder ImageNet root."""
    from pretrain.task import DEFAULTS, resolve_config

    return resolve_config(load_config(path, ["data.root=/data/imagenet", *overrides],
                                      defaults=DEFAULTS))


def test_tokenmix_recipe_takes_its_teacher_at_run_time():
    """The TokenMix recipe keeps the official activation labels with `teacher: null`: reading it
    without a teacher is refused, --teacher (the teacher key) or method.labels=area makes it whole,
    and its header says both."""
    from mixup_transfer.core.config import ConfigError

    path = ROOT / "configs/pretrain/imagenet_vit_s16_tokenmix.yaml"

    def read(*overrides):
        return _resolved_recipe(path, *overrides)

    with pytest.raises(ConfigError, match="needs a teacher"):
        read()
    assert (
        read("teacher=runs/imagenet_erm/backbone.pth")["teacher"]
        == "runs/imagenet_erm/backbone.pth"
    )
    assert read("method.labels=area")["teacher"] is None
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "--teacher" in header and "method.labels=area" in header


def test_imagenet_supermix_recipe_takes_its_teacher_at_run_time():
    """The ImageNet SuperMix recipe has `teacher: null`: reading it without a teacher is refused,
    --teacher (the teacher key) makes it whole, and its header gives that command."""
    from mixup_transfer.core.config import ConfigError

    path = ROOT / "configs/pretrain/imagenet_supermix.yaml"

    def read(*overrides):
        return _resolved_recipe(path, *overrides)

    with pytest.raises(ConfigError, match="needs a teacher"):
        read()
    assert (
        read("teacher=runs/imagenet_erm/backbone.pth")["teacher"]
        == "runs/imagenet_erm/backbone.pth"
    )
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "--teacher runs/imagenet_erm/backbone.pth" in header
