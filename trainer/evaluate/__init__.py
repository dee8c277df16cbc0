"""Evaluation of encoders: the linear probe, downstream finetuning and fc-only, the SVM, the results table.

Import the module you need (`trainer.evaluate.finetune`, `.svm`, `.probe`, ...): this package imports nothing,
so the training loop's probe does not load the downstream protocols.
"""
