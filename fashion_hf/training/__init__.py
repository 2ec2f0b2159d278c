"""Training, evaluation, ensembling and model cards. The scripts in the repository's `train/` and the `fashion-hf`
command run these modules' `main`; nothing here is imported by `import fashion_hf`."""
