"""Training loops.

``vidsparse finetune`` (:mod:`.finetune`: LoRA fine-tuning of a Wan transformer with any method applied) and
``vidsparse train-tiny`` (:mod:`.train_tiny`: the shipped ``tiny-shapes`` model from scratch).
"""
