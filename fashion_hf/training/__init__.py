"""Training, evaluation, ensembling and model cards. The scripts in the repository's `train/` and the `fashion-hf`
command run the commands' `main`: `train.py`, `evaluate.py`, `ensemble.py` and `model_card.py`; the other modules
are what those share (a run in `loop.py`, its data in `examples.py`, recipe.json in `recipe.py`, ...). Nothing here
is imported by `import fashion_hf`; the scores themselves are the library's (`fashion_hf.evaluation`)."""
