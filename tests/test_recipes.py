"""Training recipes, evaluation transforms and dense configs equal the official code.

The official values live in ``configs/official/*.yaml`` (each row names its official repository, commit and file);
deliberate differences are ``deviations`` rows there and in ``configs/README.md``.
"""

# ---- training recipes: tools/train.py --print-recipe vs configs/official/train_*.yaml ----------------------------


# ---- evaluation transforms: pretrained cfgs vs configs/official/eval.yaml -----------------------------------------


# ---- dense configs: mmengine Config.fromfile vs configs/official/mm.yaml ------------------------------------------
